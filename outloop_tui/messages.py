"""Textual messages the dashboard shares, and the one place engine events become them.

The engine calls its subscribers synchronously on the app's own asyncio loop.
`EventBridge` is that subscriber: it turns every engine event into a Textual
message posted to the app, except audit records, which arrive far too fast for
one message each; those go into a bounded buffer that the audit pane drains
about ten times a second.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual.message import Message

from broker import events as ev
from broker.events import PendingApproval

if TYPE_CHECKING:
    from broker.leaks.alerts import Alert
    from broker.leaks.watcher import WatcherHealth

# Records kept between two drains; under a flood the oldest undrained ones are
# dropped from the screen (never from the audit log on disk).
AUDIT_BUFFER_CAP = 5_000


@dataclass
class ApprovalAsked(Message):
    """An `ask` call is waiting for the operator."""

    approval: PendingApproval


@dataclass
class ApprovalDone(Message):
    """A pending approval was answered, timed out or cancelled."""

    approval: PendingApproval
    decision: str
    approver: str


@dataclass
class CallRefused(Message):
    code: str
    tenant: str | None
    credential: str | None
    message: str


@dataclass
class BrokerState(Message):
    state: str
    detail: str = ""


@dataclass
class ConfigChanged(Message):
    """config.toml changed (the engine reloaded it, or the dashboard edited it)."""


@dataclass
class ConfigInvalid(Message):
    message: str


@dataclass
class ConfigWaiting(Message):
    """A change to config.toml that widens access waits for the operator (approve / reject)."""

    digest: str
    changes: list[str]


@dataclass
class ConfigDecided(Message):
    """The waiting config change was accepted, rejected or withdrawn."""

    outcome: str


@dataclass
class AlertsChanged(Message):
    """The leak alerts changed; `raised` is the new alert when one just opened."""

    raised: Alert | None = None


@dataclass
class WatcherChanged(Message):
    """The leak watcher's scan moved on, or what it watches changed (folders polled, unreadable)."""

    health: WatcherHealth


class EventBridge:
    """The engine subscriber: events in, Textual messages (and buffered audit records) out."""

    def __init__(self, post: Callable[[Message], object], buffer_cap: int = AUDIT_BUFFER_CAP) -> None:
        self._post = post
        self.audit: deque[dict[str, Any]] = deque(maxlen=buffer_cap)
        self.audit_seen = 0  # every record ever received, including those dropped from the buffer

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.AuditRecorded):
            self.audit.append(event.record)
            self.audit_seen += 1
            return
        message = translate(event)
        if message is not None:
            self._post(message)

    def drain_audit(self) -> list[dict[str, Any]]:
        records = list(self.audit)
        self.audit.clear()
        return records


def translate(event: ev.Event) -> Message | None:
    """The Textual message for an engine event (None for events the dashboard ignores)."""
    match event:
        case ev.ApprovalRequested(approval=approval):
            return ApprovalAsked(approval)
        case ev.ApprovalResolved(approval=approval, decision=decision, approver=approver):
            return ApprovalDone(approval, decision, approver)
        case ev.Refused(code=code, tenant=tenant, credential=credential, message=message):
            return CallRefused(code, tenant, credential, message)
        case ev.BrokerStateChanged(state=state, detail=detail):
            return BrokerState(state, detail)
        case ev.ConfigReloaded():
            return ConfigChanged()
        case ev.ConfigRejected(message=message):
            return ConfigInvalid(message)
        case ev.ConfigStaged(digest=digest, changes=changes):
            return ConfigWaiting(digest, list(changes))
        case ev.ConfigStageCleared(outcome=outcome):
            return ConfigDecided(outcome)
        case ev.AlertOpened(alert=alert):  # new, or back: rings the bell
            return AlertsChanged(alert)
        case ev.AlertUpdated() | ev.AlertResolved() | ev.AlertIgnored():
            return AlertsChanged()
        case ev.WatcherStatus(health=health):
            return WatcherChanged(health)
    return None
