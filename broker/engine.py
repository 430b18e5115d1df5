"""The engine façade: everything the dashboard and `outloop broker` use.

    engine = Engine(paths)
    unsubscribe = engine.subscribe(on_event)
    await engine.start()          # config, audit, socket server, leak watcher
    engine.answer(id, "approved") # or "always" / "denied"
    engine.lock(); engine.unlock()
    engine.snapshot()             # what the dashboard shows: tenants, pending, grants, alerts
    engine.ignore_alert(fp, why); await engine.rescan()
    await engine.stop()           # pending approvals denied, socket removed

A call goes: who is calling → which credential → is the path sane → policy →
(operator) → audit attempt → upstream → redaction → audit outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import __version__
from broker.audit import AuditError, AuditKey, AuditLog, Head, last_records
from broker.audit import keys as audit_keys
from broker.audit.syslog_sink import send as send_to_syslog
from broker.calls.approvals import Approvals, GrantKey
from broker.calls.forward import Forwarder, UpstreamError, UpstreamSettings, UpstreamStream
from broker.calls.identity import Caller, IdentityError, Peer, command_line, descendants, identify, identify_folder
from broker.calls.protocol import Answer, CallRequest, Refusal, StreamedAnswer
from broker.calls.sessions import Session, SessionError, Sessions
from broker.calls.workers import ForwardPool
from broker.config import Config, Credential
from broker.config_gate import ConfigGate
from broker.events import (
    AuditRecorded,
    BrokerStateChanged,
    ConfigReloaded,
    ConfigStaged,
    Event,
    PendingApproval,
    Refused,
    Snapshot,
)
from broker.leaks.redact import Redactor, with_leak_rules
from broker.leaks.stream import StreamRedactor
from broker.operator.notify import notify_desktop
from broker.operator.server import OperatorServer
from broker.paths import Paths, ensure_private_dir
from broker.policy import Decision, NormalPath, PathRejected, decide, normalize_path
from broker.providers import KEY_VARIABLES, session_env
from broker.secrets import BackendInfo, Secret, SecretStore, SecretStoreError, backend_info

if TYPE_CHECKING:  # imported when the watchers start: `outloop call` need not load watchfiles
    from broker.claude.transcripts import TranscriptWatcher
    from broker.leaks.alerts import AlertStore
    from broker.leaks.watcher import LeakWatcher

Subscriber = Callable[[Event], None]

CONFIG_POLL_SECONDS = 1.0
# What an ask shows the operator of the request body, and the headers never shown.
ASK_BODY_PREVIEW = 4096
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "x-outloop-session"}
)
# More calls than this on the wire at once, and the next goes to a forwarding worker.
BUSY_CALLS = 1
# A /v1/proxy answer that says it is at most this long is read whole and sent with its
# length; longer ones, and those of unknown length, stream.
WHOLE_ANSWER_BYTES = 256 * 1024


class Engine:
    """The broker: config, secrets, approvals, forwarding, redaction, audit, server, watcher."""

    def __init__(self, paths: Paths, *, secrets: SecretStore | None = None) -> None:
        self.paths = paths
        self.secrets = secrets or SecretStore()
        self._subscribers: list[Subscriber] = []
        self.approvals = Approvals(self._publish)
        self.audit = AuditLog(paths.audit_dir)
        self.state = "stopped"
        self.locked = False
        self._config: Config | None = None
        self._config_stamp: tuple[int, int, int] | None = None
        self._config_poll: asyncio.Task[None] | None = None
        self._redactor: Redactor | None = None
        self._redaction: list[tuple[str, str]] = []  # what _redactor redacts, for the workers
        self._forwarder: Forwarder | None = None
        self._pool: ForwardPool | None = None
        self._stopping = False  # stop() has begun
        self._upstream_calls = 0  # calls on the wire right now
        self._calls = 0  # calls being handled right now (deciding, waiting or on the wire)
        self._server: Any = None
        self._scan_secrets: tuple[Redactor, Any] | None = None  # /v1/scan's matcher, per redactor
        self._operator: OperatorServer | None = None
        self.watcher: LeakWatcher | None = None
        self.alerts: AlertStore | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self.transcripts: TranscriptWatcher | None = None  # Claude Code's (broker/claude/transcripts.py)
        self.started = time.time()
        self.sessions = Sessions(paths.state_dir / "sessions.json")
        self.sessions.on_end = self._session_ended
        self.listen_url: str | None = None  # the loopback TCP listener, once it listens
        self._kept_head: Head | None = None  # the audit head last kept in the keyring
        self._audit_early: list[dict[str, Any]] | None = []
        self.config_gate = ConfigGate(paths, record=self._audit_soon, publish=self._publish)
        self._head_kept_at = 0.0

    # -- events ---------------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(event)` for every engine event; returns an unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def _publish(self, event: Event) -> None:
        for callback in list(self._subscribers):
            callback(event)

    def _set_state(self, state: str, detail: str = "") -> None:
        self.state = state
        self._publish(BrokerStateChanged(state, detail))

    # -- lifecycle --------------------------------------------------------------

    @property
    def config(self) -> Config:
        if self._config is None:
            raise RuntimeError("the engine has not started")
        return self._config

    async def start(self, *, serve: bool = True, watch: bool = True) -> None:
        """Load config, open the audit log, listen on the socket, start the leak watcher."""
        from broker.calls.server import Server

        self._set_state("starting")
        ensure_private_dir(self.paths.state_dir)
        self._config_stamp = self._stamp()
        self._config = self.config_gate.start()
        if serve:
            # Before the audit log: a second broker must hear "already running on the
            # socket", not that the audit log is in use.
            Server(self, self.paths.socket).check_free()
        # The chain is sealed under the keyring's audit key (made on the first start).
        key: AuditKey | None = None
        try:
            key = await asyncio.to_thread(audit_keys.load_or_create_key, self.secrets.backend)
        except AuditError as e:
            # No usable keyring: the broker serves no key anyway; the chain goes on in plain
            # SHA-256 and says why, and verify flags plain records after sealed ones.
            assert self._audit_early is not None
            self._audit_early.insert(0, {"event": "audit_key_unavailable", "message": str(e)})
        self._kept_head = await asyncio.to_thread(audit_keys.read_head, self.secrets.backend)
        self.audit.use_key(key, self._kept_head)
        await self.audit.open()
        self.audit.subscribe(self._on_audit)
        await self.audit.record(
            {
                "event": "broker_started",
                "version": __version__,
                "pid": os.getpid(),
                "key_id": key.key_id if key is not None else None,
            }
        )
        early, self._audit_early = self._audit_early or [], None
        for fields in early:
            await self.audit.record(fields)
        await self._keep_audit_head()
        self._forwarder = Forwarder(UpstreamSettings.of(self.config.broker))
        if self.config.broker.forward_workers:
            # Started on the first busy moment; changing the number needs a restart.
            self._pool = ForwardPool(self.config.broker.forward_workers, self.paths.state_dir)
        self.sessions.max_sessions = self.config.broker.max_sessions
        for session in self.sessions.load():
            await self._audit_session("session_restore", session)
        self.sessions.attach(asyncio.get_running_loop())
        if serve:
            self._server = Server(self, self.paths.socket, listen=self.config.broker.listen)
            await self._server.start()
            self.listen_url = self._server.listen_url
            self._operator = OperatorServer(self, self.paths.operator_socket)
            await self._operator.start()
        if watch:
            await self._start_watcher()
            await self._start_transcripts()
        # Calls refresh the config themselves; this picks up edits (a workspace added in
        # another terminal) while no call comes, so the watchers are re-armed promptly.
        self._config_poll = asyncio.create_task(self._poll_config(), name="outloop-config")
        self._set_state("locked" if self.locked else "listening")

    async def _note_session_trees(self) -> None:
        """Remember what each live session's tree holds, so what outlives a session stays its."""
        live = self.sessions.live()
        if not live:
            return
        trees = await asyncio.to_thread(descendants, [s.root_pid for s in live])
        for session in live:
            self.sessions.note_members(session.id, trees.get(session.root_pid, ()))

    async def _poll_config(self) -> None:
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            self.refresh_config()
            self.sessions.sweep()  # expiries, and roots without a pidfd watching them
            await self._note_session_trees()
            if time.monotonic() - self._head_kept_at >= audit_keys.KEYRING_HEAD_SECONDS:
                await self._keep_audit_head()

    async def _keep_audit_head(self) -> None:
        """Keep the audit log's last durable record in the keyring, where a sandbox cannot reach it.

        At start, at stop and every KEYRING_HEAD_SECONDS while records come: a keyring
        write costs ~10-20 ms over D-Bus, far too much for every call.
        """
        self._head_kept_at = time.monotonic()
        head = self.audit.last
        if head is None or head == self._kept_head:
            return
        if await asyncio.to_thread(audit_keys.write_head, head, self.secrets.backend):
            self._kept_head = head

    async def stop(self) -> None:
        """Refuse pending approvals, stop serving, close the audit log."""
        self._stopping = True  # streams cut from now on are the broker's doing, not the agent's
        self.approvals.deny_all("cancelled", "shutdown")
        if self._config_poll is not None:
            self._config_poll.cancel()
            self._config_poll = None
        if self.watcher is not None:
            await self.watcher.stop()
        if self.transcripts is not None:
            await self.transcripts.stop()
        if self._operator is not None:
            await self._operator.stop()
            self._operator = None
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._forwarder is not None:
            await self._forwarder.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        self.sessions.detach()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        with contextlib.suppress(AuditError):
            await self.audit.record({"event": "broker_stopped", "pid": os.getpid()})
        await self.audit.close()
        await self._keep_audit_head()
        self._set_state("stopped")

    def _alert_store(self) -> AlertStore:
        from broker.leaks.alerts import AlertStore

        if self.alerts is None:
            self.alerts = AlertStore(self.paths.alerts_file)
            self.alerts.subscribe(self._publish)
        return self.alerts

    async def _start_watcher(self) -> None:
        from broker.leaks.watcher import LeakWatcher

        self.watcher = LeakWatcher(
            self._workspace_list(),
            self.managed_secrets,
            self._alert_store(),
            max_bytes=self.config.broker.scan_max_file_bytes,
            scan_ignore=lambda: {t.id: t.scan_ignore for t in self.config.tenants.values()},
        )
        self.watcher.subscribe(self._publish)  # scan progress and watch failures: WatcherStatus
        await self.watcher.start()

    # -- Claude Code transcripts (broker/transcripts.py) -----------------------------

    async def _start_transcripts(self) -> None:
        """Watch each workspace's Claude Code transcripts and task outputs for leaked keys, into the alert store."""
        from broker.claude.transcripts import TranscriptWatcher

        self.transcripts = TranscriptWatcher(
            self._workspace_list(),
            self.managed_secrets,
            self._alert_store(),
            tmpdir=self.config.broker.claude_code_tmpdir,
        )
        await self.transcripts.start()

    def _background(self, work: Coroutine[Any, Any, object]) -> None:
        """Run a watcher's rearm (or an operator action's audit record) without blocking."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _workspace_list(self) -> list[tuple[str, Path]]:
        return [(t.id, ws) for t in self.config.tenants.values() for ws in t.workspaces]

    def managed_secrets(self, *, strict: bool = False) -> dict[tuple[str, str], str]:
        """Every secret the broker manages, by (tenant, credential), for leak matching.

        A keyring that cannot be read gives {} (the watcher tries again later), or
        with `strict` raises SecretStoreError.
        """
        keys = [(c.tenant, c.name) for c in self.config.credentials()]
        try:
            return {k: s.reveal() for k, s in self.secrets.managed(keys).items()}
        except SecretStoreError:
            if strict:
                raise
            return {}

    def _on_audit(self, record: dict[str, Any]) -> None:
        if self._config is not None and self._config.audit.syslog:
            send_to_syslog(record)
        if self._subscribers:  # none for `outloop broker`
            self._publish(AuditRecorded(record))

    # -- config reload ------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.paths.config_file)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def refresh_config(self) -> Config:
        """Pick up config.toml changes; a change that does not validate keeps the old config."""
        stamp = self._stamp()
        if stamp == self._config_stamp:
            return self.config
        self._config_stamp = stamp
        new = self.config_gate.consider()  # approved, narrowed, staged, or None: keep the current one
        if new is None:
            return self.config
        return self._use_config(new)

    def _use_config(self, new: Config) -> Config:
        self._config = new
        self._redactor = None
        self.sessions.max_sessions = new.broker.max_sessions
        self.secrets.forget()
        if self._forwarder is not None:  # [broker] limits apply from the next call
            self._forwarder.settings = UpstreamSettings.of(new.broker)
        for watcher in (self.watcher, self.transcripts):
            if watcher is not None:
                self._background(watcher.rearm(self._workspace_list()))
        self._publish(ConfigReloaded(len(new.tenants)))
        return new

    # -- config changes that wait for the operator (broker/config_gate.py) ------------

    def _audit_soon(self, fields: dict[str, Any]) -> None:
        if self._audit_early is None:
            self._background(self.audit.record(fields))
        else:
            self._audit_early.append(fields)  # before the audit log is open: written once it is

    def staged_config(self) -> ConfigStaged | None:
        """The config change that waits for the operator, if any."""
        self.refresh_config()
        return self.config_gate.staged

    def accept_config(self, digest: str, approver: str = "operator") -> str | None:
        """Enforce the staged change named by `digest` (audited); None, or why it was not."""
        result = self.config_gate.accept(digest, approver)
        if isinstance(result, str):
            return result
        self._config_stamp = self._stamp()
        self._use_config(result)
        return None

    def reject_config(self, digest: str, approver: str = "operator") -> str | None:
        """Discard the staged change named by `digest`: config.toml goes back (audited); None, or why not."""
        result = self.config_gate.reject(digest, approver)
        if isinstance(result, str):
            return result
        self._config_stamp = self._stamp()
        self._use_config(result)
        return None

    # -- operator ---------------------------------------------------------------

    def attach_approver(self) -> None:
        self.approvals.attached += 1

    def detach_approver(self) -> None:
        # What waits goes on waiting (until approval_timeout) for another operator to attach.
        self.approvals.attached = max(0, self.approvals.attached - 1)

    def pending(self) -> list[PendingApproval]:
        return self.approvals.pending()

    def answer(self, approval_id: str, decision: str, approver: str = "operator") -> bool:
        """Approve once ("approved"), for the session ("always"), or deny ("denied")."""
        ttl = self._config.broker.always_ttl if self._config else 3600.0
        return self.approvals.answer(approval_id, decision, approver, always_ttl=ttl)

    def lock(self, approver: str = "operator") -> None:
        """Refuse every call, and everything pending, until unlocked (audited)."""
        self.locked = True
        self.approvals.deny_all("denied", "lock")
        self.approvals.revoke_grants()
        self._set_state("locked")
        self._background(self.audit.record({"event": "locked", "approver": approver}))

    def unlock(self, approver: str = "operator") -> None:
        self.locked = False
        self._set_state("listening")
        self._background(self.audit.record({"event": "unlocked", "approver": approver}))

    def snapshot(self) -> Snapshot:
        """Everything the dashboard shows, as of now."""
        return Snapshot(
            state=self.state,
            locked=self.locked,
            socket=str(self.paths.socket),
            config=self._config,
            pending=self.approvals.pending(),
            grants=self.approvals.grants(),
            alerts=self.alerts.open_alerts() if self.alerts is not None else [],
            watcher=self.watcher.health() if self.watcher is not None else None,
            sessions=[s.public() for s in self.sessions.live()],
            staged=self.config_gate.staged,
        )

    def keyring(self) -> BackendInfo:
        """Which keyring backend holds the secrets, and whether it can (it may ask D-Bus: not per tick)."""
        return backend_info(self.secrets.backend)

    def revoke_grant(self, key: GrantKey, approver: str = "operator") -> bool:
        """End one \"always\" grant before it expires; audited. False when it had already gone."""
        if not self.approvals.revoke_grant(key):
            return False
        tenant, credential, method, rule = key
        fields = {"event": "grant_revoked", "tenant": tenant, "credential": credential, "method": method}
        self._background(self.audit.record(dict(fields, rule=rule, approver=approver)))
        return True

    def ignore_alert(self, fingerprint: str, reason: str) -> None:
        """Ignore a leaked value from now on, everywhere (the operator's call, audited by the store)."""
        if self.alerts is not None:
            self.alerts.ignore(fingerprint, reason)

    async def rescan(self) -> bool:
        """Scan every workspace again; False when the leak watcher is not running."""
        if self.watcher is None:
            return False
        await self.watcher.rescan()
        return True

    def recent_audit(self, count: int) -> list[dict[str, Any]]:
        """The last `count` audit records on disk, oldest first: what the audit pane opens with."""
        return last_records(self.paths.audit_dir, count)

    def health(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "ok": True,
            "version": __version__,
            "state": self.state,
            "locked": self.locked,
            "approver": bool(self.approvals.attached),
            "listen": self.listen_url,  # the loopback TCP listener, or None
            "sessions": len(self.sessions),
            # Group commit counters: how many fsyncs the records cost.
            "audit": dataclasses.asdict(self.audit.stats),
        }
        if self.watcher is not None:
            info["watcher"] = dataclasses.asdict(self.watcher.health())
        if self.transcripts is not None:
            info["transcripts"] = self.transcripts.health()
        if self._pool is not None:
            info["forward_workers"] = self._pool.health()
        return info

    def whoami(self, peer: Peer, token: str | None = None) -> dict[str, Any] | Refusal:
        config = self.refresh_config()
        try:
            caller = identify(peer, config, self.sessions, token)
        except IdentityError as e:
            return Refusal(e.code, str(e), None)
        return {
            "session": caller.session.id if caller.session else None,
            "identity": caller.identity,
            "tenant": caller.tenant.id,
            "name": caller.tenant.name,
            "workspace": str(caller.workspace),
            "credentials": sorted(caller.tenant.credentials),
            "rules": {
                c.name: {"base_url": c.base_url, "allow": list(c.allow), "ask": list(c.ask), "deny": list(c.deny)}
                for c in caller.tenant.credentials.values()
            },
        }

    # -- sessions (DESIGN §10) -----------------------------------------------------

    def _who(self, peer: Peer, token: str | None = None) -> dict[str, Any]:
        """`session` and `identity` of a peer, for a record written before the call was identified."""
        try:
            caller = identify(peer, self.config, self.sessions, token)
        except IdentityError as e:
            return {"session": e.session, "identity": e.identity}
        except Exception:  # a record must still be written
            return {"session": None, "identity": None}
        return {"session": caller.session.id if caller.session else None, "identity": caller.identity}

    async def open_session(
        self, peer: Peer, *, tenant: str | None, label: str, ttl: float | None, token: str | None = None
    ) -> dict[str, Any] | Refusal:
        """Open a session rooted at the calling process (`outloop run`), for its folder's tenant.

        The folder must map to the tenant (and to `tenant`, when named); a caller
        already inside a session may open one only for that session's tenant, and
        never one that outlives it.
        """
        config = self.refresh_config()
        base: dict[str, Any] = {"pid": peer.pid, "label": label[:200]}
        if peer.transport != "unix":
            return await self.refuse(peer, "bad_request", "sessions are opened on the broker's Unix socket", base=base)
        try:
            outer: Caller | None = None
            if token is not None or self.sessions.in_tree(peer.lineage()) is not None:
                outer = identify(peer, config, self.sessions, token)
                if outer.session is not None:
                    base.update(session=outer.session.id, identity=outer.identity)
            if (ended := self.sessions.left_over(peer.lineage())) is not None:
                raise IdentityError(
                    "no_session", f"a process left over from ended agent session {ended} cannot open one", pid=peer.pid
                )
            here = identify_folder(peer, config)  # the folder must map, whatever the session
        except IdentityError as e:
            base.update(tenant=e.tenant, workspace=str(e.workspace) if e.workspace else None, exe=e.exe)
            base.setdefault("session", e.session)
            base.setdefault("identity", e.identity)
            return await self.refuse(peer, e.code, f"no session was opened: {e}", base=base)
        parent = outer.session if outer is not None else None
        base.update(tenant=here.tenant.id, workspace=str(here.workspace), exe=here.exe)
        base.setdefault("session", None)
        base.setdefault("identity", "folder")
        if tenant is not None and tenant != here.tenant.id:
            return await self.refuse(
                peer, "wrong_tenant", f"this folder belongs to tenant {here.tenant.id!r}, not {tenant!r}", base=base
            )
        if parent is not None and parent.tenant != here.tenant.id:
            return await self.refuse(
                peer,
                "wrong_tenant",
                f"a process inside tenant {parent.tenant!r}'s session cannot open one for {here.tenant.id!r}",
                base=base,
            )
        seconds = config.broker.session_ttl if ttl is None else ttl
        if not 0 < seconds <= 366 * 86400:
            return await self.refuse(peer, "bad_request", "the session's ttl must be from 1 s to a year", base=base)
        try:
            session, secret_token = self.sessions.open(
                tenant=here.tenant.id,
                workspace=str(here.workspace),
                label=label[:200],
                ttl=seconds,
                root_pid=peer.pid,
                parent=parent,
            )
        except SessionError as e:
            return await self.refuse(peer, e.code, str(e), base=base)
        except OSError as e:  # the state file could not be written
            return await self.refuse(peer, "audit_unavailable", f"the session could not be recorded: {e.strerror}")
        try:
            await self._audit_session("session_open", session, identity=base["identity"])
        except AuditError:
            self.sessions.end(session.id, "not audited")
            return Refusal("audit_unavailable", "the audit log cannot be written; no session was opened", None)
        credentials = sorted((c.name, c.base_url) for c in here.tenant.credentials.values())
        return {
            **session.public(),
            "token": secret_token,
            "listen": self.listen_url,
            "socket": str(self.paths.socket),
            "env": session_env(credentials, self.listen_url, secret_token),
            "clear_env": sorted(KEY_VARIABLES),
            "sandbox": self._sandbox_view(config, here.tenant.id),
        }

    def _sandbox_view(self, config: Config, tenant: str) -> dict[str, list[str]]:
        """What `outloop run --sandbox` must hide and may open, by the config in force (not the file)."""
        others = [str(ws) for t in config.tenants.values() if t.id != tenant for ws in t.workspaces]
        own = [str(self.paths.config_file.parent), str(self.paths.state_dir)]
        return {
            "hide": own + others + [str(p) for p in config.sandbox.hide],
            "read_write": [str(p) for p in config.sandbox.read_write],
        }

    def _outside_sessions(self, peer: Peer, token: str | None) -> str | None:
        """Why `peer` may not manage sessions (only the operator, outside every session, may)."""
        if peer.transport != "unix":
            return "sessions are managed on the broker's Unix socket"
        if token is not None or self.sessions.in_tree(peer.lineage()) is not None:
            return "sessions are listed and revoked by the operator, from outside every session"
        return None

    async def list_sessions(self, peer: Peer, token: str | None = None) -> list[dict[str, Any]] | Refusal:
        """Every live session (for `outloop session list`)."""
        why = self._outside_sessions(peer, token)
        if why is not None:
            return await self.refuse(peer, "denied_by_policy", why)
        self.sessions.sweep()
        return [s.public() for s in self.sessions.live()]

    async def revoke_session(self, peer: Peer | None, session_id: str, token: str | None = None) -> bool | Refusal:
        """End a session now (the operator's call); False if no such live session."""
        if peer is not None:
            why = self._outside_sessions(peer, token)
            if why is not None:
                return await self.refuse(peer, "denied_by_policy", why)
        return self.sessions.end(session_id, "revoked") is not None

    def _session_ended(self, session: Session) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._background(self._audit_session_quietly("session_end", session))

    async def _audit_session_quietly(self, event: str, session: Session) -> None:
        try:
            await self._audit_session(event, session)
        except AuditError:
            pass

    async def _audit_session(self, event: str, session: Session, identity: str | None = None) -> None:
        fields: dict[str, Any] = {
            "event": event,
            "session": session.id,
            "identity": identity,
            "tenant": session.tenant,
            "workspace": session.workspace,
            "pid": session.root_pid,
            "label": session.label,
            "expires": round(session.expires, 3),
        }
        if session.parent:
            fields["parent"] = session.parent
        if session.ended:
            fields["reason"] = session.ended
        await self.audit.record(fields)

    # -- calls ------------------------------------------------------------------

    async def scan_output(
        self,
        peer: Peer,
        token: str | None,
        response: Any,
        extra: list[str],
        where: str | None,
        cwd: str | None,
        *,
        in_thread: bool = False,
    ) -> dict[str, Any] | None:
        """The post hook's question (POST /v1/scan): the keys in a tool's output, and a redacted copy.

        Not a call, so not audited. The tenant is the calling hook's (its session, token
        or folder; None when it has none); the broker already holds the secrets and the
        compiled rules, so the hook loads neither. None when the keyring cannot be read.
        """
        from broker.claude.output import finding_json, inspect_output
        from broker.leaks.scan import ManagedSecrets

        config = self.refresh_config()
        try:
            caller = identify(peer, config, self.sessions, token)
            tenant, workspace = caller.tenant.id, caller.workspace
        except IdentityError:
            tenant, workspace = None, None
        try:
            redactor = self.redactor()
            if self._scan_secrets is None or self._scan_secrets[0] is not redactor:
                # Once per redactor, i.e. per config or keyring change.
                self._scan_secrets = (redactor, ManagedSecrets(self.managed_secrets(strict=True)))
            managed = self._scan_secrets[1]
        except SecretStoreError:
            return None
        # Where the output was seen: the session transcript (the hook names it), else the folder.
        path = Path(where) if where else (workspace or Path(cwd or "/"))

        def scan() -> Any:
            return inspect_output(
                response, extra, path, tenant=tenant, workspace=workspace, managed=managed, redactor=lambda: redactor
            )

        found = await asyncio.to_thread(scan) if in_thread else scan()
        answer: dict[str, Any] = {"tenant": tenant, "workspace": str(workspace) if workspace else None}
        if found is None:
            answer["findings"] = []
        else:
            answer |= {"findings": [finding_json(f) for f in found[0]], "redacted": found[1], "where": str(path)}
        return answer

    def redactor(self) -> Redactor:
        """What answers are redacted with: every managed secret, and the leak rules.

        Raises SecretStoreError when the keyring cannot be read: an answer that
        cannot be redacted of every secret must not be given (nothing is cached
        then, so the next call asks the keyring again).
        """
        if self._redactor is None:
            # Pairs, not a dict by name: acme's "api" and globex's "api" are both redacted.
            secrets = self.managed_secrets(strict=True)
            self._redaction = [(cred, value) for (_t, cred), value in secrets.items()]
            # Basic auth: the whole "user:key", so its base64 goes whole, not the key's bytes only.
            basic = {(c.tenant, c.name): c.auth.arg for c in self.config.credentials() if c.auth.kind == "basic"}
            self._redaction += [(k[1], f"{basic[k]}:{v}") for k, v in secrets.items() if k in basic]
            self._redactor = with_leak_rules(self._redaction)
        return self._redactor

    async def refuse(
        self, peer: Peer | None, code: str, message: str, *, base: dict[str, Any] | None = None, status: int = 0
    ) -> Refusal:
        """Audit a refusal and build its answer (fails closed if the audit cannot be written)."""
        fields = dict(base or {})
        fields.update(event="attempt", decision=code, message=message)
        if peer is not None:
            fields.setdefault("pid", peer.pid)
            if "identity" not in fields:
                fields.update(self._who(peer))
        fields.setdefault("session", None)
        fields.setdefault("identity", None)
        try:
            record = await self.audit.record(fields)
        except AuditError:
            return Refusal("audit_unavailable", "the audit log cannot be written; the call was refused", None)
        self._publish(Refused(code, fields.get("tenant"), fields.get("credential"), message))
        return Refusal(code, message, record["id"], status)

    async def call(self, peer: Peer, req: CallRequest) -> Answer | StreamedAnswer | Refusal:
        """Run one agent call through identity, policy, approval, upstream and audit."""
        self._calls += 1
        try:
            return await self._call(peer, req)
        finally:
            self._calls -= 1

    async def _call(self, peer: Peer, req: CallRequest) -> Answer | StreamedAnswer | Refusal:
        config = self.refresh_config()
        base: dict[str, Any] = {
            "pid": peer.pid,
            "credential": req.credential,
            "method": req.method,
            "path": req.path,
            "reason": req.reason,
        }
        try:
            caller = identify(peer, config, self.sessions, req.token)
        except IdentityError as e:
            base.update(
                tenant=e.tenant,
                workspace=str(e.workspace) if e.workspace else None,
                exe=e.exe,
                session=e.session,
                identity=e.identity,
            )
            return await self.refuse(peer, e.code, str(e), base=base)
        base.update(
            tenant=caller.tenant.id,
            workspace=str(caller.workspace),
            exe=caller.exe,
            session=caller.session.id if caller.session else None,
            identity=caller.identity,
        )

        if self.locked:
            return await self.refuse(peer, "denied_by_operator", "the operator has locked the broker", base=base)
        if req.tenant_claim is not None and req.tenant_claim != caller.tenant.id:
            return await self.refuse(
                peer,
                "wrong_tenant",
                f"this workspace belongs to tenant {caller.tenant.id!r}, not {req.tenant_claim!r}",
                base=base,
            )
        credential = caller.tenant.credentials.get(req.credential)
        if credential is None:
            owners = config.credential_owners(req.credential)
            if owners:
                return await self.refuse(
                    peer,
                    "wrong_tenant",
                    f"credential {req.credential!r} belongs to another tenant than {caller.tenant.id!r}",
                    base=base,
                )
            return await self.refuse(
                peer,
                "unknown_credential",
                f"no credential {req.credential!r}; this workspace may use: "
                f"{', '.join(sorted(caller.tenant.credentials)) or 'none'}",
                base=base,
            )
        base["host"] = credential.host
        try:
            path = normalize_path(
                req.path,
                allow_encoded_slash=credential.allow_encoded_slash,
                allow_path_params=credential.allow_path_params,
            )
        except PathRejected as e:
            return await self.refuse(peer, "bad_request", str(e), base=base)
        base["path"] = path.encoded
        decision = decide(req.method, path, credential.allow, credential.ask, credential.deny)
        base["rule"] = decision.rule
        verdict = await self._authorize(peer, caller, credential, req, path.encoded, decision, base)
        if isinstance(verdict, Refusal):
            return verdict
        return await self._forward(peer, credential, req, path, base, verdict)

    async def _authorize(
        self,
        peer: Peer,
        caller: Caller,
        credential: Credential,
        req: CallRequest,
        path: str,
        decision: Decision,
        base: dict[str, Any],
    ) -> tuple[str, str] | Refusal:
        """(decision, approver) for a call policy lets through, or the refusal."""
        if decision.action == "deny":
            what = f"deny rule {decision.rule!r}" if decision.rule else "no rule allows it"
            return await self.refuse(
                peer, "denied_by_policy", f"{req.method} {path} on {credential.name} is refused: {what}", base=base
            )
        if decision.action == "allow":
            return ("allow", "policy")
        approval = self.approvals.new(
            timeout=self.config.broker.approval_timeout,
            tenant=caller.tenant.id,
            workspace=str(caller.workspace),
            pid=peer.pid,
            exe=caller.exe,
            credential=credential.name,
            method=req.method,
            host=credential.host,
            path=path,
            rule=decision.rule,
            reason=req.reason,
            **self._ask_details(peer, caller, credential, req),
        )
        if self.approvals.granted(approval):
            return ("allow", "always")
        unattended = not self.approvals.attached
        if unattended:  # it waits for an operator to attach; tell the desktop so one does
            notify_desktop(
                "Outloop: a call waits for your approval",
                f"{caller.tenant.id}/{credential.name}: {req.method} {path}. Open `outloop` to answer.",
            )
        waiting = self.approvals.wait(approval)
        if req.hangup is None:
            answer, approver = await waiting
        else:
            answered, gone = asyncio.ensure_future(waiting), asyncio.ensure_future(req.hangup())
            try:
                await asyncio.wait({answered, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not answered.done():  # the agent hung up (Ctrl-C, an SDK's timeout): withdraw the ask
                answered.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await answered
                return await self.refuse(
                    peer, "caller_gone", "the caller hung up before the operator answered", base=base
                )
            answer, approver = answered.result()
        if answer == "timeout" and unattended and not self.approvals.attached:
            return await self.refuse(
                peer,
                "approval_unavailable",
                f"this call needs the operator's approval and no operator attached within "
                f"{self.config.broker.approval_timeout:g} s",
                base=base,
            )
        base["approver"] = approver
        if answer in ("approved", "always"):
            return (answer, approver)
        if answer == "timeout":
            return await self.refuse(
                peer, "approval_timeout", f"nobody answered within {self.config.broker.approval_timeout:g} s", base=base
            )
        return await self.refuse(peer, "denied_by_operator", "the operator refused this call", base=base)

    def _ask_details(self, peer: Peer, caller: Caller, credential: Credential, req: CallRequest) -> dict[str, Any]:
        """What the operator reads before answering an ask: query, headers, body, program.

        Headers that can carry a credential are left out, and everything shown is
        redacted like an answer (an agent may paste a key into its own request).
        """
        try:
            redactor: Redactor | None = self.redactor()
        except SecretStoreError:
            redactor = None

        def clean(text: str) -> str:
            return redactor.text(text) if redactor is not None else "[not shown: the keyring cannot be read]"

        hidden = SECRET_HEADERS | {credential.auth.arg.lower()} if credential.auth.kind == "header" else SECRET_HEADERS
        body = req.body[:ASK_BODY_PREVIEW].decode("utf-8", "replace")
        with contextlib.suppress(ValueError):
            body = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        if len(req.body) > ASK_BODY_PREVIEW:
            body += f"\n… ({len(req.body)} bytes in all)"
        return {
            "query": tuple((k, clean(v)) for k, v in req.query),
            "headers": tuple((k, clean(v)) for k, v in req.headers.items() if k.lower() not in hidden),
            "body_preview": clean(body) if req.body else "",
            "cmdline": clean(command_line(peer.pid)) if peer.pid > 0 else "",
            "session": caller.session.id if caller.session is not None else None,
        }

    async def _forward(
        self,
        peer: Peer,
        credential: Credential,
        req: CallRequest,
        path: Any,
        base: dict[str, Any],
        verdict: tuple[str, str],
    ) -> Answer | StreamedAnswer | Refusal:
        if len(req.body) > self.config.broker.max_request_bytes:
            return await self.refuse(
                peer,
                "bad_request",
                f"the request body is larger than the {self.config.broker.max_request_bytes} byte cap",
                base=base,
                status=413,
            )
        try:
            secret = self.secrets.get(credential.tenant, credential.name)
        except SecretStoreError as e:
            return await self.refuse(peer, "unknown_credential", str(e), base=base)
        if secret is None:
            return await self.refuse(
                peer,
                "unknown_credential",
                f"the keyring holds no secret for {credential.tenant}/{credential.name}; "
                "calls with it are refused until the operator stores one",
                base=base,
            )
        try:
            # Before the key goes out: an answer that cannot be redacted is not given.
            redactor, redaction = self.redactor(), self._redaction
        except SecretStoreError as e:
            return await self.refuse(
                peer, "unknown_credential", f"the answer could not be redacted, so the call was refused: {e}", base=base
            )
        fields = dict(base, event="attempt", decision=verdict[0], approver=verdict[1])
        try:
            # Alone, its fsync has nothing to wait for; in company, they share one.
            attempt = await self.audit.record(fields, batch=self._calls > 1)
        except AuditError:
            return Refusal("audit_unavailable", "the audit log cannot be written; the call was refused", None)
        outcome = dict(base, event="outcome", attempt=attempt["id"], decision=verdict[0])
        start = time.perf_counter()
        self._upstream_calls += 1
        try:
            if req.stream:
                sent = await self._open(credential, secret, req, path, redactor, outcome, start)
                if isinstance(sent, StreamedAnswer):
                    return sent
                status, headers, body, size, ms = sent
            else:
                status, headers, body, size, ms = await self._send(credential, secret, req, path, redactor, redaction)
        except UpstreamError as e:
            failed = dict(outcome, status="upstream_error", message=str(e), ms=_ms_since(start))
            with contextlib.suppress(AuditError):
                await self.audit.record(failed, durable=False)
            return Refusal("upstream_error", str(e), attempt["id"], e.status)
        finally:
            self._upstream_calls -= 1
        try:
            # Written to the file before the answer goes back (a failed write withholds it);
            # its fsync is shared with the next batch instead of delaying this answer.
            await self.audit.record(dict(outcome, status=status, bytes=size, ms=round(ms, 2)), durable=False)
        except AuditError:
            return Refusal(
                "audit_unavailable", "the audit log cannot be written; the response was withheld", attempt["id"]
            )
        return Answer(status, headers, body, attempt["id"])

    async def _open(
        self,
        credential: Credential,
        secret: Secret,
        req: CallRequest,
        path: NormalPath,
        redactor: Redactor,
        outcome: dict[str, Any],
        start: float,
    ) -> StreamedAnswer | tuple[int, list[tuple[str, str]], bytes, int, float]:
        """A /v1/proxy call: its answer streamed, or, when it is short and says so, read whole
        (it arrives at once anyway, and goes back with its length)."""
        assert self._forwarder is not None
        upstream = await self._forwarder.open(credential, secret, req.method, path, req.query, req.headers, req.body)
        try:
            headers = redactor.headers(upstream.headers)
        except BaseException:
            await upstream.aclose()  # (its connection holds one of the credential's slots)
            raise
        content_type = next((v for k, v in upstream.headers if k == "content-type"), "")
        if req.method == "HEAD" or (
            upstream.declared is not None
            and upstream.declared <= WHOLE_ANSWER_BYTES
            and "event-stream" not in content_type.lower()
        ):
            body = await upstream.read()
            return upstream.status, headers, redactor.bytes(body), len(body), upstream.ms
        chunks = self._relay(upstream, StreamRedactor(redactor), dict(outcome, status=upstream.status), start)
        await anext(chunks)  # started, so that closing it early still ends the call and audits it
        return StreamedAnswer(upstream.status, headers, chunks, outcome["attempt"])

    async def _relay(
        self, upstream: UpstreamStream, redacting: StreamRedactor, outcome: dict[str, Any], start: float
    ) -> AsyncGenerator[bytes, None]:
        """The answer's body as it arrives, redacted; its outcome audited when it ends: whole,
        broken off by the upstream (upstream_error), dropped by the agent (client_gone), or
        cut because the broker stops (broker_stopped)."""
        self._upstream_calls += 1
        try:
            yield b""  # (the priming step: see _open)
            async for chunk in upstream.chunks():
                out = redacting.feed(chunk)
                if out:
                    yield out
            out = redacting.close()
            if out:
                yield out
        except UpstreamError as e:
            outcome.update(upstream_status=outcome["status"], status="upstream_error", message=str(e))
            raise
        except (GeneratorExit, asyncio.CancelledError):
            cut = "broker_stopped" if self._stopping else "client_gone"
            outcome.update(upstream_status=outcome["status"], status=cut)
            raise
        finally:
            self._upstream_calls -= 1
            await upstream.aclose()
            outcome.update(bytes=upstream.received, ms=_ms_since(start))
            with contextlib.suppress(AuditError):
                await self.audit.record(outcome, durable=False)

    async def _send(
        self,
        credential: Credential,
        secret: Secret,
        req: CallRequest,
        path: NormalPath,
        redactor: Redactor,
        redaction: list[tuple[str, str]],
    ) -> tuple[int, list[tuple[str, str]], bytes, int, float]:
        """(status, redacted headers, redacted body, upstream body size, ms) of one call.

        While other calls are on the wire too, a forwarding worker makes it (the loop
        stays free for deciding and auditing calls); alone, it is made here, which is
        quicker than a hop to another process.
        """
        pool = self._pool
        if pool is not None and self._upstream_calls > BUSY_CALLS:
            if pool.ready:
                return await pool.forward(
                    credential,
                    secret,
                    req.method,
                    path,
                    req.query,
                    req.headers,
                    req.body,
                    settings=UpstreamSettings.of(self.config.broker),
                    redaction=redaction,
                )
            pool.start_soon()
        assert self._forwarder is not None
        upstream = await self._forwarder.send(credential, secret, req.method, path, req.query, req.headers, req.body)
        return (
            upstream.status,
            redactor.headers(upstream.headers),
            redactor.bytes(upstream.body),
            len(upstream.body),
            upstream.ms,
        )


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
