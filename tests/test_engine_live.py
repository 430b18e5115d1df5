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
