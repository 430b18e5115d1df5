"""The engine as `outloop` and `outloop broker` run it: watcher on, config edited live."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support.fixtures import World
from support.upstream import Upstream

from broker.engine import Engine
from broker.events import AlertOpened, AlertResolved
from broker.leaks.rules import fake

A62 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


async def _until(predicate, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _outloop(world: World, *args: str, cwd: Path) -> None:
    ran = await asyncio.to_thread(world.outloop, *args, cwd=cwd)
    assert ran.returncode == 0, ran.stderr


async def test_workspace_added_in_another_terminal_is_watched_without_a_call(world: World) -> None:
    engine = Engine(world.paths)
    events: list[object] = []
    engine.subscribe(events.append)
    await engine.start(serve=True, watch=True)
    try:
        await engine.watcher.wait_ready()
        newcomer = world.root / "acme-newcomer"
        newcomer.mkdir()
        await _outloop(world, "workspace", "add", "acme", str(newcomer), cwd=world.root)
        # The engine notices the config change by itself and re-arms the watcher.
        await _until(lambda: engine.watcher.health().workspaces and str(newcomer) in engine.watcher.health().workspaces)
        token = "ghp_" + fake(A62, 36, seed="engine-live")
        (newcomer / ".env").write_text(f"GITHUB_TOKEN={token}\n")
        await _until(lambda: any(isinstance(e, AlertOpened) and e.alert.path == str(newcomer / ".env") for e in events))
        alert = next(e.alert for e in events if isinstance(e, AlertOpened))
        assert alert.tenant == "acme" and alert.line == 1
        assert token not in repr(alert) and token not in alert.preview
        assert token not in world.paths.alerts_file.read_text()

        (newcomer / ".env").write_text("GITHUB_TOKEN=${GITHUB_TOKEN}\n")
        await _until(lambda: any(isinstance(e, AlertResolved) for e in events))
    finally:
        await engine.stop()
    assert not world.paths.socket.exists()


async def test_broken_config_edit_keeps_the_last_good_config(world: World, upstream: Upstream) -> None:
    engine = Engine(world.paths)
    await engine.start(serve=False, watch=False)
    try:
        before = engine.config
        good = world.paths.config_file.read_bytes()
        world.paths.config_file.write_text("[tenants.acme\n")  # a torn hand edit
        rejected: list[object] = []
        engine.subscribe(rejected.append)
        await _until(lambda: any(type(e).__name__ == "ConfigRejected" for e in rejected))
        assert engine.config is before
        world.paths.config_file.write_bytes(good)
        await _until(lambda: any(type(e).__name__ == "ConfigReloaded" for e in rejected))
        assert set(engine.config.tenants) == {"acme", "globex"}
    finally:
        await engine.stop()


async def test_scan_progress_and_watch_problems_are_published(world: World, monkeypatch) -> None:
    """The engine passes the watcher's WatcherStatus events on, and its snapshot and health carry
    the same: which tenants are being scanned and how far, and what cannot be watched."""
    import re

    from broker.events import WatcherStatus
    from broker.leaks import watcher as watcher_module

    for i in range(300):
        (world.acme / f"f{i}.txt").write_text("x\n")
    for folder in ("a", "b"):
        (world.globex / folder).mkdir()
    # As if the user's other programs held all but one inotify watch.
    monkeypatch.setattr(watcher_module, "inotify_budget", lambda: 1)
    engine = Engine(world.paths)
    statuses: list = []
    engine.subscribe(lambda e: statuses.append(e.health) if isinstance(e, WatcherStatus) else None)
    await engine.start(serve=False, watch=True)
    try:
        await engine.watcher.wait_ready()
        assert (statuses[0].scanning, statuses[0].scan_kind) == (("acme", "globex"), "first scan")
        assert statuses[0].progress() == "scanning acme, globex: listing files"
        counting = [h for h in statuses if h.scanning and not h.scan_listing]
        assert counting and counting[0].scan_total >= 300
        assert re.fullmatch(r"scanning acme, globex: [\d,]+ of [\d,]+ files", counting[0].progress())
        assert not statuses[-1].scanning

        snap = engine.snapshot().watcher
        assert snap is not None and (snap.watched_folders, snap.polled_folders) == (1, 3)  # 4 folders in all
        (problem,) = snap.problems()
        assert "3 of 4 folders are polled" in problem and "sudo sysctl fs.inotify.max_user_watches=" in problem
        assert engine.health()["watcher"]["polled_folders"] == 3

        statuses.clear()
        await engine.rescan()
        assert statuses[0].progress() == "scanning acme, globex (rescan): listing files"
        assert not statuses[-1].scanning
    finally:
        await engine.stop()
