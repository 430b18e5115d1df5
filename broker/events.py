"""Every event the engine publishes to subscribers (the dashboard, `outloop broker`'s log).

Plain dataclasses, and `Event` is their union: subscribers match on the type
(the TUI turns them into Textual messages in one place, outloop_tui/messages.py).
None of them ever carries a secret; an alert carries a masked preview.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: the modules that define them import these events, not the reverse
    from broker.calls.approvals import Grant
    from broker.config import Config
    from broker.leaks.alerts import Alert
    from broker.leaks.watcher import WatcherHealth


@dataclass(frozen=True)
class PendingApproval:
    """An `ask` call waiting for the operator."""

    id: str
    created: float  # time.monotonic() when it started waiting
    deadline: float  # time.monotonic() when it is denied unanswered
    created_wall: float  # time.time(), for display
    tenant: str
    workspace: str
    pid: int
    exe: str
    credential: str
    method: str
    host: str
    path: str
    rule: str | None  # the ask rule that matched; None when the credential has no rules
    reason: str
    # What the operator reads before answering (never a credential header; the body redacted).
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body_preview: str = ""
    cmdline: str = ""  # the calling program's command line, as the OS reports it
    session: str | None = None  # the agent session's id, when the call came from one


@dataclass(frozen=True)
class ApprovalRequested:
    approval: PendingApproval


@dataclass(frozen=True)
class ApprovalResolved:
    approval: PendingApproval
    decision: str  # "approved" | "always" | "denied" | "timeout" | "cancelled"
    approver: str


@dataclass(frozen=True)
class AuditRecorded:
    record: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    """A refused call, raised separately so the dashboard can ring for wrong_tenant."""

    code: str
    tenant: str | None
    credential: str | None
    message: str


@dataclass(frozen=True)
class BrokerStateChanged:
    state: str  # "starting" | "listening" | "locked" | "stopped" | "error"
    detail: str = ""


@dataclass(frozen=True)
class ConfigReloaded:
    tenants: int


@dataclass(frozen=True)
class ConfigRejected:
    """config.toml changed but does not validate; the last good config stays in force."""

    message: str


@dataclass(frozen=True)
class ConfigStaged:
    """config.toml changed outside Outloop in a way that widens access: it waits for the operator.

    `digest` names the content (accept or reject it by that); `changes` says what it
    would do, one line each, never a secret. A newer edit stages again, replacing this.
    """

    digest: str
    changes: list[str]
    applied: list[str] = field(default_factory=list)  # what narrowed access at once, from the same edit


@dataclass(frozen=True)
class ConfigStageCleared:
    """Nothing waits any more: `outcome` is "accepted", "rejected" or "withdrawn" (edited back)."""

    outcome: str
    approver: str = ""


# What the dashboard shows (Engine.snapshot, and the same over the operator channel).


@dataclass(frozen=True)
class Snapshot:
    """What the dashboard shows, read in one go (the dashboard never reaches into stores)."""

    state: str  # "starting" | "listening" | "locked" | "stopped" | "error"
    locked: bool
    socket: str
    config: Config | None  # None until the engine has started
    pending: list[PendingApproval]
    grants: list[Grant]  # live "always" grants; `expires` is on the engine's monotonic clock
    alerts: list[Alert]  # open leak alerts, most severe first
    watcher: WatcherHealth | None  # None when the leak watcher is off
    sessions: list[dict[str, Any]] = field(default_factory=list)  # live agent sessions, as `session list` shows
    staged: ConfigStaged | None = None  # a config change that waits for the operator


# Leak alerts: published by the alert store (broker/leaks/alerts.py), through the engine.


@dataclass(frozen=True, slots=True)
class AlertOpened:
    """A new leak, or one that came back after being resolved."""

    alert: Alert


@dataclass(frozen=True, slots=True)
class AlertUpdated:
    """An open leak moved (another line) or changed rule."""

    alert: Alert


@dataclass(frozen=True, slots=True)
class AlertResolved:
    """The file no longer holds the value (or is gone)."""

    alert: Alert


@dataclass(frozen=True, slots=True)
class AlertIgnored:
    """The operator ignored the fingerprint."""

    alert: Alert


AlertEvent = AlertOpened | AlertUpdated | AlertResolved | AlertIgnored


# The leak watcher's own state: published by the watcher (broker/leaks/watcher.py), through the engine.


@dataclass(frozen=True, slots=True)
class WatcherStatus:
    """A scan started, moved on (about four times a second) or ended, or what is watched
    changed (folders polled past the inotify limit, folders that cannot be read)."""

    health: WatcherHealth


Event = (
    ApprovalRequested
    | ApprovalResolved
    | AuditRecorded
    | Refused
    | BrokerStateChanged
    | ConfigReloaded
    | ConfigRejected
    | ConfigStaged
    | ConfigStageCleared
    | AlertEvent
    | WatcherStatus
)
