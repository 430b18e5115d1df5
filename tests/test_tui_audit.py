"""The audit pane: opens with what the log holds, follows after a filter, counts what arrives below."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from support import tui_sample
from textual.widgets import Input, Log

from broker.audit import AuditLog
from broker.events import AuditRecorded
from outloop_tui.widgets.audit import AuditPane


@pytest.fixture(autouse=True)
def sample_root() -> Iterator[None]:
    with tui_sample.exclusive():  # the sample folder is shared by concurrent test runs
        yield


def record(i: int, tenant: str = "acme") -> dict[str, Any]:
    return {
        "ts": "2026-01-01T12:00:00.000Z",
        "event": "attempt",
        "tenant": tenant,
        "credential": "github",
        "method": "GET",
        "path": f"/repos/{tenant}/web/pulls/{i}",
        "decision": "allow",
        "approver": "policy",
    }


def lines(app: Any) -> list[str]:
    return [str(line) for line in app.screen.query_one("#audit-log", Log).lines]


async def test_opens_with_the_records_already_in_the_log() -> None:
    paths = tui_sample.build()
    log = AuditLog(paths.audit_dir)
    await log.open()
    for i in range(3):
        await log.record({k: v for k, v in record(i).items() if k != "ts"})
    await log.close()
    app = tui_sample.make_app(paths)
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app, audit=False)
        await pilot.pause(0.2)
        shown = lines(app)
        assert [i for i in range(3) if any(f"/pulls/{i}" in line for line in shown)] == [0, 1, 2]


async def test_follows_the_stream_after_a_filter_and_counts_what_arrives_below() -> None:
    app = tui_sample.make_app(tui_sample.build())
    async with app.run_test(size=(120, 40)) as pilot:
        await tui_sample.ready(app, audit=False)
        for i in range(200):
            app.bridge(AuditRecorded(record(i, "acme" if i % 2 else "globex")))
        await pilot.pause(0.3)
        log = app.screen.query_one("#audit-log", Log)
        assert log.is_vertical_scroll_end

        # `/`, a filter, then Esc: the pane shows everything again and still follows.
        await pilot.press("slash")
        app.screen.query_one("#audit-filter", Input).value = "tenant:acme"
        await pilot.pause(0.2)
        assert all("acme" in line for line in lines(app))
        await pilot.press("escape")
        await pilot.pause(0.2)
        app.bridge(AuditRecorded(record(999)))
        await pilot.pause(0.3)
        assert "/pulls/999" in lines(app)[-1]
        assert log.is_vertical_scroll_end
        pane = app.screen.query_one(AuditPane)
        assert pane.unseen == 0

        # Scrolled up, new lines are counted, not scrolled to.
        log.scroll_home(animate=False, immediate=True)
        await pilot.pause(0.1)
        for i in range(1000, 1005):
            app.bridge(AuditRecorded(record(i)))
        await pilot.pause(0.3)
        assert not log.is_vertical_scroll_end
        assert pane.unseen == 5
        assert "5 new below" in str(pane.border_subtitle)
        # Back at the end, the marker goes.
        log.scroll_end(animate=False, immediate=True)
        await asyncio.sleep(0.3)
        await pilot.pause()
        assert pane.unseen == 0 and "new below" not in str(pane.border_subtitle)
