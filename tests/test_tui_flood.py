"""Under a flood of audit events the dashboard keeps answering keys and keeps its line cap."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from support import tui_sample
from textual import events
from textual.widgets import Log

from broker.events import AuditRecorded
from outloop_tui.widgets.audit import LINE_CAP
from outloop_tui.widgets.help import HelpScreen


@pytest.fixture(autouse=True)
def sample_root() -> Iterator[None]:
    with tui_sample.exclusive():  # the sample folder is shared by concurrent test runs
        yield


EVENTS = 20_000


def record(i: int) -> dict[str, Any]:
    return {
        "ts": "2026-01-01T12:00:00.000Z",
        "id": f"r{i}",
        "event": "attempt",
        "tenant": "acme",
        "credential": "github",
        "method": "GET",
        "path": f"/repos/acme/web/pulls/{i}",
        "decision": "allow",
        "approver": "policy",
    }


async def test_flood_keeps_keys_answering_and_the_line_cap() -> None:
    app = tui_sample.make_app(tui_sample.build())
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app, audit=False)
        before = app.bridge.audit_seen  # the engine's own records (broker_started, ...) may come too

        async def flood() -> None:
            # As fast as the loop allows, in the engine's own delivery path (the subscriber).
            for i in range(EVENTS):
                app.bridge(AuditRecorded(record(i)))
                if i % 500 == 499:
                    await asyncio.sleep(0)

        task = asyncio.create_task(flood())
        answered = 0

        async def until(condition: Any) -> None:
            # No timing threshold (shared, noisy machines): a frozen app is one that never
            # shows the screen at all, which this turns into a clear failure.
            async with asyncio.timeout(30):
                while not condition():
                    await asyncio.sleep(0.001)

        while not task.done():
            # A key as the terminal driver delivers it, while the flood is under way.
            app.post_message(events.Key("question_mark", "?"))
            await until(lambda: isinstance(app.screen, HelpScreen))
            app.post_message(events.Key("escape", None))
            await until(lambda: not isinstance(app.screen, HelpScreen))
            answered += 1
        await task
        await pilot.pause(0.4)  # the last drain
        log = app.screen.query_one("#audit-log", Log)
        assert answered >= 1
        assert EVENTS <= app.bridge.audit_seen - before <= EVENTS + 3
        assert log.line_count <= LINE_CAP
        assert log.lines[-1].endswith(f"/pulls/{EVENTS - 1}")
