"""The operator channel, the broker's side: dashboards in other processes attach here.

The broker (embedded in a dashboard, or `outloop broker`) listens on
`state/operator.sock`: mode 0600 in the private state folder, which a sandboxed
agent session cannot see, and it also refuses a peer of another OS user. The
dashboard that attaches answers approvals, locks, revokes grants and ignores
alerts through it; every such action is audited by the engine with the
approver. Quitting an attached dashboard leaves the broker serving.

The wire is in wire.py; the dashboard's side in client.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import events as ev
from broker.audit import AuditError
from broker.calls.identity import Peer, command_line, peer_of
from broker.operator.wire import MAX_LINE, encode_event, encode_snapshot
from broker.paths import ensure_private_dir

if TYPE_CHECKING:
    from broker.engine import Engine

log = logging.getLogger(__name__)

_CONFIG_OPS = frozenset({"config_staged", "config_accept", "config_reject"})


class OperatorServer:
    """Serves attached dashboards on the operator socket, driving the engine's façade."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self.engine = engine
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        ensure_private_dir(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # ours from a broker that died: the API socket was free
        # The umask makes the socket 0600 from its first moment; a chmod after bind would leave a gap.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        sock: socket.socket = writer.get_extra_info("socket")
        attached = False
        unsubscribe: Callable[[], None] | None = None
        try:
            peer = peer_of(sock)
            if peer.uid != os.getuid():
                return  # another user: not an operator of this broker
            session = self.engine.sessions.in_tree(peer.lineage())
            if session is not None:
                # An agent (or anything it started) must not answer its own asks, unlock the
                # broker or silence alerts: the operator channel is for the operator alone.
                fields = {"event": "operator_refused", "session": session.id, "tenant": session.tenant}
                with contextlib.suppress(AuditError):
                    await self.engine.audit.record(dict(fields, pid=peer.pid, exe=command_line(peer.pid)[:200]))
                writer.write(b'{"ok": false, "error": "the operator channel is not for agent sessions"}\n')
                return
            approver = f"operator (pid {peer.pid})"
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    request = json.loads(line)
                    op = request["op"]
                    seq = request.get("seq")
                except (ValueError, KeyError, TypeError):
                    writer.write(b'{"ok": false, "error": "malformed request"}\n')
                    continue
                if op == "attach" and not attached:
                    attached = True
                    self.engine.attach_approver()
                    queue: asyncio.Queue[ev.Event] = asyncio.Queue()
                    unsubscribe = self.engine.subscribe(queue.put_nowait)
                    self._reply(writer, seq, self._snapshot())
                    self._clients.add(asyncio.ensure_future(self._push(queue, writer)))
                    continue
                if op in _CONFIG_OPS:
                    self._reply(writer, seq, self._config_op(op, request, peer, approver))
                    continue
                self._reply(writer, seq, await self._handle(op, request, approver))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, OSError):
            return
        finally:
            if unsubscribe is not None:
                unsubscribe()
            if attached:
                self.engine.detach_approver()
            writer.close()
            self._clients.discard(task)

    def _config_op(self, op: str, request: dict[str, Any], peer: Peer, approver: str) -> Any:
        """Staged config changes: shown to anyone here, accepted or rejected only from outside every session."""
        engine = self.engine
        if op == "config_staged":
            staged = engine.staged_config()
            return None if staged is None else dataclasses.asdict(staged)
        if engine.sessions.in_tree(peer.lineage()) is not None:
            return {"error": "config changes are accepted or rejected by the operator, from outside every session"}
        digest = str(request.get("digest", ""))
        act = engine.accept_config if op == "config_accept" else engine.reject_config
        why = act(digest, approver)
        return True if why is None else {"error": why}

    async def _handle(self, op: str, request: dict[str, Any], approver: str) -> Any:
        engine = self.engine
        if op == "snapshot":
            return self._snapshot()
        if op == "answer":
            return engine.answer(str(request["id"]), str(request["decision"]), approver)
        if op == "lock":
            engine.lock(approver)
            return True
        if op == "unlock":
            engine.unlock(approver)
            return True
        if op == "revoke_grant":
            return engine.revoke_grant(tuple(request["key"]), approver)
        if op == "ignore_alert":
            engine.ignore_alert(str(request["fingerprint"]), str(request["reason"]))
            return True
        if op == "rescan":
            return await engine.rescan()
        if op == "revoke_session":
            return await engine.revoke_session(None, str(request["id"])) is True
        if op == "recent_audit":
            return engine.recent_audit(int(request.get("count", 200)))
        return {"error": f"unknown operation {op!r}"}

    def _snapshot(self) -> dict[str, Any]:
        return encode_snapshot(self.engine.snapshot(), self.engine.approvals.now())

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, seq: Any, result: Any) -> None:
        writer.write(json.dumps({"seq": seq, "ok": result}).encode() + b"\n")

    @staticmethod
    async def _push(queue: asyncio.Queue[ev.Event], writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                event = await queue.get()
                writer.write(json.dumps({"event": encode_event(event)}).encode() + b"\n")
                if queue.empty():
                    await writer.drain()
        except (ConnectionError, OSError):
            return
