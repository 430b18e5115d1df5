"""Claude Code transcript watching: a managed secret appended to a session's .jsonl (or
written to a tool-result file) under a fake CLAUDE_CONFIG_DIR becomes an alert for the
workspace's tenant. Real files, real watchfiles, the real alert store."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.fixtures import World

from broker.claude.transcripts import (
    TranscriptScanner,
    TranscriptWatcher,
    claude_config_dir,
    project_folder_name,
    transcript_dir,
    workspace_of_folder,
)
from broker.leaks.alerts import AlertStore
from broker.paths import Paths

ACME_KEY = "sk-acme-transcript-Zq9+Tr4Lw7Hq2Pk81"
GLOBEX_KEY = "gx-globex-transcript+Key8Wm-Rt5Ns3"
SECRETS = {("acme", "api"): ACME_KEY, ("globex", "crm"): GLOBEX_KEY}


def line(text: str, cwd: Path | None = None, kind: str = "user") -> str:
    """One transcript record, shaped like Claude Code's (a tool result as user content)."""
    record: dict[str, object] = {
        "parentUuid": "a1",
        "isSidechain": False,
        "userType": "external",
        "sessionId": "s-1",
        "version": "2.1.0",
        "type": kind,
        "uuid": "b2",
        "timestamp": "2026-11-20T10:00:00.000Z",
        "message": {"role": "user", "content": [{"tool_use_id": "toolu_1", "type": "tool_result", "content": text}]},
    }
    if cwd is not None:
        record["cwd"] = str(cwd)
    return json.dumps(record) + "\n"


@pytest.fixture
def claude_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "claude-config"
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(home))
    return home


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    out = {"acme": tmp_path / "clients" / "acme.web", "globex": tmp_path / "clients" / "globex"}
    for p in out.values():
        p.mkdir(parents=True)
    return out


def workspaces(folders: dict[str, Path]) -> list[tuple[str, Path]]:
    return [(t, p.resolve()) for t, p in folders.items()]


def test_folder_naming(claude_home: Path) -> None:
    assert project_folder_name("/home/ana/clients/acme.web_v2") == "-home-ana-clients-acme-web-v2"
    assert claude_config_dir() == claude_home
    assert transcript_dir(Path("/srv/x y")) == claude_home / "projects" / "-srv-x-y"
    assert claude_config_dir({}) == Path.home() / ".claude"


def test_folder_belongs_to_longest_workspace() -> None:
    ws = [("acme", Path("/w/acme")), ("inner", Path("/w/acme/sub"))]
    assert workspace_of_folder("-w-acme", ws) == ("acme", Path("/w/acme"))
    assert workspace_of_folder("-w-acme-src", ws) == ("acme", Path("/w/acme"))
    assert workspace_of_folder("-w-acme-sub-x", ws) == ("inner", Path("/w/acme/sub"))
    assert workspace_of_folder("-w-acmeX", ws) is None
    assert workspace_of_folder("-w-other", ws) is None


def test_scanner_reads_only_appended_complete_lines(claude_home: Path, folders: dict[str, Path]) -> None:
    scanner = TranscriptScanner(workspaces(folders), lambda: SECRETS)
    folder = transcript_dir(folders["acme"].resolve())
    folder.mkdir(parents=True)
    session = folder / "s-1.jsonl"
    session.write_text(line("hello") + line(f"key is {ACME_KEY}"))
    first = scanner.scan_changes(session)
    assert [(f.tenant, f.line, f.rule, f.severity) for f in first] == [("acme", 2, "managed-secret:acme/api", "high")]
    assert first[0].fingerprint == hashlib.sha256(ACME_KEY.encode()).hexdigest()
    assert ACME_KEY not in repr(first)
    assert scanner.scan_changes(session) == []  # nothing new
    with session.open("a") as f:
        f.write(line("fine") + line(f"other tenant {GLOBEX_KEY}")[:-10])  # last line unfinished
    assert scanner.scan_changes(session) == []
    with session.open("a") as f:
        f.write(line(f"other tenant {GLOBEX_KEY}")[-10:])
    (found,) = scanner.scan_changes(session)
    assert (found.line, found.rule, found.severity) == (4, "cross-tenant:globex/crm", "critical")


def test_existing_transcripts_are_read_from_their_end(claude_home: Path, folders: dict[str, Path]) -> None:
    folder = transcript_dir(folders["acme"].resolve())
    folder.mkdir(parents=True)
    session = folder / "old.jsonl"
    session.write_text(line(f"old {ACME_KEY}"))
    scanner = TranscriptScanner(workspaces(folders), lambda: SECRETS)
    scanner.skip_existing()
    assert scanner.scan_changes(session) == []
    with session.open("a") as f:
        f.write(line(f"new {ACME_KEY}"))
    (found,) = scanner.scan_changes(session)
    assert found.line == 2


def test_line_cwd_decides_the_workspace(claude_home: Path, folders: dict[str, Path]) -> None:
    # A session started in acme that cd'd into globex: the line's cwd wins.
    scanner = TranscriptScanner(workspaces(folders), lambda: SECRETS)
    folder = transcript_dir(folders["acme"].resolve())
    folder.mkdir(parents=True)
    session = folder / "s.jsonl"
    session.write_text(line(f"{GLOBEX_KEY}", cwd=folders["globex"].resolve()))
    (found,) = scanner.scan_changes(session)
    assert found.tenant == "globex" and found.rule == "managed-secret:globex/crm"


def test_unmapped_projects_are_ignored(claude_home: Path, folders: dict[str, Path], tmp_path: Path) -> None:
    scanner = TranscriptScanner(workspaces(folders), lambda: SECRETS)
    folder = transcript_dir(tmp_path / "elsewhere")
    folder.mkdir(parents=True)
    (folder / "s.jsonl").write_text(line(ACME_KEY))
    assert scanner.scan_changes(folder / "s.jsonl") == []
    assert folder not in scanner.folders()


@pytest.fixture
async def watching(claude_home: Path, folders: dict[str, Path]) -> AsyncIterator[tuple[TranscriptWatcher, AlertStore]]:
    store = AlertStore(Paths.from_env().alerts_file)
    watcher = TranscriptWatcher(workspaces(folders), lambda: SECRETS, store)
    await watcher.start()
    try:
        yield watcher, store
    finally:
        await watcher.stop()


async def wait_alerts(store: AlertStore, n: int, status: str = "open", timeout: float = 20.0) -> list:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        found = store.alerts((status,))  # type: ignore[arg-type]
        if len(found) >= n:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {n} {status} alerts, have {len(store.alerts((status,)))}")  # type: ignore[arg-type]


async def test_watcher_catches_managed_secret_appended(
    watching: tuple[TranscriptWatcher, AlertStore], claude_home: Path, folders: dict[str, Path]
) -> None:
    watcher, store = watching
    # Claude Code creates the projects tree on first use, while Outloop already watches.
    folder = transcript_dir(folders["acme"].resolve())
    folder.mkdir(parents=True)
    session = folder / "0b5e-session.jsonl"
    session.write_text(line("starting"))
    await asyncio.sleep(0.3)
    with session.open("a") as f:
        f.write(line("run the script", kind="assistant"))
        f.write(line(f"DEBUG using key {ACME_KEY}\n"))
    (alert,) = await wait_alerts(store, 1)
    assert alert.tenant == "acme"
    assert alert.workspace == str(folders["acme"].resolve())
    assert alert.path == str(session)
    assert alert.line == 3
    assert alert.rule == "managed-secret:acme/api"
    assert alert.fingerprint == hashlib.sha256(ACME_KEY.encode()).hexdigest()
    assert ACME_KEY not in Paths.from_env().alerts_file.read_text()

    # A second leak in the same transcript keeps the first alert open.
    with session.open("a") as f:
        f.write(line(f"and {GLOBEX_KEY}"))
    found = await wait_alerts(store, 2)
    assert {a.rule for a in found} == {"managed-secret:acme/api", "cross-tenant:globex/crm"}
    assert {a.severity for a in found} == {"high", "critical"}

    # Deleting the transcript resolves its alerts.
    session.unlink()
    await wait_alerts(store, 2, status="resolved")
    assert watcher.health()["running"]


async def test_watcher_catches_tool_result_file(
    watching: tuple[TranscriptWatcher, AlertStore], claude_home: Path, folders: dict[str, Path]
) -> None:
    _watcher, store = watching
    results = transcript_dir(folders["globex"].resolve()) / "s-2" / "tool-results"
    results.mkdir(parents=True)
    (results / "toolu_9.txt").write_text(f"line one\nexport CRM_KEY={GLOBEX_KEY}\n")
    (alert,) = await wait_alerts(store, 1)
    assert alert.tenant == "globex" and alert.line == 2
    assert alert.path == str(results / "toolu_9.txt")


async def test_watcher_in_a_subfolder_session(
    watching: tuple[TranscriptWatcher, AlertStore], claude_home: Path, folders: dict[str, Path]
) -> None:
    _watcher, store = watching
    sub = folders["acme"].resolve() / "frontend"
    folder = transcript_dir(sub)
    folder.mkdir(parents=True)
    (folder / "s.jsonl").write_text(line(f"{ACME_KEY}"))
    (alert,) = await wait_alerts(store, 1)
    assert alert.tenant == "acme"


async def test_engine_watches_transcripts_of_mapped_workspaces(world: World, claude_home: Path) -> None:
    """The broker itself (Engine, watch=True) raises the alert and publishes it to the dashboard."""
    from broker.engine import Engine
    from broker.events import AlertOpened

    engine = Engine(world.paths)
    events: list[object] = []
    engine.subscribe(events.append)
    await engine.start(serve=False, watch=True)
    try:
        assert engine.health()["transcripts"]["running"]
        folder = transcript_dir(world.acme)
        folder.mkdir(parents=True)
        session = folder / "s.jsonl"
        session.write_text(line("hi", cwd=world.acme))
        await asyncio.sleep(0.3)
        secret = world.keys[("globex", "api")]
        with session.open("a") as f:
            f.write(line(f"curl -H 'Authorization: Bearer {secret}'", cwd=world.acme))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not any(isinstance(e, AlertOpened) for e in events) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        (opened,) = [e for e in events if isinstance(e, AlertOpened)]
        assert opened.alert.tenant == "acme"
        assert opened.alert.rule == "cross-tenant:globex/api" and opened.alert.severity == "critical"
        world.assert_clean(world.paths.alerts_file.read_text())
    finally:
        await engine.stop()


async def test_rearm_follows_a_new_workspace(
    watching: tuple[TranscriptWatcher, AlertStore], claude_home: Path, tmp_path: Path, folders: dict[str, Path]
) -> None:
    watcher, store = watching
    newcomer = (tmp_path / "clients" / "initech").resolve()
    newcomer.mkdir()
    folder = transcript_dir(newcomer)
    folder.mkdir(parents=True)
    (folder / "s.jsonl").write_text(line(f"{ACME_KEY}"))
    await asyncio.sleep(0.3)
    assert not store.alerts(("open",))  # not mapped yet
    await watcher.rearm([*workspaces(folders), ("initech", newcomer)])
    with (folder / "s.jsonl").open("a") as f:
        f.write(line(f"again {ACME_KEY}"))
    (alert,) = await wait_alerts(store, 1)
    assert alert.tenant == "initech" and alert.rule == "cross-tenant:acme/api"


@pytest.mark.parametrize("encoding", ["base64", "hex"])
def test_encoded_keys_in_transcripts_and_tool_results(
    claude_home: Path, folders: dict[str, Path], encoding: str
) -> None:
    """`cat .env | base64` printed into a session: the decoded key is found."""
    import base64

    raw = f"API_KEY={ACME_KEY}\n".encode()
    printed = base64.b64encode(raw).decode() if encoding == "base64" else raw.hex()
    scanner = TranscriptScanner(workspaces(folders), lambda: SECRETS)
    folder = transcript_dir(folders["acme"].resolve())
    (folder / "tool-results").mkdir(parents=True)
    session = folder / "s-enc.jsonl"
    session.write_text(line("hello") + line(f"output: {printed}"))
    (found,) = scanner.scan_changes(session)
    assert (found.line, found.rule) == (2, "managed-secret:acme/api")
    result = folder / "tool-results" / "r.txt"
    result.write_text(f"first\n{printed}\n")
    (found,) = scanner.scan_changes(result)
    assert (found.line, found.rule) == (2, "managed-secret:acme/api")
