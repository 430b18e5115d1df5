"""Snapshot tests of the dashboard's main states, on fixed data (tests/support/tui_sample.py).

Clocks are constants, folders are fixed, audit records carry fixed timestamps,
the watcher is off and inputs do not blink, so the SVGs only change when the
dashboard's look does. Update them with `pytest --snapshot-update` and look at
the report before committing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import keyring.backends.fail
import pytest
from support import tui_sample
from textual.widgets import Input

from broker.secrets import SecretStore


@pytest.fixture(autouse=True)
def sample_root() -> Iterator[None]:
    with tui_sample.exclusive():  # the sample folder is shared by concurrent test runs
        yield


SIZE = (160, 48)


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def no_blink(app: Any) -> None:
    for widget in app.screen.query(Input):
        widget.cursor_blink = False


def test_overview(snap_compare: Any) -> None:
    app = tui_sample.make_app(tui_sample.build())

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app)
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_scanning_with_watch_problems(snap_compare: Any) -> None:
    """While the first scan runs: "0 alerts" says it is still scanning, and the banner says what is
    not watched (folders polled past the inotify limit, a folder it cannot read) and what to do."""
    app = tui_sample.make_app(tui_sample.build(), alerts=False, scanning=True)

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app)
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_approval_pending(snap_compare: Any) -> None:
    app = tui_sample.make_app(tui_sample.build())

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app)
        tui_sample.ask(app)
        tui_sample.ask(app, age=3, path="/repos/acme/web/issues", reason="report the broken build")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 60)], ids=["80x24", "120x40", "200x60"])
def test_approvals_at_every_size(snap_compare: Any, size: tuple[int, int]) -> None:
    """Pending calls show countdown, method and path at any size; no pane collapses to nothing."""
    app = tui_sample.make_app(tui_sample.build())

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app)
        tui_sample.ask(app)
        tui_sample.ask(app, age=3, path="/repos/acme/web/issues", reason="report the broken build")
        await pilot.pause(0.3)
        app.clear_notifications()
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_approval_details(snap_compare: Any) -> None:
    """Enter on a waiting call shows all of it: reason, rule, program, session, folder."""
    app = tui_sample.make_app(tui_sample.build())

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app)
        tui_sample.ask(app)
        await pilot.pause(0.2)
        app.clear_notifications()
        app.screen.query_one("#approvals-table").focus()
        await pilot.press("enter")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)


def test_alert_details(snap_compare: Any) -> None:
    app = tui_sample.make_app(tui_sample.build())

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app)
        app.screen.query_one("#alerts").focus()
        await pilot.press("enter")
        await pilot.pause(0.2)
        no_blink(app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_add_credential_form(snap_compare: Any) -> None:
    app = tui_sample.make_app(tui_sample.build())

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app)
        await pilot.press("c")
        await pilot.pause(0.2)
        no_blink(app)
        screen = app.screen
        screen.query_one("#cred-name", Input).value = "sentry"
        screen.query_one("#base-url", Input).value = "https://sentry.io/api/0"
        screen.query_one("#allow", Input).value = "GET /projects/**"
        screen.query_one("#ask", Input).value = "PUT /projects/*/*/issues/*"
        screen.query_one("#deny", Input).value = "DELETE /**"
        screen.query_one("#secret", Input).value = "sntrys_TYPEDsecretNEVERonSCREEN"
        screen.query_one("#secret", Input).focus()
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_first_run(snap_compare: Any) -> None:
    app = tui_sample.make_app(tui_sample.build(tenants=False), alerts=False)

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app, audit=False)
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_help(snap_compare: Any) -> None:
    app = tui_sample.make_app(tui_sample.build())

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app)
        await pilot.press("question_mark")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_quit_while_calls_wait(snap_compare: Any) -> None:
    app = tui_sample.make_app(tui_sample.build())

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app)
        tui_sample.ask(app)
        await pilot.pause(0.1)
        app.clear_notifications()
        await pilot.press("q")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_locked_without_keyring(snap_compare: Any) -> None:
    app = tui_sample.make_app(tui_sample.build(), secrets=SecretStore(keyring.backends.fail.Keyring()))

    async def run_before(pilot: Any) -> None:
        await tui_sample.ready(app)
        seen = app.bridge.audit_seen
        await pilot.press("l")
        while app.bridge.audit_seen == seen:  # the lock's own audit record, then its line
            await pilot.pause(0.05)
        app.clear_notifications()
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
