"""Claude Code's task outputs (background Bash, Monitor): a managed secret or a provider key
appended to `<tmp>/claude-<uid>/<project>/<session>/tasks/<id>.output` becomes an alert for
the workspace's tenant. Real files, real watchfiles, the real alert store; the layout is the
one Claude Code 2.1.332 writes (tests/test_claude_real.py runs the binary itself)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.fixtures import World

from broker.claude import tasks
from broker.claude.tasks import GrowingFiles, claude_tmp_roots
from broker.claude.transcripts import TranscriptScanner, TranscriptWatcher, project_folder_name, transcript_dir
from broker.leaks.alerts import AlertStore
from broker.paths import Paths

ACME_KEY = "sk-acme-taskoutput-Zq9+Tr4Lw7Hq2Pk81"
GLOBEX_KEY = "gx-globex-taskoutput+Key8Wm-Rt5Ns3"
SECRETS = {("acme", "api"): ACME_KEY, ("globex", "crm"): GLOBEX_KEY}
SESSION = "8c9e7ad6-e870-42a2-8785-aecbb130cce7"


@pytest.fixture
def claude_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "claude-config"
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(home))
    return home


@pytest.fixture
def task_root(tmp_path: Path) -> Path:
    """What CLAUDE_CODE_TMPDIR=<tmp_path>/cctmp gives: <tmp>/claude-<uid>."""
    return tmp_path / "cctmp" / f"claude-{os.getuid()}"


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    out = {"acme": tmp_path / "clients" / "acme.web", "globex": tmp_path / "clients" / "globex"}
    for p in out.values():
        p.mkdir(parents=True)
    return {t: p.resolve() for t, p in out.items()}


def workspaces(folders: dict[str, Path]) -> list[tuple[str, Path]]:
    return list(folders.items())


def output_file(task_root: Path, project: Path, name: str = "bc0k6c1o3", session: str = SESSION) -> Path:
    folder = task_root / project_folder_name(project) / session / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.output"


def append(path: Path, text: str | bytes) -> None:
    with path.open("ab") as f:
        f.write(text.encode() if isinstance(text, str) else text)


def scanner_for(folders: dict[str, Path], task_root: Path) -> TranscriptScanner:
    return TranscriptScanner(workspaces(folders), lambda: SECRETS, task_roots=[task_root])


def test_the_folders_claude_code_may_use() -> None:
    uid = os.getuid()
    assert claude_tmp_roots({}) == [Path(f"/tmp/claude-{uid}")]
    roots = claude_tmp_roots({"TMPDIR": "/var/tmp", "CLAUDE_CODE_TMPDIR": "/srv/cc"}, "/data/cc")
    assert roots == [Path(f"/{p}/claude-{uid}") for p in ("tmp", "var/tmp", "srv/cc", "data/cc")]
    # Repeats are followed once; the default is always there.
    assert claude_tmp_roots({"TMPDIR": "/tmp/", "CLAUDE_CODE_TMPDIR": "/tmp"}) == [Path(f"/tmp/claude-{uid}")]


def test_an_output_is_read_as_it_grows_never_again_from_its_start(
    claude_home: Path, folders: dict[str, Path], task_root: Path
) -> None:
    scanner = scanner_for(folders, task_root)
    out = output_file(task_root, folders["acme"])
    out.write_text("starting the build\n")
    assert scanner.scan_changes(out) == []
    append(out, f"step 1\nDEBUG key={ACME_KEY}\n")
    (found,) = scanner.scan_changes(out)
    assert (found.tenant, found.line, found.rule, found.severity) == ("acme", 3, "managed-secret:acme/api", "high")
    assert found.fingerprint == hashlib.sha256(ACME_KEY.encode()).hexdigest()
    assert found.path == out and ACME_KEY not in repr(found)
    assert scanner.scan_changes(out) == []  # nothing new, nothing reported twice
    # What was read is not read again: a key written into the first line in place (same
    # inode, same size) is not seen; what comes after it is.
    with out.open("r+b") as f:
        f.write(f"{GLOBEX_KEY}\n".encode()[: len("starting the build\n")])
    append(out, "step 2\n")
    assert scanner.scan_changes(out) == []
    append(out, f"and {GLOBEX_KEY}\n")
    (found,) = scanner.scan_changes(out)
    assert (found.line, found.rule, found.severity) == (5, "cross-tenant:globex/crm", "critical")


def test_a_key_written_in_two_pieces_is_found_once(
    claude_home: Path, folders: dict[str, Path], task_root: Path
) -> None:
    scanner = scanner_for(folders, task_root)
    out = output_file(task_root, folders["acme"])
    out.write_text("progress 10%\rprogress 20%\r")  # no newline yet
    assert scanner.scan_changes(out) == []
    append(out, f"token {ACME_KEY[:12]}")
    assert scanner.scan_changes(out) == []
    append(out, ACME_KEY[12:])  # the line is still unfinished: scanned anyway
    (found,) = scanner.scan_changes(out)
    assert found.line == 1
    append(out, "\nmore\n")
    assert scanner.scan_changes(out) == []


def test_a_large_output_is_read_in_bounded_blocks(
    claude_home: Path, folders: dict[str, Path], task_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys across a block boundary, inside one line longer than a block, and after 28 blocks:
    all found, with the file's line numbers, in memory of a few blocks, not of the file."""
    monkeypatch.setattr(tasks, "BLOCK", 256 * 1024)  # a quarter of the real block: the same code, faster
    scanner = scanner_for(folders, task_root)
    warm = output_file(task_root, folders["acme"], name="warm")
    warm.write_text(f"{ACME_KEY}\n")
    assert scanner.scan_changes(warm)  # the rules and the secrets are ready before measuring
    out = output_file(task_root, folders["acme"])
    filler = b"line of build output\n"
    with out.open("wb") as f:
        f.write(filler * (tasks.BLOCK // len(filler)))  # ends a little before the first boundary
        at_boundary = f.tell()
        pad = tasks.BLOCK - at_boundary - 10  # the key starts 10 bytes before the boundary
        f.write(b"x" * pad + ACME_KEY.encode() + b"\n")
        f.write(b"y" * (3 * tasks.BLOCK) + b" " + GLOBEX_KEY.encode() + b" z\n")  # one line of 3 MiB
        for _ in range(24):
            f.write(filler * (tasks.BLOCK // len(filler)))
        f.write(b"tail " + ACME_KEY.encode()[::-1] + b"\n")  # not a key
    size = out.stat().st_size
    tracemalloc.start()
    try:
        found = scanner.scan_changes(out)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    lines = filler.count(b"\n") * (tasks.BLOCK // len(filler))
    assert [(f.rule, f.line) for f in found] == [
        ("managed-secret:acme/api", lines + 1),
        ("cross-tenant:globex/crm", lines + 2),
    ]
    assert size > 25 * tasks.BLOCK
    assert peak < 12 * tasks.BLOCK, peak  # a block, its text and the scanners work on it (~9): not the file


@pytest.mark.parametrize("encoding", ["base64", "hex", "base64-wrapped"])
def test_encoded_keys_in_an_output(claude_home: Path, folders: dict[str, Path], task_root: Path, encoding: str) -> None:
    """`cat .env | base64` run in the background: the decoded key is found."""
    raw = f"API_KEY={ACME_KEY}\n".encode() * 3
    if encoding == "hex":
        printed = raw.hex()
    elif encoding == "base64":
        printed = base64.b64encode(raw).decode()
    else:
        printed = base64.encodebytes(raw).decode()  # 76 characters a line
    scanner = scanner_for(folders, task_root)
    out = output_file(task_root, folders["acme"])
    out.write_text(f"first\n{printed}\n")
    (found,) = scanner.scan_changes(out)
    assert (found.line, found.rule) == (2, "managed-secret:acme/api")


def test_the_tenant_is_the_project_folders_made_exact_by_the_sessions_transcript(
    claude_home: Path, tmp_path: Path, task_root: Path
) -> None:
    """'/w/b-c' and '/w/b/c' share a folder name: the transcript's cwd decides."""
    dashed, nested = tmp_path / "w" / "b-c", tmp_path / "w" / "b" / "c"
    for p in (dashed, nested):
        p.mkdir(parents=True)
    dashed, nested = dashed.resolve(), nested.resolve()
    assert project_folder_name(dashed) == project_folder_name(nested)
    scanner = TranscriptScanner([("acme", dashed), ("globex", nested)], lambda: SECRETS, task_roots=[task_root])
    transcripts = transcript_dir(nested)
    transcripts.mkdir(parents=True)
    (transcripts / f"{SESSION}.jsonl").write_text(
        json.dumps({"type": "user", "cwd": str(nested), "sessionId": SESSION}) + "\n"
    )
    out = output_file(task_root, nested)
    out.write_text(f"{GLOBEX_KEY}\n")
    (found,) = scanner.scan_changes(out)
    assert (found.tenant, found.workspace, found.rule) == ("globex", nested, "managed-secret:globex/crm")
    # Without a transcript the folder name decides, as for transcripts (here either workspace).
    other = output_file(task_root, nested, session="no-transcript")
    other.write_text(f"{GLOBEX_KEY}\n")
    (found,) = scanner.scan_changes(other)
    assert found.tenant in ("acme", "globex")
    # The transcript's cwd in no workspace: nobody's output, whatever its folder's name says.
    only_acme = TranscriptScanner([("acme", dashed)], lambda: SECRETS, task_roots=[task_root])
    out = output_file(task_root, nested, name="again")
    out.write_text(f"{GLOBEX_KEY}\n")
    assert only_acme.scan_changes(out) == []
    # A session in a subfolder of a workspace is the workspace's.
    sub = dashed / "frontend"
    sub.mkdir()
    out = output_file(task_root, sub)
    out.write_text(f"{ACME_KEY}\n")
    (found,) = scanner.scan_changes(out)
    assert found.tenant == "acme"


def test_what_is_not_a_plain_file_of_this_user_is_not_followed(
    claude_home: Path, folders: dict[str, Path], task_root: Path, tmp_path: Path
) -> None:
    scanner = scanner_for(folders, task_root)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text(f"{ACME_KEY}\n")
    link = output_file(task_root, folders["acme"], name="link")
    link.symlink_to(elsewhere)
    assert scanner.scan_changes(link) == []
    fifo = output_file(task_root, folders["acme"], name="fifo")
    os.mkfifo(fifo)
    assert scanner.scan_changes(fifo) == []  # and it does not block
    binary = output_file(task_root, folders["acme"], name="core")
    binary.write_bytes(b"\x7fELF\0\0\0" + ACME_KEY.encode() + b"\n")
    assert scanner.scan_changes(binary) == []
    # An unmapped project is not followed either.
    stray = output_file(task_root, tmp_path / "unmapped")
    stray.write_text(f"{ACME_KEY}\n")
    assert scanner.scan_changes(stray) == []


def test_a_replaced_or_truncated_output_is_read_again(
    claude_home: Path, folders: dict[str, Path], task_root: Path
) -> None:
    files = GrowingFiles()
    out = output_file(task_root, folders["acme"])
    out.write_text("one\ntwo\n")
    assert [w.text for w in files.windows(out)] == ["one\ntwo\n"]
    assert list(files.windows(out)) == []
    out.write_text("new\n")  # truncated (a task id reused)
    assert [(w.text, w.first_line) for w in files.windows(out)] == [("new\n", 1)]
    append(out, "next\n")
    assert [(w.text, w.first_line) for w in files.windows(out)] == [("new\nnext\n", 1)]  # with what came before
    files.skip(out)
    assert list(files.windows(out)) == []


@pytest.fixture
async def watching(
    claude_home: Path, folders: dict[str, Path], task_root: Path
) -> AsyncIterator[tuple[TranscriptWatcher, AlertStore]]:
    store = AlertStore(Paths.from_env().alerts_file)
    watcher = TranscriptWatcher(workspaces(folders), lambda: SECRETS, store, task_roots=[task_root])
    await watcher.start()
    await watcher.ready()
    try:
        yield watcher, store
    finally:
        await watcher.stop()


async def wait_alerts(store: AlertStore, n: int, status: str = "open", timeout: float = 60.0) -> list:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        found = store.alerts((status,))  # type: ignore[arg-type]
        if len(found) >= n:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {n} {status} alerts, have {len(store.alerts((status,)))}")  # type: ignore[arg-type]


async def test_the_watcher_follows_outputs_in_a_folder_claude_code_creates_later(
    watching: tuple[TranscriptWatcher, AlertStore], folders: dict[str, Path], task_root: Path
) -> None:
    """The task folder does not exist when the broker starts (Claude Code makes it on the first
    background task): the watcher waits in the nearest parent, then follows the files."""
    watcher, store = watching
    assert not task_root.exists()
    out = output_file(task_root, folders["acme"])
    out.write_text(f"the token is {ACME_KEY}\n")
    (alert,) = await wait_alerts(store, 1)
    assert (alert.tenant, alert.workspace, alert.path) == ("acme", str(folders["acme"]), str(out))
    assert (alert.line, alert.rule) == (1, "managed-secret:acme/api")
    assert ACME_KEY not in Paths.from_env().alerts_file.read_text()
    # A Monitor appending events later: a second alert, the first stays open.
    monitor = output_file(task_root, folders["acme"], name="brkkgv48a")
    monitor.write_text("event 1\n")
    append(monitor, f"event 2 {GLOBEX_KEY}\n")
    found = await wait_alerts(store, 2)
    assert {(a.path, a.line, a.severity) for a in found} == {(str(out), 1, "high"), (str(monitor), 2, "critical")}
    # Deleting an output resolves its alerts.
    out.unlink()
    (resolved,) = await wait_alerts(store, 1, status="resolved")
    assert resolved.path == str(out)
    health = watcher.health()
    assert health["running"] and health["task_roots"] == [str(task_root)]


async def test_outputs_that_exist_at_start_are_followed_from_their_end(
    claude_home: Path, folders: dict[str, Path], task_root: Path
) -> None:
    out = output_file(task_root, folders["globex"])
    out.write_text(f"old {GLOBEX_KEY}\n")
    store = AlertStore(Paths.from_env().alerts_file)
    watcher = TranscriptWatcher(workspaces(folders), lambda: SECRETS, store, task_roots=[task_root])
    await watcher.start()
    try:
        await watcher.ready()
        append(out, f"new {GLOBEX_KEY} and {ACME_KEY}\n")
        found = await wait_alerts(store, 2)
        assert {(a.tenant, a.line, a.rule) for a in found} == {
            ("globex", 2, "managed-secret:globex/crm"),
            ("globex", 2, "cross-tenant:acme/api"),
        }
    finally:
        await watcher.stop()


async def test_a_task_folder_of_another_user_or_a_symlink_is_not_followed(
    claude_home: Path, folders: dict[str, Path], task_root: Path, tmp_path: Path
) -> None:
    real = tmp_path / "planted"
    real.mkdir()
    task_root.parent.mkdir(parents=True)
    task_root.symlink_to(real)
    scanner = scanner_for(folders, task_root)
    assert not scanner.followable(task_root)
    out = real / project_folder_name(folders["acme"]) / SESSION / "tasks" / "x.output"
    out.parent.mkdir(parents=True)
    out.write_text(f"{ACME_KEY}\n")
    assert scanner.folders(task_root) == []


async def test_the_engine_follows_claude_code_tmpdir_from_its_environment(
    world: World, claude_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker itself (Engine, watch=True), with CLAUDE_CODE_TMPDIR in its environment,
    raises the alert with the tenant and publishes it to the dashboard."""
    from broker.engine import Engine
    from broker.events import AlertOpened

    monkeypatch.setenv("CLAUDE_CODE_TMPDIR", str(tmp_path / "cctmp"))
    engine = Engine(world.paths)
    events: list[object] = []
    engine.subscribe(events.append)
    await engine.start(serve=False, watch=True)
    try:
        root = tmp_path / "cctmp" / f"claude-{os.getuid()}"
        assert str(root) in engine.health()["transcripts"]["task_roots"]
        out = output_file(root, world.acme)
        secret = world.keys[("globex", "api")]
        out.write_text(f"curl -H 'Authorization: Bearer {secret}'\n")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not any(isinstance(e, AlertOpened) for e in events) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        (opened,) = [e for e in events if isinstance(e, AlertOpened)]
        assert (opened.alert.tenant, opened.alert.path) == ("acme", str(out))
        assert opened.alert.rule == "cross-tenant:globex/api" and opened.alert.severity == "critical"
        world.assert_clean(world.paths.alerts_file.read_text())
    finally:
        await engine.stop()


def test_the_config_names_a_tmpdir_to_follow(world: World, tmp_path: Path) -> None:
    from broker.config import ConfigError, load_config

    world.configure(claude_code_tmpdir=str(tmp_path / "cc"))
    assert load_config(world.paths).broker.claude_code_tmpdir == str(tmp_path / "cc")
    with pytest.raises(ConfigError, match="claude_code_tmpdir"):
        world.configure(claude_code_tmpdir="relative/dir")
