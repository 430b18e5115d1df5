"""What the operator reads of the leak watcher while it scans, and when it cannot watch everything:
the dashboard (the pilot reading the header, the alerts pane and the banner) and `outloop doctor`,
against a real engine and a real watcher on real files."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from support.fixtures import BrokerThread
from support.trees import too_long_to_open

from broker.engine import Engine
from broker.events import Event, WatcherStatus
from broker.leaks import watcher as watcher_module
from broker.leaks.rules import fake
from outloop_tui.app import OutloopApp
from outloop_tui.widgets.alerts import AlertsPane
from outloop_tui.widgets.header import Banner, StatusHeader

if TYPE_CHECKING:
    from support.fixtures import World

A62 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


async def until(pilot: Any, predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.03)


def text(widget: Any) -> str:
    return str(widget.content)


class HoldTheScan:
    """An engine subscriber that, once a rescan has counted the files, keeps every worker thread
    of the loop busy until released: the scan cannot read a file meanwhile, so what the dashboard
    shows of a running scan can be looked at without a race."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding: list[asyncio.Future[Any]] = []

    def __call__(self, event: Event) -> None:
        health = event.health if isinstance(event, WatcherStatus) else None
        if health is None or self.holding or health.scan_kind != "rescan":
            return
        if health.scanning and not health.scan_listing:
            loop = asyncio.get_running_loop()
            # More than the default executor has threads: the scan's batches queue behind them.
            self.holding += [loop.run_in_executor(None, self.release.wait) for _ in range(64)]


@pytest.fixture
def low_inotify_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the user's other programs held all but one of the inotify watches."""
    monkeypatch.setattr(watcher_module, "inotify_budget", lambda: 1)


async def test_the_dashboard_shows_a_running_scan_then_its_alerts(world: World) -> None:
    for i in range(300):
        (world.acme / f"f{i}.txt").write_text("nothing here\n")
    token = "ghp_" + fake(A62, 36, seed="tui-scan")
    (world.globex / ".env").write_text(f"GITHUB_TOKEN={token}\n")
    engine = Engine(world.paths)
    hold = HoldTheScan()
    engine.subscribe(hold)
    app = OutloopApp(engine, watch=True)
    try:
        async with app.run_test(size=(160, 48)) as pilot:
            header = app.dashboard.query_one(StatusHeader)
            pane = app.dashboard.query_one(AlertsPane)
            await until(pilot, lambda: app.started and engine.watcher.health().initial_scan_done, "the first scan")
            await until(pilot, lambda: "1 alerts" in text(header) and "scanning" not in text(header), "its alert")
            await pilot.press("r")  # rescan: this one is held once it has counted the files
            await until(pilot, lambda: hold.holding, "the files to be counted")
            # 300 files in acme, one in globex, none read yet: not a bare count of alerts.
            expected = "scanning acme, globex (rescan): 0 of 301 files"
            await until(pilot, lambda: "1 alerts  (scanning 0%)" in text(header), "the header")
            assert str(pane.border_subtitle) == f"{expected} · alerts appear as they are found"
            hold.release.set()
            await until(pilot, lambda: "scanning" not in text(header), "the end of the rescan")
            assert "1 alerts" in text(header) and "scanning" not in str(pane.border_subtitle)
            assert token not in text(header) + str(pane.border_subtitle)
    finally:
        hold.release.set()


async def test_the_dashboard_says_what_is_not_watched_and_how_to_fix_it(world: World, low_inotify_limit: None) -> None:
    for folder in ("src", "docs"):
        (world.acme / folder).mkdir()
    app = OutloopApp(Engine(world.paths), watch=True)
    async with app.run_test(size=(160, 48)) as pilot:
        banner = app.dashboard.query_one("#banner", Banner)
        await until(pilot, lambda: "inotify" in text(banner), "the banner")
        shown = text(banner)
        # acme, acme/src, acme/docs and globex: one watched, three polled.
        assert shown.startswith("Leak watcher: inotify watch limit too low: 3 of 4 folders are polled")
        assert "sudo sysctl fs.inotify.max_user_watches=524288" in shown
        assert banner.display


def _held_rescan(thread: BrokerThread, hold: HoldTheScan) -> concurrent.futures.Future[bool]:
    """Start a rescan on the broker's loop and return once `hold` holds it, files counted."""
    thread.run(thread.engine.watcher.wait_ready())
    thread.call(thread.engine.subscribe, hold)
    rescan = asyncio.run_coroutine_threadsafe(thread.engine.rescan(), thread.loop)
    deadline = time.monotonic() + 20
    while not hold.holding:
        assert time.monotonic() < deadline, "the rescan never counted its files"
        time.sleep(0.02)
    return rescan


def test_doctor_reports_a_running_scan_and_the_polled_folders(world: World, low_inotify_limit: None) -> None:
    for folder in ("src", "docs"):
        (world.acme / folder).mkdir()
    for i in range(20):
        (world.acme / "src" / f"m{i}.py").write_text("x = 1\n")
    hold = HoldTheScan()
    thread = BrokerThread(world.paths, watch=True).start()
    try:
        rescan = _held_rescan(thread, hold)
        ran = world.outloop("doctor")
        assert ran.returncode == 1, ran.stdout + ran.stderr
        lines = ran.stdout.splitlines()
        assert "[note] watcher: scanning acme, globex (rescan): 0 of 20 files" in lines
        # acme, acme/src, acme/docs and globex: one watched, three polled.
        assert "[FAIL] watcher: inotify watch limit too low: 3 of 4 folders are polled" in ran.stdout
        assert "raise it with `sudo sysctl fs.inotify.max_user_watches=524288`" in ran.stdout

        as_json = json.loads(world.outloop("doctor", "--json").stdout)
        watcher = as_json["watcher"]
        assert (watcher["scanning"], watcher["scan_kind"], watcher["scan_total"]) == (["acme", "globex"], "rescan", 20)
        assert (watcher["watched_folders"], watcher["polled_folders"]) == (1, 3)
        assert any(row["status"] == "fail" and "3 of 4 folders are polled" in row["what"] for row in as_json["checks"])

        hold.release.set()
        rescan.result(30)
        assert "scanning" not in world.outloop("doctor").stdout
    finally:
        hold.release.set()
        thread.stop()


def test_doctor_names_a_folder_that_cannot_be_read(world: World) -> None:
    deep = too_long_to_open(world.acme / "deep")
    thread = BrokerThread(world.paths, watch=True).start()
    try:
        thread.run(thread.engine.watcher.wait_ready())
        ran = world.outloop("doctor")
        assert ran.returncode == 1, ran.stdout + ran.stderr
        expected = (
            f"watcher: 1 folder(s) could not be read, so they are neither scanned nor watched: "
            f"{deep} (file name too long); fix their permissions or add them to the tenant's scan_ignore"
        )
        assert f"[FAIL] {expected}" in ran.stdout.splitlines()
        as_json = json.loads(world.outloop("doctor", "--json").stdout)
        assert {"status": "fail", "what": expected} in as_json["checks"]
        assert as_json["watcher"]["unreadable"] == [f"{deep} (file name too long)"]
    finally:
        thread.stop()
