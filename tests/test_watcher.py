"""The leak watcher on real files with real watchfiles.

Each test waits for the alert event itself (generous timeout), never for a
fixed sleep.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.trees import too_long_to_open

from broker.events import AlertEvent, AlertOpened, AlertResolved
from broker.leaks import rules as L
from broker.leaks.alerts import AlertStore
from broker.leaks.watcher import LeakWatcher

WAIT = 15.0  # seconds; a shared, busy machine can be slow, a missed event is never fast


def token(seed: str) -> str:
    return "ghp_" + L.fake(L.A62, 36, seed)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.acme = tmp / "acme"
        self.globex = tmp / "globex"
        self.acme.mkdir()
        self.globex.mkdir()
        self.store = AlertStore(tmp / "state" / "alerts.jsonl")
        self.events: asyncio.Queue[AlertEvent] = asyncio.Queue()
        self.store.subscribe(self.events.put_nowait)
        self.managed: dict[tuple[str, str], str] = {}
        self.watcher = LeakWatcher([("acme", self.acme)], lambda: self.managed, self.store)

    async def next(self, kind: type, path: Path) -> AlertEvent:
        async with asyncio.timeout(WAIT):
            while True:
                event = await self.events.get()
                if isinstance(event, kind) and event.alert.path == str(path):
                    return event


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    await harness.watcher.stop()


async def test_initial_scan_then_writes_appends_and_removal(h: Harness):
    (h.acme / ".env").write_text(f"GITHUB_TOKEN={token('initial')}\n")
    await h.watcher.start()
    opened = await h.next(AlertOpened, h.acme / ".env")
    assert (opened.alert.tenant, opened.alert.line) == ("acme", 1)

    log = h.acme / "app.log"
    log.write_text("started\n")
    with log.open("a") as f:  # an append
        f.write(f"using token {token('append')}\n")
    assert (await h.next(AlertOpened, log)).alert.line == 2

    (h.acme / ".env").write_text("GITHUB_TOKEN=\n")
    await h.next(AlertResolved, h.acme / ".env")
    log.unlink()
    await h.next(AlertResolved, log)


async def test_files_in_brand_new_nested_folders(h: Harness):
    await h.watcher.start()
    for i in range(5):
        deep = h.acme / f"new{i}" / "a" / "b"
        deep.mkdir(parents=True)
        (deep / ".env").write_text(f"T={token(f'deep{i}')}\n")
        await h.next(AlertOpened, deep / ".env")


async def test_save_by_rename(h: Harness):
    target = h.acme / "settings.py"
    target.write_text("DEBUG = True\n")
    await h.watcher.start()
    await h.watcher.wait_ready()
    tmp = h.acme / ".settings.py.tmp"
    tmp.write_text(f"TOKEN = '{token('rename')}'\n")
    os.replace(tmp, target)
    await h.next(AlertOpened, target)


async def test_skipped_folders_are_not_watched(h: Harness):
    await h.watcher.start()
    await h.watcher.wait_ready()
    (h.acme / "node_modules" / "pkg").mkdir(parents=True)
    (h.acme / "node_modules" / "pkg" / "index.js").write_text(f"k='{token('nm')}'\n")
    marker = h.acme / "marker.env"
    marker.write_text(f"T={token('marker')}\n")
    await h.next(AlertOpened, marker)  # written after: once it is in, the other was seen too
    assert [a.path for a in h.store.alerts()] == [str(marker)]


async def test_managed_secret_cross_tenant_and_rearm(h: Harness):
    secret = "acme-" + L.fake(L.A62, 40, "managed")
    h.managed = {("acme", "billing"): secret}
    await h.watcher.start()
    await h.watcher.wait_ready()
    own = h.acme / "notes.md"
    own.write_text(f"the billing key is {secret}\n")
    assert (await h.next(AlertOpened, own)).alert.rule == "managed-secret:acme/billing"

    await h.watcher.rearm([("acme", h.acme), ("globex", h.globex)])
    leaked = h.globex / "config.json"
    leaked.write_text(f'{{"key": "{secret}"}}\n')
    alert = (await h.next(AlertOpened, leaked)).alert
    assert (alert.rule, alert.severity, alert.tenant) == ("cross-tenant:acme/billing", "critical", "globex")

    await h.watcher.rearm([("globex", h.globex)])  # acme no longer watched
    await h.watcher.wait_ready()
    assert h.watcher.health().workspaces == (str(h.globex),)


async def test_health_and_clean_stop(h: Harness, tmp_path: Path):
    missing = tmp_path / "gone"
    h.watcher = LeakWatcher([("acme", h.acme), ("x", missing)], lambda: {}, h.store)
    (h.acme / "a.txt").write_text("hello\n")
    await h.watcher.start()
    await h.watcher.wait_ready()
    health = h.watcher.health()
    assert health.running and health.initial_scan_done and health.files_scanned == 1
    assert health.missing == (str(missing),) and "not found" in (health.last_error or "")
    await h.watcher.stop()
    assert not h.watcher.health().running
    await h.watcher.stop()  # twice is fine


async def test_event_output_never_holds_the_secret(h: Harness):
    value = token("no-output")
    (h.acme / ".env").write_text(f"T={value}\n")
    await h.watcher.start()
    event = await h.next(AlertOpened, h.acme / ".env")
    dump = repr(event) + repr(h.watcher) + repr(h.watcher.health())
    dump += (h.store.path).read_text()
    assert value not in dump and value[4:-2] not in dump


def _inotify_watches_of_this_process() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


async def test_no_watch_inside_skipped_or_gitignored_folders(h: Harness):
    for folder in ("src/app", "node_modules/a/b", ".venv/lib/x", ".git/objects/ab", "generated/deep", "src/tmp/cache"):
        (h.acme / folder).mkdir(parents=True)
    (h.acme / ".gitignore").write_text("/generated/\ntmp/\n!keep.txt\n")
    h.watcher = LeakWatcher([("acme", h.acme)], lambda: {}, h.store, scan_ignore={"acme": ["src/app"]})
    before = _inotify_watches_of_this_process()
    await h.watcher.start()
    await h.watcher.wait_ready()
    health = h.watcher.health()
    # The root and src/ only: src/app by scan_ignore, src/tmp and generated/ by .gitignore.
    assert (health.watched_folders, health.polled_folders, health.warning) == (2, 0, None)
    assert _inotify_watches_of_this_process() - before == 2
    (h.acme / "generated" / "deep" / ".env").write_text(f"T={token('gen')}\n")
    marker = h.acme / "src" / "marker.env"
    marker.write_text(f"T={token('marker2')}\n")
    await h.next(AlertOpened, marker)
    assert [a.path for a in h.store.alerts()] == [str(marker)]


async def test_folders_past_the_inotify_budget_are_polled_and_said_so(h: Harness):
    for i in range(4):
        (h.acme / f"pkg{i}").mkdir()
    h.watcher = LeakWatcher([("acme", h.acme)], lambda: {}, h.store, watch_budget=lambda: 2)
    await h.watcher.start()
    await h.watcher.wait_ready()
    health = h.watcher.health()
    assert (health.watched_folders, health.polled_folders, health.watch_budget) == (2, 3, 2)
    assert health.warning and "max_user_watches" in health.warning
    leaked = h.acme / "pkg3" / ".env"  # the deepest-last folder: one of the polled ones
    leaked.write_text(f"T={token('polled')}\n")
    await h.next(AlertOpened, leaked)


async def test_rearm_scans_only_the_added_workspace(h: Harness):
    for i in range(3):
        (h.acme / f"f{i}.txt").write_text("x\n")
    (h.globex / ".env").write_text(f"T={token('added')}\n")
    await h.watcher.start()
    await h.watcher.wait_ready()
    assert h.watcher.health().files_scanned == 3
    await h.watcher.rearm([("acme", h.acme), ("globex", h.globex)])
    assert h.watcher.health().files_scanned == 4  # globex's one file, not acme's three again
    assert (await h.next(AlertOpened, h.globex / ".env")).alert.tenant == "globex"
    new = h.acme / "later.env"  # acme stayed watched through the re-arm
    new.write_text(f"T={token('later')}\n")
    await h.next(AlertOpened, new)


def _count_watches() -> int:
    return _inotify_watches_of_this_process()


async def _until(predicate, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_no_watch_inside_folders_a_nested_gitignore_ignores(h: Harness):
    for folder in ("src/gen/deep", "src/lib", "other/gen", "pkg/a", "pkg/keep"):
        (h.acme / folder).mkdir(parents=True)
    (h.acme / "src" / ".gitignore").write_text("gen/\n")  # src/gen and src/lib/gen, not other/gen
    (h.acme / "pkg" / ".gitignore").write_text("*\n!.gitignore\n!keep/\n")
    before = _count_watches()
    await h.watcher.start()
    await h.watcher.wait_ready()
    # ., src, src/lib, other, other/gen, pkg, pkg/keep
    assert h.watcher.health().watched_folders == 7
    assert _count_watches() - before == 7
    (h.acme / "src" / "gen" / "deep" / ".env").write_text(f"T={token('ignored-deep')}\n")
    (h.acme / "src" / "lib" / "gen").mkdir()  # made later: judged by src/.gitignore too
    await asyncio.sleep(0.5)
    (h.acme / "src" / "lib" / "gen" / ".env").write_text(f"T={token('ignored-new')}\n")
    marker = h.acme / "other" / "gen" / "marker.env"
    marker.write_text(f"T={token('nested-marker')}\n")
    await h.next(AlertOpened, marker)
    assert [a.path for a in h.store.alerts()] == [str(marker)]
    assert h.watcher.health().watched_folders == 7


async def test_an_edited_gitignore_moves_the_watch_set(h: Harness):
    (h.acme / "src" / "gen").mkdir(parents=True)
    leaked = h.acme / "src" / "gen" / ".env"
    leaked.write_text(f"T={token('moves')}\n")
    await h.watcher.start()
    await h.next(AlertOpened, leaked)
    assert h.watcher.health().watched_folders == 3
    seen: list[object] = []
    h.watcher.subscribe(seen.append)
    (h.acme / "src" / ".gitignore").write_text("gen/\n")
    await _until(lambda: h.watcher.health().watched_folders == 2)
    await _until(lambda: seen and not seen[-1].health.scanning)
    meanwhile = h.acme / "src" / "gen" / "meanwhile.env"  # not watched now: not seen
    meanwhile.write_text(f"T={token('moves-meanwhile')}\n")
    marker = h.acme / "src" / "marker.env"
    marker.write_text(f"T={token('moves-marker')}\n")
    await h.next(AlertOpened, marker)
    assert str(meanwhile) not in {a.path for a in h.store.alerts()}
    assert str(leaked) in {a.path for a in h.store.alerts()}  # still there: the file still holds it
    (h.acme / "src" / ".gitignore").write_text("# nothing ignored\n")
    await h.next(AlertOpened, meanwhile)  # entered again: scanned, and watched
    assert h.watcher.health().watched_folders == 3
    later = h.acme / "src" / "gen" / "later.env"
    later.write_text(f"T={token('moves-later')}\n")
    await h.next(AlertOpened, later)


async def test_scan_progress_reaches_subscribers(h: Harness):
    from broker.events import WatcherStatus

    for i in range(700):
        (h.acme / f"f{i}.txt").write_text("x\n")
    seen: list[WatcherStatus] = []
    h.watcher.subscribe(seen.append)
    await h.watcher.start()
    await h.watcher.wait_ready()
    first, last = seen[0].health, seen[-1].health
    assert (first.scanning, first.scan_kind, first.scan_listing) == (("acme",), "first scan", True)
    assert first.progress() == "scanning acme: listing files"
    shown = [s.health.progress() for s in seen]
    assert "scanning acme: 0 of 700 files" in shown
    done = [s.health.scan_done for s in seen if s.health.scanning]
    assert done == sorted(done)
    assert (last.scanning, last.progress(), last.files_scanned) == ((), "", 700)

    seen.clear()
    await h.watcher.rescan()
    assert seen[0].health.progress() == "scanning acme (rescan): listing files"
    assert "scanning acme (rescan): 0 of 700 files" in [s.health.progress() for s in seen]
    assert seen[-1].health.scanning == ()


async def test_a_folder_that_cannot_be_read_is_named_in_health(h: Harness):
    deep = too_long_to_open(h.acme / "deep")
    seen = []
    h.watcher.subscribe(seen.append)
    await h.watcher.start()
    await h.watcher.wait_ready()
    health = h.watcher.health()
    assert health.unreadable_count == 1
    assert health.unreadable == (f"{deep} (file name too long)",)
    (problem,) = health.problems()
    assert problem.startswith("1 folder(s) could not be read, so they are neither scanned nor watched: ")
    assert "scan_ignore" in problem
    assert any(s.health.unreadable_count == 1 for s in seen)  # subscribers heard of it too
    marker = h.acme / "deep" / "marker.env"  # the rest is watched as ever
    marker.write_text(f"T={token('unreadable-marker')}\n")
    await h.next(AlertOpened, marker)
