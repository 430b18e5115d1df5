"""The Outloop dashboard: the embedded broker and watcher, approvals, audit, alerts, tenants.

The app owns an `Engine` (broker/engine.py) and talks to it only through its
façade. The engine runs on the app's own asyncio loop, started by a named
worker; its events reach the app through `EventBridge` (messages.py), the one
place where they become Textual messages. Audit records are buffered there and
drained into the audit pane every 100 ms, so a flood costs one Log write per
tick rather than one refresh per record.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable
from textual.worker import Worker, WorkerState

from broker import manage
from broker.config import ConfigError
from broker.engine import Engine
from broker.events import PendingApproval, Snapshot
from broker.operator.client import RemoteEngine, operator_socket_live
from broker.paths import Paths
from broker.secrets import SecretStoreError
from outloop_tui.commands import OutloopCommands
from outloop_tui.messages import (
    AlertsChanged,
    ApprovalAsked,
    ApprovalDone,
    BrokerState,
    CallRefused,
    ConfigChanged,
    ConfigDecided,
    ConfigInvalid,
    ConfigWaiting,
    EventBridge,
    WatcherChanged,
)
from outloop_tui.widgets.alerts import AlertAction, AlertScreen, AlertsPane
from outloop_tui.widgets.approvals import SAFE_METHODS, ApprovalScreen, ApprovalsPane, GrantsScreen, duration
from outloop_tui.widgets.audit import LINE_CAP, AuditPane
from outloop_tui.widgets.config_review import ConfigReviewScreen
from outloop_tui.widgets.confirm import ConfirmScreen
from outloop_tui.widgets.first_run import FirstRunScreen
from outloop_tui.widgets.footer import KeyFooter
from outloop_tui.widgets.forms import (
    AddCredentialScreen,
    Added,
    AddTenantScreen,
    AddWorkspaceScreen,
    EditCredentialScreen,
)
from outloop_tui.widgets.header import Banner, Status, StatusHeader
from outloop_tui.widgets.help import HelpScreen
from outloop_tui.widgets.sessions import SessionsScreen
from outloop_tui.widgets.tenants import NodeRef, TenantsTree

if TYPE_CHECKING:
    from broker.calls.approvals import GrantKey

AUDIT_DRAIN_SECONDS = 0.1
RECENT_AUDIT = 200  # records the audit pane opens with
TICK_SECONDS = 1.0
DECISION_WORDS = {"approved": "Approved", "always": "Always allowed", "denied": "Denied"}


class DashboardScreen(Screen[None]):
    """The four panes, the status line and the keys that act on them.

    Below 120 columns the tenants pane gives its width to the others; below 40
    rows the approvals and alerts panes shrink so the audit stream keeps a few
    lines (app.tcss: `-narrow`, `-short`).
    """

    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]

    BINDINGS = [
        Binding(
            "y",
            "answer('approved')",
            "Approve",
            id="approve",
            tooltip="approve the highlighted (or oldest) pending call once",
        ),
        Binding("n", "answer('denied')", "Deny", id="deny", tooltip="refuse the highlighted (or oldest) pending call"),
        Binding(
            "a",
            "answer('always')",
            "Always",
            id="always",
            tooltip="approve, and let the same credential + method + rule through until it expires",
        ),
        Binding("tab", "app.focus_next", "Next pane", id="next-pane", show=False),
        Binding("shift+tab", "app.focus_previous", "Previous pane", id="previous-pane", show=False),
        Binding(
            "slash", "filter", "Filter", id="filter", tooltip="filter the audit stream by tenant, outcome and text"
        ),
        Binding("t", "add_tenant", "Tenant+", id="add-tenant", tooltip="add a tenant (a client)"),
        Binding("w", "add_workspace", "Workspace+", id="add-workspace", tooltip="map a workspace folder to a tenant"),
        Binding(
            "c",
            "add_credential",
            "Credential+",
            id="add-credential",
            tooltip="add a credential; the secret goes straight to the keyring",
        ),
        Binding(
            "e",
            "edit",
            "Edit",
            id="edit",
            tooltip="edit the highlighted credential's URL, auth and rules, or rotate its secret",
        ),
        Binding(
            "x",
            "remove",
            "Remove",
            id="remove",
            tooltip="remove the highlighted tenant, workspace or credential (asks first)",
        ),
        Binding("g", "grants", "Grants", id="grants", tooltip="list the live 'always' grants and revoke one"),
        Binding(
            "v",
            "review_config",
            "Config",
            id="review-config",
            tooltip="review a config.toml change that waits for you, and accept or reject it",
        ),
        Binding("s", "sessions", "Sessions", id="sessions", tooltip="list the agent sessions and end one"),
        Binding("r", "rescan", "Rescan", id="rescan", tooltip="rescan every workspace for leaked keys"),
        Binding(
            "l",
            "toggle_lock",
            "Lock",
            id="lock",
            tooltip="lock: refuse every call (and everything pending) until unlocked",
        ),
        Binding("question_mark", "help", "Help", id="help", tooltip="show every key"),
        Binding("q", "app.quit", "Quit", id="quit", tooltip="quit; pending calls are refused (asks first)"),
    ]

    _always_armed: str | None = None  # the approval whose "always" waits for its second press

    def compose(self) -> ComposeResult:
        app = self.dashboard_app
        yield StatusHeader(id="status")
        yield Banner("", id="banner")
        with Horizontal(id="panes"):
            yield TenantsTree(id="tenants")
            with Vertical(id="right"):
                yield ApprovalsPane(app.clock, id="approvals")
                yield AuditPane(line_cap=app.line_cap, id="audit")
                yield AlertsPane(app.wall, id="alerts")
        yield KeyFooter()

    @property
    def dashboard_app(self) -> OutloopApp:
        app = self.app
        assert isinstance(app, OutloopApp)
        return app

    @property
    def engine(self) -> Engine | RemoteEngine:
        return self.dashboard_app.engine

    def on_mount(self) -> None:
        self.dashboard_app.show_banners()
        self.query_one("#approvals-table", DataTable).focus()
        # What the log already holds, read before the engine starts: from then on every
        # record arrives as an event, so none is shown twice.
        self.query_one(AuditPane).add_records(self.engine.recent_audit(RECENT_AUDIT))
        # The engine starts once the panes exist, so its first events always have a home.
        self.dashboard_app.start_broker()

    # -- approvals --------------------------------------------------------------

    def action_answer(self, decision: str) -> None:
        pane = self.query_one(ApprovalsPane)
        pending = self.engine.pending()
        target = pane.highlighted() if pane.table.has_focus else None
        if target is None and pending:
            target = pending[0].id
        approval = next((a for a in pending if a.id == target), None)
        if approval is None:
            self.notify("Nothing is waiting for approval.", timeout=3)
            return
        if decision == "always" and approval.method not in SAFE_METHODS and self._always_armed != approval.id:
            # "Always" on a call that changes things lets every later one of its rule through
            # unasked: one more press, so a slip of the finger does not.
            self._always_armed = approval.id
            self.notify(
                f"Press a again to let every {approval.method} of {approval.rule or approval.path} "
                "through unasked until the grant expires.",
                title="Always allow?",
                severity="warning",
                timeout=5,
            )
            return
        self._always_armed = None
        self.answer(approval, decision)

    def answer(self, approval: PendingApproval, decision: str) -> None:
        """Answer one waiting call and say so; a call that went meanwhile is said to be gone."""
        if not self.engine.answer(approval.id, decision):
            self.notify("That call is no longer waiting.", timeout=3)
        else:
            what = f"{approval.method} {approval.path} ({approval.tenant}/{approval.credential})"
            if decision == "always":
                ttl = duration(self.engine.config.broker.always_ttl)
                self.notify(f"{what} and the same rule for the next {ttl}.", title="Always allowed", timeout=4)
            else:
                self.notify(
                    what,
                    title=DECISION_WORDS[decision],
                    timeout=3,
                    severity="information" if decision != "denied" else "warning",
                )
        self.refresh_view()

    # -- panes ------------------------------------------------------------------

    def action_filter(self) -> None:
        tree = self.query_one(TenantsTree)
        prefill = None
        if tree.has_focus and (tenant := tree.selected_tenant()):
            prefill = f"tenant:{tenant} "
        self.query_one(AuditPane).open_filter(prefill)

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(b for b in self.BINDINGS if isinstance(b, Binding)))

    @on(DataTable.RowSelected, "#approvals-table")
    def _approval_selected(self, event: DataTable.RowSelected) -> None:
        approval = next((a for a in self.engine.pending() if a.id == event.row_key.value), None)
        if approval is None:
            return

        def done(decision: str | None) -> None:
            if decision is not None:
                self.answer(approval, decision)

        self.app.push_screen(ApprovalScreen(approval), done)

    @on(DataTable.RowSelected, "#alerts")
    def _alert_selected(self, event: DataTable.RowSelected) -> None:
        view = self.query_one(AlertsPane).views.get(str(event.row_key.value))
        if view is None:
            return

        def done(action: AlertAction | None) -> None:
            if action is not None and action.kind == "import":
                self.move_alert_key(view.path, view.fingerprint)
            elif action is not None:
                self.dashboard_app.act_on_alert(view.id, view.fingerprint, action)

        self.app.push_screen(AlertScreen(view), done)

    def move_alert_key(self, path: str, fingerprint: str) -> None:
        """An alert's key into the keyring: `outloop import`'s plan for that one value, confirmed first."""
        from broker import importer
        from outloop_tui.cmd_import import print_plan

        paths, secrets = self.engine.paths, self.engine.secrets
        try:
            plan = importer.plan_import(paths, Path(path), secrets=secrets, only_fingerprints={fingerprint})
        except (ConfigError, SecretStoreError) as e:
            self.notify(str(e), title="Not moved", severity="error")
            return
        if not plan.ready():
            why = "\n".join(print_plan(plan)[1:])
            self.notify(why, title="Not moved", severity="warning", timeout=10)
            return

        def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            try:
                result = importer.apply_import(plan, paths, secrets)
            except (ConfigError, SecretStoreError, OSError) as e:
                self.notify(str(e), title="Not moved", severity="error")
                return
            self.engine.refresh_config()
            names = ", ".join(f"{plan.tenant}/{n}" for n in result.stored + result.reused)
            self.notify(f"The key is in the keyring as {names}; the file holds its placeholder.", title="Moved")
            self.dashboard_app.rescan()  # the alert resolves: the file no longer holds the value
            self.refresh_view()

        question = "\n".join(print_plan(plan))
        self.app.push_screen(ConfirmScreen("Move into the keyring?", question, yes="Move", no="Keep"), confirmed)

    # -- tenants, workspaces, credentials -----------------------------------------

    def _tenants(self) -> list[tuple[str, str]]:
        try:
            return [(t.id, t.name) for t in self.engine.config.tenants.values()]
        except RuntimeError:
            return []

    def action_add_tenant(self) -> None:
        self.app.push_screen(AddTenantScreen(self.engine.paths), self._added)

    def action_add_workspace(self, tenant: str | None = None) -> None:
        if not self._tenants():
            self.notify("Add a tenant first (t).", severity="warning")
            return
        tenant = tenant or self.query_one(TenantsTree).selected_tenant()
        self.app.push_screen(AddWorkspaceScreen(self.engine.paths, self._tenants(), tenant), self._added)

    def action_add_credential(self) -> None:
        if not self._tenants():
            self.notify("Add a tenant first (t).", severity="warning")
            return
        tenant = self.query_one(TenantsTree).selected_tenant()
        self.app.push_screen(
            AddCredentialScreen(self.engine.paths, self._tenants(), tenant, self.engine.secrets), self._added
        )

    def _selected_node(self) -> NodeRef | None:
        node = self.query_one(TenantsTree).cursor_node
        return node.data if node is not None else None

    def action_edit(self) -> None:
        ref = self._selected_node()
        config = self.engine.snapshot().config
        tenant = config.tenants.get(ref.tenant) if config and ref else None
        credential = tenant.credentials.get(ref.name) if tenant and ref and ref.kind == "credential" else None
        if credential is None:
            self.notify("Highlight a credential (key …) in the tenants pane, then press e.", timeout=4)
            return
        self.app.push_screen(EditCredentialScreen(self.engine.paths, credential, self.engine.secrets), self._edited)

    def _edited(self, added: Added | None) -> None:
        if added is not None:
            self.engine.refresh_config()
            self.notify(f"{added.tenant}/{added.name} saved.", title="Credential updated")
            self.refresh_view()

    def action_remove(self) -> None:
        ref = self._selected_node()
        config = self.engine.snapshot().config
        tenant = config.tenants.get(ref.tenant) if config and ref else None
        if ref is None or tenant is None:
            self.notify("Highlight a tenant, workspace or credential in the tenants pane, then press x.", timeout=4)
            return
        paths, secrets = self.engine.paths, self.engine.secrets
        if ref.kind == "credential":
            question = f"Remove credential {ref.tenant}/{ref.name} and delete its secret from the keyring?"

            def remove() -> str:
                manage.remove_credential(paths, ref.tenant, ref.name, secrets)
                return f"Credential {ref.tenant}/{ref.name} removed; its secret is gone from the keyring."

        elif ref.kind == "workspace":
            question = f"Unmap {ref.name} from {ref.tenant}? Agents there will be refused."

            def remove() -> str:
                manage.remove_workspace(paths, ref.name)
                return f"{ref.name} is no longer mapped."

        else:
            names = ", ".join(sorted(tenant.credentials)) or "no credentials"
            question = f"Remove tenant {ref.tenant} and delete the keyring secrets of {names}?"

            def remove() -> str:
                manage.remove_tenant(paths, ref.tenant, secrets)
                return f"Tenant {ref.tenant} removed."

        def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            try:
                done = remove()
            except (ConfigError, SecretStoreError) as e:
                self.notify(str(e), title="Not removed", severity="error")
                return
            self.engine.refresh_config()
            self.notify(done, title="Removed")
            self.refresh_view()

        self.app.push_screen(ConfirmScreen("Remove?", question, yes="Remove", no="Keep"), confirmed)

    def action_grants(self) -> None:
        snap = self.engine.snapshot()
        now = self.dashboard_app.clock()
        if not snap.grants:
            self.notify("No 'always' grant is live.", timeout=3)
            return

        def revoke(key: GrantKey | None) -> None:
            if key is not None and self.engine.revoke_grant(key):
                self.notify(" · ".join((key[0], key[1], key[3])), title="Grant revoked")
                self.refresh_view()

        self.app.push_screen(GrantsScreen([(g.key, g.expires - now) for g in snap.grants]), revoke)

    def action_sessions(self) -> None:
        sessions = self.engine.snapshot().sessions
        if not sessions:
            self.notify("No agent session is live (start agents with `outloop run -- CMD`).", timeout=4)
            return

        def end(session_id: str | None) -> None:
            if session_id is not None:
                self._end_session(session_id)

        self.app.push_screen(SessionsScreen(sessions, self.dashboard_app.wall()), end)

    @work(group="sessions", exit_on_error=False, name="end-session")
    async def _end_session(self, session_id: str) -> None:
        ended = await self.engine.revoke_session(None, session_id)
        if ended is True:
            self.notify(f"Session {session_id} ended: its next call is refused.", title="Session ended")
        else:
            self.notify("That session had already ended.", timeout=3)
        self.refresh_view()

    def _added(self, added: Added | None) -> None:
        if added is None:
            return
        self.engine.refresh_config()
        if added.kind == "tenant":
            self.notify("Now map a folder to it (w) and add a credential (c).", title=f"Tenant {added.tenant} added")
        elif added.kind == "workspace":
            self.notify(added.name, title=f"Workspace mapped to {added.tenant}")
        else:
            self.notify(f"{added.tenant}/{added.name}: the secret is in the keyring.", title="Credential added")
        self.refresh_view()

    # -- broker -----------------------------------------------------------------

    def action_rescan(self) -> None:
        self.dashboard_app.rescan()

    def action_toggle_lock(self) -> None:
        engine = self.engine
        if engine.locked:
            engine.unlock()
            self.notify("Calls are served again.", title="Unlocked")
        else:
            engine.lock()
            self.notify(
                "Every call is refused until you press l again; grants revoked.", title="Locked", severity="warning"
            )
        self.refresh_view()

    # -- engine messages ----------------------------------------------------------

    def on_approval_asked(self, message: ApprovalAsked) -> None:
        a = message.approval
        self.app.bell()
        self.dashboard_app.desktop_notify("Outloop: approval needed", f"{a.tenant}/{a.credential}: {a.method} {a.path}")
        self.notify(
            f"{a.tenant}/{a.credential}: {a.method} {a.path}"
            + (f'\n"{a.reason}"' if a.reason else "")
            + "\ny approve · n deny · a always",
            title="Approval needed",
            severity="warning",
            timeout=8,
        )
        self.refresh_view()

    def on_approval_done(self, message: ApprovalDone) -> None:
        if message.decision == "timeout":
            a = message.approval
            self.notify(
                f"{a.method} {a.path} ({a.tenant}) was refused: nobody answered in time.",
                title="Approval timed out",
                severity="warning",
            )
        self.refresh_view()

    def on_call_refused(self, message: CallRefused) -> None:
        if message.code == "wrong_tenant":
            self.app.bell()
            self.notify(
                f"{message.message}", title=f"Wrong tenant ({message.tenant or '?'})", severity="error", timeout=8
            )

    def on_broker_state(self, message: BrokerState) -> None:
        app = self.dashboard_app
        if message.state == "error":
            app.set_banner("broker", f"Broker error: {message.detail}")
        self.refresh_view()

    def on_config_changed(self, message: ConfigChanged) -> None:
        self.dashboard_app.set_banner("config", "")
        self.refresh_view()

    def on_config_waiting(self, message: ConfigWaiting) -> None:
        self.dashboard_app.set_banner(
            "staged", f"A config.toml change widens access and waits for you ({len(message.changes)}): press v."
        )
        self.app.bell()
        self.notify(
            "\n".join(message.changes[:5]), title="Config change waits for you (v)", severity="warning", timeout=15
        )

    def on_config_decided(self, message: ConfigDecided) -> None:
        self.dashboard_app.set_banner("staged", "")
        self.refresh_view()

    def action_review_config(self) -> None:
        """Show the staged config change; y accepts it, n rejects it (config.toml goes back)."""
        staged = self.engine.snapshot().staged
        if staged is None:
            self.notify("No config change waits for you.", timeout=3)
            return

        def decided(accept: bool | None) -> None:
            if accept is None:
                return  # later: it goes on waiting
            act = self.engine.accept_config if accept else self.engine.reject_config
            why = act(staged.digest, "operator (dashboard)")
            if why:
                self.notify(why, title="Config change", severity="warning")
            else:
                self.notify("Accepted." if accept else "Rejected; config.toml is back.", title="Config change")

        self.app.push_screen(ConfigReviewScreen(list(staged.changes), list(staged.applied)), decided)

    def on_config_invalid(self, message: ConfigInvalid) -> None:
        self.dashboard_app.set_banner(
            "config",
            f"config.toml was changed but is not valid; the last good config stays in force. {message.message}",
        )

    def on_alerts_changed(self, message: AlertsChanged) -> None:
        if message.raised is not None:
            from outloop_tui.widgets.alerts import AlertView

            v = AlertView.of(message.raised)
            self.app.bell()
            self.notify(
                f"{v.tenant}: {v.where} ({v.rule}) {v.preview}",
                title=f"Leak alert: {v.severity}",
                severity="error" if v.severity in ("critical", "high") else "warning",
                timeout=8,
            )
        self.refresh_view()

    def on_watcher_changed(self, message: WatcherChanged) -> None:
        self.refresh_view()

    # -- view ---------------------------------------------------------------------

    def refresh_view(self) -> None:
        """Bring every pane up to date with the engine (cheap: each pane diffs)."""
        app = self.dashboard_app
        snap = self.engine.snapshot()
        now = app.clock()
        grants = [(f"{g.key[0]} · {g.key[1]} · {g.key[3]}", g.expires - now) for g in snap.grants]
        self.query_one(ApprovalsPane).sync(snap.pending, grants)
        self.query_one(AlertsPane).sync(snap.alerts, app.watcher_note(snap), app.acked)
        app.show_watcher_problems(snap)
        if app.started and snap.config is not None:
            counts = Counter(a.tenant or "" for a in snap.alerts)
            self.query_one(TenantsTree).show(snap.config, counts)
        self.update_status(snap)

    def update_status(self, snap: Snapshot | None = None) -> None:
        app = self.dashboard_app
        if snap is None:
            snap = self.engine.snapshot()
        tenants = workspaces = credentials = 0
        if app.started and snap.config is not None:
            config = snap.config
            tenants = len(config.tenants)
            workspaces = sum(len(t.workspaces) for t in config.tenants.values())
            credentials = sum(len(t.credentials) for t in config.tenants.values())
        state = app.broker_state()
        self.query_one(StatusHeader).show(
            Status(
                state,
                snap.socket,
                tenants,
                workspaces,
                credentials,
                len(snap.pending),
                len(snap.alerts),
                app.bridge.audit_seen,
                scanning=snap.watcher.brief() if snap.watcher is not None else "",
            )
        )
        self.set_class(state == "locked", "-locked")

    def drain_audit(self) -> None:
        records = self.dashboard_app.bridge.drain_audit()
        pane = self.query_one(AuditPane)
        if records:
            pane.add_records(records)
            self.update_status()
        else:
            pane.mark_unseen()


class OutloopApp(App[int]):
    """The dashboard. `engine` is started on mount and stopped on exit."""

    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses live elsewhere
    TITLE = "Outloop"
    COMMANDS = App.COMMANDS | {OutloopCommands}
    BINDINGS = [
        Binding(
            "ctrl+q",
            "quit",
            "Quit",
            id="app-quit",
            show=False,
            priority=True,
            tooltip="quit; pending calls are refused (asks first)",
        ),
    ]

    def __init__(
        self,
        engine: Engine | RemoteEngine,
        *,
        watch: bool = True,
        serve: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        line_cap: int = LINE_CAP,
        tick: float = TICK_SECONDS,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.watch_leaks = watch  # not `watch`: that is Textual's DOMNode.watch
        self.serve = serve
        self.clock = clock
        self.wall = wall
        self.line_cap = line_cap
        self.tick = tick
        self.bridge = EventBridge(self._post_to_dashboard)
        self.started = False
        self.start_error = ""
        self._unsubscribe: Callable[[], None] | None = None
        self._stopped = False
        self._banners: dict[str, str] = {}
        self.acked: set[str] = set()  # alert ids the operator has acknowledged this session
        self.ready = asyncio.Event()

    def get_default_screen(self) -> Screen[Any]:
        return DashboardScreen(id="dashboard")

    @property
    def dashboard(self) -> DashboardScreen:
        screen = self.screen_stack[0]
        assert isinstance(screen, DashboardScreen)
        return screen

    def _post_to_dashboard(self, message: Any) -> None:
        self.screen_stack[0].post_message(message)

    # -- lifecycle --------------------------------------------------------------

    def on_mount(self) -> None:
        self._unsubscribe = self.engine.subscribe(self.bridge)
        self.engine.attach_approver()
        info = self.engine.keyring()
        if not info.usable:
            self.set_banner(
                "keyring", f"No usable keyring ({info.name}): credentials cannot be stored or used. {info.advice}"
            )
        if self.attached:
            self.set_banner(
                "attached",
                "Attached to the broker running in another process: quitting leaves it serving, "
                "and calls you leave waiting wait for the next operator.",
            )
        self.set_interval(AUDIT_DRAIN_SECONDS, self._drain_audit, name="audit-drain")
        self.set_interval(self.tick, self._tick, name="tick")

    @work(group="broker", exclusive=True, exit_on_error=False, name="broker")
    async def start_broker(self) -> None:
        await self.engine.start(serve=self.serve, watch=self.watch_leaks)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "broker":
            return
        if event.state == WorkerState.SUCCESS:
            self.started = True
            self.dashboard.refresh_view()
            self.ready.set()
            if not self.engine.config.tenants:
                self.push_screen(FirstRunScreen(), self._first_run_done)
        elif event.state == WorkerState.ERROR:
            error = event.worker.error
            self.start_error = str(error) or type(error).__name__
            self.set_banner("broker", f"The broker could not start: {self.start_error}")
            self.notify(self.start_error, title="Broker error", severity="error", timeout=15)
            self.dashboard.update_status()
            self.ready.set()

    def _first_run_done(self, tenant: str | None) -> None:
        if tenant is None:
            self.exit(0)
            return
        self.engine.refresh_config()
        self.dashboard.refresh_view()
        self.dashboard.action_add_workspace(tenant)

    async def stop_engine(self) -> None:
        """Refuse what is pending, then stop the engine (which sends those answers first)."""
        if self._stopped:
            return
        self._stopped = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        # Denies everything pending; the engine's stop lets those answers go out.
        self.engine.detach_approver()
        if self.started:
            await self.engine.stop()

    async def on_unmount(self) -> None:
        await self.stop_engine()

    @property
    def attached(self) -> bool:
        """Attached to a broker in another process: quitting leaves it (and what waits) running."""
        return isinstance(self.engine, RemoteEngine)

    async def action_quit(self) -> None:
        pending = len(self.engine.pending()) if self.started and not self.attached else 0
        if not pending:
            await self.stop_engine()
            self.exit(0)
            return

        async def confirmed(yes: bool | None) -> None:
            if yes:
                await self.stop_engine()
                self.exit(0)

        calls = f"{pending} call{'s are' if pending > 1 else ' is'}"
        await self.push_screen(
            ConfirmScreen(
                "Quit Outloop?",
                f"{calls} waiting for your approval. Quitting refuses "
                f"{'them' if pending > 1 else 'it'} and stops the broker.",
                yes="Quit and refuse",
                no="Stay",
            ),
            confirmed,
        )

    # -- state --------------------------------------------------------------------

    def broker_state(self) -> str:
        if self.start_error:
            return "error"
        if self.engine.locked:
            return "locked"
        return self.engine.state

    def desktop_notify(self, title: str, body: str) -> None:
        """A notification from the terminal itself (OSC 777 and OSC 9: kitty, iTerm2, WezTerm, foot,
        Windows Terminal...), for an operator whose eyes are in another window."""
        if not self.is_headless and self._driver is not None:
            self._driver.write(osc_notification(title, body))

    def set_banner(self, key: str, message: str) -> None:
        if self._banners.get(key, "") == message:
            return
        if message:
            self._banners[key] = message
        else:
            self._banners.pop(key, None)
        self.show_banners()

    def show_banners(self) -> None:
        banner = self.dashboard.query("#banner")
        if banner:
            banner.first(Banner).say("\n".join(self._banners.values()))

    def watcher_note(self, snap: Snapshot) -> str:
        if not self.started:
            return ""
        if snap.watcher is None:
            return "leak watcher off" if not self.watch_leaks else "leak watcher not available"
        progress = snap.watcher.progress()
        return f"{progress} · alerts appear as they are found" if progress else ""

    def show_watcher_problems(self, snap: Snapshot) -> None:
        """What the leak watcher cannot watch (folders polled past the inotify limit, folders
        it cannot read), in the banner, with what to do; gone once it is fixed."""
        problems = snap.watcher.problems() if snap.watcher is not None else []
        self.set_banner("watcher", "\n".join(f"Leak watcher: {p}" for p in problems))

    def act_on_alert(self, alert_id: str, fingerprint: str, action: AlertAction) -> None:
        if action.kind == "ack":
            # The alert stays open while the file holds the value; acknowledging marks it
            # seen for this session (dimmed, no longer counted as new).
            self.acked.add(alert_id)
            self.notify("Alert acknowledged; it stays listed until the file no longer holds the value.")
        else:
            self.engine.ignore_alert(fingerprint, action.reason)
            self.notify("This value is ignored from now on, everywhere.", title="Alert ignored")
        self.dashboard.refresh_view()

    def rescan(self) -> None:
        if self.engine.snapshot().watcher is None:
            self.notify("The leak watcher is not running.", severity="warning")
            return
        self.notify("Rescanning every workspace…", timeout=2)
        self._rescan()

    @work(group="rescan", exclusive=True, exit_on_error=False, name="rescan")
    async def _rescan(self) -> None:
        await self.engine.rescan()
        self.dashboard.refresh_view()

    # -- timers -------------------------------------------------------------------

    # While the app shuts down a timer may still fire after its panes (NoMatches),
    # or its screens (an empty stack), are gone.

    def _drain_audit(self) -> None:
        if self.screen_stack:
            with contextlib.suppress(NoMatches):
                self.dashboard.drain_audit()

    def _tick(self) -> None:
        if self.screen_stack:
            with contextlib.suppress(NoMatches):
                self.dashboard.refresh_view()


def osc_notification(title: str, body: str) -> str:
    """The terminal escapes for a desktop notification; control characters and ';' cannot end them early."""

    def clean(text: str) -> str:
        return "".join(" " if ord(c) < 0x20 or ord(c) == 0x7F or c == ";" else c for c in text)[:200]

    t, b = clean(title), clean(body)
    return f"\x1b]777;notify;{t};{b}\x07\x1b]9;{t}: {b}\x07"


def run_dashboard(args: argparse.Namespace) -> int:
    """`outloop` with no command: the dashboard on this user's real home."""
    from broker.config import load_config

    paths = Paths.from_env()
    paths.check_socket_path()
    load_config(paths)  # a malformed config.toml is one clear sentence, before the screen opens
    # A broker already running (`outloop broker`, a service, another dashboard): attach to it.
    engine = RemoteEngine(paths) if operator_socket_live(paths.operator_socket) else Engine(paths)
    app = OutloopApp(engine)
    app.run()
    return app.return_code or 0
