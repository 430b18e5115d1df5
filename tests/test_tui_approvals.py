"""The dashboard against a real broker socket: real agents wait on `ask` calls, the pilot answers.

Each test runs `OutloopApp` (which starts the engine on the test's socket) and a
real agent process started in a tenant's workspace folder, so the broker
identifies it exactly as it would identify Claude Code there.
"""

from __future__ import annotations

import asyncio
import html
import json
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from broker.engine import Engine
from broker.events import ApprovalRequested
from outloop_tui.app import OutloopApp
from outloop_tui.widgets.confirm import ConfirmScreen

if TYPE_CHECKING:
    from support.fixtures import World


ASK = {
    "payload": {
        "credential": "api",
        "method": "POST",
        "path": "/ask/deploy",
        "body": {"ref": "main"},
        "reason": "deploy the fix",
    }
}
ALLOWED = {"payload": {"credential": "api", "method": "GET", "path": "/echo/status"}}


def make_app(world: World, **kwargs: Any) -> OutloopApp:
    return OutloopApp(Engine(world.paths), watch=False, **kwargs)


async def until(pilot: Any, predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.03)


async def finish(proc: subprocess.Popen[str], world: World) -> list[dict[str, Any]]:
    out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, err
    world.assert_clean(out)
    return json.loads(out)


def error_code(result: dict[str, Any]) -> str:
    return json.loads(result["body"])["error"]["code"]


async def started(app: OutloopApp, pilot: Any) -> None:
    await asyncio.wait_for(app.ready.wait(), 15)
    assert app.started, app.start_error
    await pilot.pause()


@pytest.mark.parametrize(("key", "status", "code"), [("y", 200, None), ("n", 403, "denied_by_operator")])
async def test_answer_keys_reach_the_waiting_agent(world: World, key: str, status: int, code: str | None) -> None:
    app = make_app(world)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        proc = world.agent_popen(world.acme, [ASK])
        await until(pilot, app.engine.pending, what="the ask call to wait")
        await pilot.pause(0.2)  # the table shows it
        assert "/ask/deploy" in _text(app)
        await pilot.press(key)
        [result] = await finish(proc, world)
        assert result["status"] == status
        if code:
            assert error_code(result) == code
        else:
            assert json.loads(result["body"])["status"] == 200
        await pilot.pause(0.2)
        assert not app.engine.pending()


async def test_always_lets_the_next_identical_call_through(world: World) -> None:
    app = make_app(world)
    asked: list[object] = []
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        app.engine.subscribe(lambda e: asked.append(e) if isinstance(e, ApprovalRequested) else None)
        proc = world.agent_popen(world.acme, [ASK])
        await until(pilot, app.engine.pending, what="the ask call to wait")
        await pilot.press("a")  # a POST: the first press only asks to confirm
        await pilot.pause(0.2)
        assert len(app.engine.pending()) == 1
        await pilot.press("a")
        [first] = await finish(proc, world)
        assert first["status"] == 200
        [second] = await finish(world.agent_popen(world.acme, [ASK]), world)
        assert second["status"] == 200
        assert len(asked) == 1  # the second call never waited
        await pilot.pause(1.2)  # a tick shows the grant and its expiry
        assert "expires in" in _text(app)


async def test_highlighted_row_or_oldest(world: World) -> None:
    app = make_app(world)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        first = world.agent_popen(world.acme, [ASK])
        await until(pilot, lambda: len(app.engine.pending()) == 1, what="the first call")
        second = world.agent_popen(world.acme, [ASK])
        await until(pilot, lambda: len(app.engine.pending()) == 2, what="the second call")
        oldest, newest = app.engine.pending()
        await pilot.pause(0.1)
        # The approvals pane has focus: `n` acts on the highlighted row (the second one).
        app.screen.query_one("#approvals-table").focus()
        await pilot.press("down", "n")
        await until(pilot, lambda: len(app.engine.pending()) == 1, what="the denial")
        assert app.engine.pending()[0].id == oldest.id
        # Elsewhere, `y` acts on the oldest.
        app.screen.query_one("#tenants").focus()
        await pilot.press("y")
        [r1] = await finish(first, world)
        [r2] = await finish(second, world)
        assert r1["status"] == 200
        assert error_code(r2) == "denied_by_operator"


async def test_unanswered_call_times_out(world: World) -> None:
    world.configure(approval_timeout=0.6)
    app = make_app(world)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        [result] = await finish(world.agent_popen(world.acme, [ASK]), world)
        assert error_code(result) == "approval_timeout"
        await pilot.pause(0.2)
        assert not app.engine.pending()


async def test_quit_asks_first_and_refuses_pending_calls(world: World) -> None:
    app = make_app(world)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        proc = world.agent_popen(world.acme, [ASK])
        await until(pilot, app.engine.pending, what="the ask call to wait")
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("n")  # stay
        await pilot.pause(0.1)
        assert app.engine.pending()
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("y")
        [result] = await finish(proc, world)
        assert error_code(result) == "denied_by_operator"
    assert not world.socket.exists()


async def test_lock_refuses_everything_until_unlocked(world: World) -> None:
    app = make_app(world)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        waiting = world.agent_popen(world.acme, [ASK])
        await until(pilot, app.engine.pending, what="the ask call to wait")
        await pilot.press("l")
        [refused_pending] = await finish(waiting, world)
        assert error_code(refused_pending) == "denied_by_operator"
        [refused] = await finish(world.agent_popen(world.acme, [ALLOWED]), world)
        assert error_code(refused) == "denied_by_operator"
        await pilot.pause(0.1)
        assert "LOCKED" in _text(app)
        await pilot.press("l")
        [served] = await finish(world.agent_popen(world.acme, [ALLOWED]), world)
        assert served["status"] == 200
        await pilot.pause(0.1)
        assert "LISTENING" in _text(app)


async def test_wrong_tenant_attempt_rings_and_notifies(world: World) -> None:
    app = make_app(world)
    bells: list[None] = []
    app.bell = lambda: bells.append(None)  # type: ignore[method-assign]
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        # globex's workspace claims acme's tenant.
        claim = {"payload": {"credential": "api", "method": "GET", "path": "/echo/x", "tenant": "acme"}}
        [result] = await finish(world.agent_popen(world.globex, [claim]), world)
        assert error_code(result) == "wrong_tenant"
        await until(pilot, lambda: bells, what="the bell")
        assert any("Wrong tenant" in (n.title or "") for n in app._notifications)


async def test_new_approval_rings_and_notifies(world: World) -> None:
    app = make_app(world)
    bells: list[None] = []
    app.bell = lambda: bells.append(None)  # type: ignore[method-assign]
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        proc = world.agent_popen(world.acme, [ASK])
        await until(pilot, lambda: bells, what="the bell")
        # The notification is a message the app handles on its next turn, not at once.
        await until(pilot, lambda: any(n.title == "Approval needed" for n in app._notifications), what="it")
        await pilot.press("n")
        await finish(proc, world)


async def test_audit_pane_shows_calls_and_filters(world: World) -> None:
    app = make_app(world)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        await finish(world.agent_popen(world.acme, [ALLOWED]), world)
        deny = {"payload": {"credential": "api", "method": "DELETE", "path": "/x"}}
        await finish(world.agent_popen(world.globex, [deny]), world)
        await until(pilot, lambda: "denied_by_policy" in _log(app), what="the audit lines")
        assert "/echo/status" in _log(app)
        await pilot.press("slash")
        await pilot.press(*"outcome:refused")
        await pilot.pause(0.1)
        assert "denied_by_policy" in _log(app) and "/echo/status" not in _log(app)
        await pilot.press("escape")
        await pilot.pause(0.1)
        assert "/echo/status" in _log(app)
        # / on a tenant in the tree starts the filter with that tenant.
        app.screen.query_one("#tenants").focus()
        await pilot.press("down")  # the cursor starts on acme; move to one of its leaves and back
        await pilot.press("up", "slash")
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert "globex" not in _log(app) and "acme" in _log(app)


async def test_command_palette_runs_actions(world: World) -> None:
    app = make_app(world)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"lock")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: app.engine.locked, what="the lock")


def test_every_binding_has_an_id_a_description_and_a_palette_entry() -> None:
    from outloop_tui.app import DashboardScreen
    from outloop_tui.commands import COMMANDS

    palette = {action for _, action, _ in COMMANDS}
    for binding in DashboardScreen.BINDINGS:
        assert binding.id and binding.description, binding
        if binding.action.startswith("app.focus_"):
            continue  # tab / shift+tab: the palette has a command per pane instead
        assert binding.action in palette, binding.action


def _text(app: OutloopApp) -> str:
    return html.unescape(app.export_screenshot()).replace("\xa0", " ")


def _log(app: OutloopApp) -> str:
    return "\n".join(app.screen.query_one("#audit-log").lines)  # type: ignore[attr-defined]


async def test_enter_shows_the_call_and_answers_from_the_details(world: World) -> None:
    """Enter on a waiting call opens its details (reason, rule, program); y there approves it."""
    app = make_app(world)
    async with app.run_test(size=(120, 40)) as pilot:
        await started(app, pilot)
        proc = world.agent_popen(world.acme, [ASK])
        await until(pilot, app.engine.pending, what="the ask call to wait")
        await pilot.pause(0.2)
        app.screen.query_one("#approvals-table").focus()
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert type(app.screen).__name__ == "ApprovalScreen"
        shown = str(app.screen.query_one("#approval-fields").render())
        [approval] = app.engine.pending()
        assert approval.path in str(app.screen.query_one("#dialog-title").render())
        assert approval.credential in shown and approval.tenant in shown
        assert (approval.rule or "no rules") in shown
        await pilot.press("y")
        [result] = await finish(proc, world)
        assert result["status"] == 200
        assert not app.engine.pending()


async def test_one_always_grant_is_revoked_alone_and_audited(world: World) -> None:
    """g lists the live grants; Enter revokes one; the next such call waits for the operator again."""
    from outloop_tui.widgets.approvals import GrantsScreen

    app = make_app(world)
    asked: list[object] = []
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        app.engine.subscribe(lambda e: asked.append(e) if isinstance(e, ApprovalRequested) else None)
        proc = world.agent_popen(world.acme, [ASK])
        await until(pilot, app.engine.pending, what="the ask call to wait")
        await pilot.press("a", "a")
        [first] = await finish(proc, world)
        assert first["status"] == 200 and app.engine.snapshot().grants
        await pilot.press("g")
        await until(pilot, lambda: isinstance(app.screen, GrantsScreen), what="the grants list")
        await pilot.press("enter")
        await until(pilot, lambda: not app.engine.snapshot().grants, what="the revocation")
        proc = world.agent_popen(world.acme, [ASK])
        await until(pilot, app.engine.pending, what="the next call to wait again")
        await pilot.press("n")
        [second] = await finish(proc, world)
        assert error_code(second) == "denied_by_operator"
        assert len(asked) == 2
        await pilot.pause(0.2)
    revoked = [r for r in world.audit() if r.get("event") == "grant_revoked"]
    assert len(revoked) == 1 and revoked[0]["approver"] == "operator" and revoked[0]["credential"] == "api"


@pytest.mark.parametrize(
    ("cmdline", "exe", "name"),
    [
        ("/venv/bin/python3.11 /venv/bin/outloop call github POST /repos/a/b/issues", "/usr/bin/python3.11", "outloop"),
        ("claude -p fix the tests", "/opt/claude/bin/claude", "claude"),
        ("python3 -m outloop_tui.cli call api GET /x", "/usr/bin/python3.11", "outloop_tui.cli"),
        ("python3 -c import sys; print(1)", "/usr/bin/python3.11", "python3"),
        ("", "/usr/bin/curl", "curl"),
    ],
)
def test_the_program_is_named_as_a_person_would(cmdline: str, exe: str, name: str) -> None:
    from broker.events import PendingApproval
    from outloop_tui.widgets.approvals import program_name

    approval = PendingApproval("i", 0, 1, 0, "acme", "/w", 1, exe, "api", "GET", "h", "/x", None, "", cmdline=cmdline)
    assert program_name(approval) == name


async def test_s_lists_the_agent_sessions_and_enter_ends_one(world: World) -> None:
    """A live `outloop run` session shows in the dashboard; ending it there refuses its next call."""
    from support.fixtures import OUTLOOP

    from outloop_tui.widgets.sessions import SessionsScreen

    hold = "import sys; print('ready', flush=True); sys.stdin.readline(); print('done', flush=True)"
    app = make_app(world)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(app, pilot)
        proc = subprocess.Popen(
            [OUTLOOP, "run", "--label", "held", "--", sys.executable, "-c", hold],
            cwd=world.acme,
            env=world.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert await asyncio.to_thread(proc.stdout.readline) == "ready\n"
            await until(pilot, lambda: app.engine.snapshot().sessions, what="the session")
            (session,) = app.engine.snapshot().sessions
            assert session["label"] == "held" and session["tenant"] == "acme"
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, SessionsScreen), what="the sessions list")
            await pilot.press("enter")
            await until(pilot, lambda: not app.engine.snapshot().sessions, what="the session to end")
        finally:
            await asyncio.to_thread(proc.communicate, "\n", 60)
    ended = [r for r in world.audit() if r.get("event") == "session_end" and r.get("session") == session["id"]]
    assert ended and "revoked" in json.dumps(ended[0])


def test_the_terminal_notification_cannot_be_cut_short_by_what_it_shows() -> None:
    from outloop_tui.app import osc_notification

    text = osc_notification("Outloop: approval needed", "acme/api: POST /x;\x07\x1b]52;c;evil\x07")
    assert text.startswith("\x1b]777;notify;Outloop: approval needed;") and text.endswith("\x07")
    assert text.count("\x07") == 2 and text.count("\x1b") == 2  # only its own two sequences
