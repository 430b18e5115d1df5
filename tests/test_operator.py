"""The operator channel: a dashboard attaches to a broker running elsewhere, answers, and leaves it serving."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from support.fixtures import BrokerThread, World

from broker.client import health
from broker.events import ApprovalRequested, AuditRecorded, Event
from broker.leaks.watcher import WatcherHealth
from broker.operator.client import OperatorUnavailable, RemoteEngine, operator_socket_live
from broker.operator.wire import decode_event, encode_event
from outloop_tui.app import OutloopApp


def ask(path: str) -> list[dict[str, Any]]:
    return [{"payload": {"credential": "api", "method": "POST", "path": path, "reason": "deploy it"}}]


async def until(predicate: Callable[[], object], what: str, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def attached(world: World) -> tuple[RemoteEngine, list[Event]]:
    remote = RemoteEngine(world.paths)
    seen: list[Event] = []
    remote.subscribe(seen.append)
    await remote.start()
    return remote, seen


def test_the_operator_socket_is_private(world: World, broker: BrokerThread) -> None:
    sock = world.paths.operator_socket
    assert operator_socket_live(sock)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    # Another OS user cannot even reach it (run as nobody, when the tests run as root, with a
    # Python nobody may run: this one may live under root's home).
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.getuid() == 0 and python:
        probe = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"
        ran = subprocess.run([python, "-c", probe, str(sock)], user=65534, capture_output=True, text=True, timeout=30)
        assert ran.returncode != 0 and "connected" not in ran.stdout
        assert "Permission denied" in ran.stderr


async def test_an_attached_operator_answers_and_the_answer_is_audited_with_it(
    world: World, broker: BrokerThread
) -> None:
    remote, seen = await attached(world)
    try:
        agent = world.agent_popen(world.acme, ask("/ask/deploy"))
        await until(remote.pending, "the ask to reach the attached dashboard")
        assert any(isinstance(e, ApprovalRequested) for e in seen)
        (waiting,) = remote.pending()
        assert (waiting.tenant, waiting.method, waiting.reason) == ("acme", "POST", "deploy it")
        assert remote.answer(waiting.id, "approved")
        out, err = await asyncio.to_thread(agent.communicate, timeout=60)
        world.assert_clean(out + err)
        assert json.loads(out)[0]["status"] == 200
        await until(lambda: not remote.pending(), "the approval to be resolved")
        await until(lambda: any(isinstance(e, AuditRecorded) for e in seen), "audit records streamed")
    finally:
        await remote.stop()
    attempts = [r for r in world.audit() if r.get("event") == "attempt" and r.get("path", "").endswith("/ask/deploy")]
    assert attempts[-1]["decision"] == "approved"
    assert attempts[-1]["approver"].startswith("operator (pid ")
    world.assert_clean(json.dumps(world.audit()))


async def test_leaving_keeps_the_broker_serving_and_the_call_waiting_for_the_next_operator(
    world: World, broker: BrokerThread
) -> None:
    first, _ = await attached(world)
    agent = world.agent_popen(world.acme, ask("/ask/later"))
    await until(first.pending, "the ask to wait")
    await first.stop()  # the operator quits their dashboard
    await asyncio.sleep(0.3)
    assert health(world.paths.socket)["ok"] is True
    assert agent.poll() is None  # still waiting, not refused
    assert broker.call(broker.engine.pending)

    second, _ = await attached(world)
    try:
        (waiting,) = second.pending()  # the snapshot holds what waits
        second.answer(waiting.id, "denied")
        out, _err = await asyncio.to_thread(agent.communicate, timeout=60)
        body = json.loads(json.loads(out)[0]["body"])
        assert body["error"]["code"] == "denied_by_operator"
    finally:
        await second.stop()


async def test_lock_from_an_attached_dashboard_is_audited(world: World, broker: BrokerThread) -> None:
    remote, _ = await attached(world)
    try:
        remote.lock()
        await until(lambda: broker.call(lambda: broker.engine.locked), "the broker to lock")
        (refused,) = world.agent(world.acme, [{"payload": {"credential": "api", "method": "GET", "path": "/x"}}])
        assert json.loads(refused["body"])["error"]["code"] == "denied_by_operator"
        remote.unlock()
        await until(lambda: not broker.call(lambda: broker.engine.locked), "the broker to unlock")
    finally:
        await remote.stop()
    events = [(r["event"], r.get("approver", "")) for r in world.audit() if r.get("event") in ("locked", "unlocked")]
    assert [e for e, _ in events] == ["locked", "unlocked"]
    assert all(a.startswith("operator (pid ") for _, a in events)


async def test_no_broker_no_attach(world: World) -> None:
    assert not operator_socket_live(world.paths.operator_socket)
    with pytest.raises(OperatorUnavailable):
        await RemoteEngine(world.paths).start()


async def test_the_dashboard_attached_answers_with_y_and_quitting_leaves_the_broker(
    world: World, broker: BrokerThread
) -> None:
    app = OutloopApp(RemoteEngine(world.paths), watch=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await asyncio.wait_for(app.ready.wait(), 15)
        assert app.started, app.start_error
        agent = world.agent_popen(world.acme, ask("/ask/from-tui"))
        await until(app.engine.pending, "the ask on the attached dashboard")
        await pilot.pause(0.2)
        await pilot.press("y")
        out, _err = await asyncio.to_thread(agent.communicate, timeout=60)
        assert json.loads(out)[0]["status"] == 200
        await pilot.press("q")
        await pilot.pause(0.2)
    assert health(world.paths.socket)["ok"] is True  # the broker outlived the dashboard


def test_every_event_survives_the_wire() -> None:
    from broker import events as ev
    from broker.leaks.alerts import Alert

    approval = ev.PendingApproval(
        "id1",
        1.0,
        2.0,
        3.0,
        "acme",
        "/w",
        7,
        "/bin/claude",
        "api",
        "POST",
        "h",
        "/p",
        "POST /p",
        "why",
        query=(("a", "1"),),
        headers=(("X-Thing", "v"),),
        body_preview="{}",
        cmdline="claude -p",
        session="s1",
    )
    alert = Alert(
        "al",
        "2026-01-01T00:00:00.000Z",
        "acme",
        "/w",
        "/w/.env",
        3,
        "rule",
        "high",
        "sk-p****Qz",
        "f" * 64,
        "open",
        first_seen="2026-01-01T00:00:00.000Z",
    )
    for event in (
        ev.ApprovalRequested(approval),
        ev.ApprovalResolved(approval, "approved", "operator"),
        ev.AuditRecorded({"event": "attempt", "tenant": "acme"}),
        ev.Refused("wrong_tenant", "acme", "api", "no"),
        ev.BrokerStateChanged("locked", ""),
        ev.ConfigReloaded(2),
        ev.ConfigRejected("bad"),
        ev.AlertOpened(alert),
        ev.AlertResolved(alert),
        ev.WatcherStatus(
            WatcherHealth(
                True,
                False,
                ("/w",),
                (),
                12,
                None,
                scanning=("acme",),
                scan_kind="first scan",
                scan_done=12,
                scan_total=40,
                unreadable=("/w/x (permission denied)",),
                unreadable_count=1,
            )
        ),
    ):
        assert decode_event(json.loads(json.dumps(encode_event(event)))) == event


def test_an_agent_session_cannot_act_as_the_operator(world: World, broker: BrokerThread) -> None:
    """Inside `outloop run`, the operator socket refuses (no self-approval), and so does the dashboard."""
    from support.fixtures import OUTLOOP

    attach = (
        "import json, socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
        ' s.sendall(b\'{"seq": 1, "op": "attach"}\\n\'); print(s.makefile().readline().strip())'
    )
    sock = str(world.paths.operator_socket)
    ran = world.run([OUTLOOP, "run", "--", sys.executable, "-c", attach, sock], world.acme)
    assert ran.returncode == 0, ran.seen
    assert json.loads(ran.stdout.strip().splitlines()[-1])["ok"] is False
    assert broker.call(lambda: broker.engine.approvals.attached) == 0
    refused = [r for r in world.audit() if r.get("event") == "operator_refused"]
    assert len(refused) == 1 and refused[0]["tenant"] == "acme" and refused[0]["session"]
    # The same from outside any session attaches.
    outside = world.run([sys.executable, "-c", attach, sock], world.unmapped)
    assert json.loads(outside.stdout.strip().splitlines()[-1])["ok"]["state"] == "listening"
    # And the dashboard will not start inside a session.
    dash = world.run([OUTLOOP, "run", "--", OUTLOOP], world.acme)
    assert dash.returncode != 0 and "cannot act as the operator" in dash.stderr
