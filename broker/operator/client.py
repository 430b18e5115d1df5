"""The operator channel, the dashboard's side: the engine's façade over the operator socket.

`RemoteEngine` offers what the dashboard uses of `Engine` (snapshot, pending,
answer, lock, revoke_grant, ignore_alert, rescan, subscribe, start, stop) for a
broker running in another process. Events arrive as the broker publishes them;
the rest of the snapshot (grants, alerts, watcher health) is asked for again
once a second. config.toml and the keyring are read here directly: the
dashboard runs as the same user, and the broker reads the same files.

Answers go out without waiting for the reply: the dashboard sees their effect
as events, the same way it does with an embedded engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import events as ev
from broker.audit import last_records
from broker.calls.approvals import Grant, GrantKey
from broker.config import Config, ConfigError, load_config
from broker.events import Snapshot
from broker.leaks.alerts import Alert
from broker.operator.wire import (
    MAX_LINE,
    decode_approval,
    decode_event,
    decode_grants,
    decode_staged,
    decode_watcher,
)
from broker.paths import Paths
from broker.secrets import BackendInfo, SecretStore, backend_info

SNAPSHOT_SECONDS = 1.0


class OperatorUnavailable(Exception):
    """No broker answers on the operator socket."""


class RemoteEngine:
    """A running broker, driven from this process."""

    def __init__(self, paths: Paths, *, secrets: SecretStore | None = None) -> None:
        self.paths = paths
        self.secrets = secrets or SecretStore()
        self.state = "starting"
        self.locked = False
        self._subscribers: list[Callable[[ev.Event], None]] = []
        self._pending: dict[str, ev.PendingApproval] = {}
        self._grants: list[Grant] = []
        self._alerts: list[Alert] = []
        self._watcher: Any = None
        self._sessions: list[dict[str, Any]] = []
        self._staged: ev.ConfigStaged | None = None
        self._config: Config | None = None
        self._config_stamp: tuple[int, int] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._seq = 0
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- the façade ------------------------------------------------------------------

    @property
    def config(self) -> Config:
        if self._config is None:
            raise RuntimeError("not attached yet")
        return self._config

    def subscribe(self, callback: Callable[[ev.Event], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    async def start(self, *, serve: bool = True, watch: bool = True) -> None:
        """Attach: connect, take the broker's snapshot, follow its events."""
        self.refresh_config()
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                str(self.paths.operator_socket), limit=MAX_LINE
            )
        except OSError as e:
            raise OperatorUnavailable(f"no broker answers on {self.paths.operator_socket}") from e
        self._tasks.append(asyncio.create_task(self._read(), name="outloop-operator-read"))
        self._apply_snapshot(await self._request("attach"))
        self._tasks.append(asyncio.create_task(self._poll(), name="outloop-operator-poll"))

    async def stop(self) -> None:
        """Detach; the broker goes on serving."""
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._set_state("detached")

    def attach_approver(self) -> None:
        """Attaching is what `start` does; nothing more to count here."""

    def detach_approver(self) -> None:
        """Detaching is what `stop` does."""

    def pending(self) -> list[ev.PendingApproval]:
        return sorted(self._pending.values(), key=lambda a: a.created)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            state=self.state,
            locked=self.locked,
            socket=str(self.paths.socket),
            config=self._config,
            pending=self.pending(),
            grants=[g for g in self._grants if g.expires > time.monotonic()],
            alerts=list(self._alerts),
            watcher=self._watcher,
            sessions=list(self._sessions),
            staged=self._staged,
        )

    def answer(self, approval_id: str, decision: str, approver: str = "operator") -> bool:
        if approval_id not in self._pending:
            return False
        self._send("answer", id=approval_id, decision=decision)
        return True

    def lock(self, approver: str = "operator") -> None:
        self.locked = True
        self._send("lock")

    def unlock(self, approver: str = "operator") -> None:
        self.locked = False
        self._send("unlock")

    def revoke_grant(self, key: GrantKey, approver: str = "operator") -> bool:
        known = any(g.key == key for g in self._grants)
        self._grants = [g for g in self._grants if g.key != key]
        self._send("revoke_grant", key=list(key))
        return known

    def ignore_alert(self, fingerprint: str, reason: str) -> None:
        self._send("ignore_alert", fingerprint=fingerprint, reason=reason)

    def staged_config(self) -> ev.ConfigStaged | None:
        return self._staged

    async def accept_config_async(self, digest: str) -> str | None:
        """Accept the staged change; None, or the broker's reason why not."""
        return _why(await self._request("config_accept", digest=digest))

    async def reject_config_async(self, digest: str) -> str | None:
        """Reject the staged change; None, or the broker's reason why not."""
        return _why(await self._request("config_reject", digest=digest))

    def accept_config(self, digest: str, approver: str = "operator") -> str | None:
        self._staged = None
        self._send("config_accept", digest=digest)
        return None

    def reject_config(self, digest: str, approver: str = "operator") -> str | None:
        self._staged = None
        self._send("config_reject", digest=digest)
        return None

    async def revoke_session(self, peer: None, session_id: str) -> bool:
        self._sessions = [s for s in self._sessions if s.get("id") != session_id]
        return bool(await self._request("revoke_session", id=session_id))

    async def rescan(self) -> bool:
        return bool(await self._request("rescan"))

    def keyring(self) -> BackendInfo:
        return backend_info(self.secrets.backend)

    def recent_audit(self, count: int) -> list[dict[str, Any]]:
        return last_records(self.paths.audit_dir, count)

    def refresh_config(self) -> Config:
        """config.toml as it is now (read again only when it changed)."""
        try:
            st = self.paths.config_file.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._config_stamp or self._config is None:
            try:
                self._config = load_config(self.paths)
                self._config_stamp = stamp
            except ConfigError as e:
                self._publish(ev.ConfigRejected(str(e)))
                if self._config is None:
                    raise
        return self._config

    # -- the wire ----------------------------------------------------------------------

    def _send(self, op: str, **fields: Any) -> int:
        if self._writer is None or self._writer.is_closing():
            raise OperatorUnavailable("the broker is gone")
        self._seq += 1
        self._writer.write(json.dumps({"seq": self._seq, "op": op, **fields}).encode() + b"\n")
        return self._seq

    async def _request(self, op: str, **fields: Any) -> Any:
        seq = self._send(op, **fields)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[seq] = future
        return await future

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "event" in message:
                    self._on_event(decode_event(message["event"]))
                elif (future := self._replies.pop(message.get("seq"), None)) is not None and not future.done():
                    future.set_result(message.get("ok"))
        except (ConnectionError, OSError, ValueError, KeyError, TypeError):
            pass
        for future in self._replies.values():
            if not future.done():
                future.set_exception(OperatorUnavailable("the broker is gone"))
        self._set_state("stopped")  # the broker went away (or sent what no broker sends)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_SECONDS)
            with contextlib.suppress(OperatorUnavailable):
                self._apply_snapshot(await self._request("snapshot"))

    def _apply_snapshot(self, snap: dict[str, Any]) -> None:
        self.locked = bool(snap["locked"])
        self.state = str(snap["state"])
        self._pending = {a.id: a for a in map(decode_approval, snap["pending"])}
        self._grants = decode_grants(snap["grants"], time.monotonic)
        self._alerts = [Alert.from_json(a) for a in snap["alerts"]]
        self._watcher = decode_watcher(snap["watcher"])
        self._sessions = list(snap.get("sessions") or [])
        self._staged = decode_staged(snap.get("staged"))

    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.ApprovalRequested):
            self._pending[event.approval.id] = event.approval
        elif isinstance(event, ev.ApprovalResolved):
            self._pending.pop(event.approval.id, None)
        elif isinstance(event, ev.BrokerStateChanged):
            self.state = event.state
            self.locked = event.state == "locked"
        elif isinstance(event, ev.ConfigStaged):
            self._staged = event
        elif isinstance(event, ev.ConfigStageCleared):
            self._staged = None
        elif isinstance(event, ev.ConfigReloaded):
            self.refresh_config()
        elif isinstance(event, ev.WatcherStatus):
            self._watcher = event.health
        self._publish(event)

    def _publish(self, event: ev.Event) -> None:
        for callback in list(self._subscribers):
            callback(event)

    def _set_state(self, state: str) -> None:
        if self.state != state:
            self.state = state
            self._publish(ev.BrokerStateChanged(state))


def _why(result: Any) -> str | None:
    if result is True:
        return None
    if isinstance(result, dict) and "error" in result:
        return str(result["error"])
    return "the broker did not say"


def operator_socket_live(path: Path) -> bool:
    """Whether a broker answers on this operator socket (a stale file does not count)."""
    import socket

    if not path.exists():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
