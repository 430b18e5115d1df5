"""The operator channel's wire: one JSON object per line, events and snapshots field by field.

The client sends requests `{"seq": N, "op": NAME, ...}` and gets
`{"seq": N, "ok": RESULT}` back; after `attach`, the broker also pushes
`{"event": {...}}` for every engine event, in the order they happened. Nothing
here can hold a secret: these are the events the embedded dashboard gets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from broker import events as ev
from broker.calls.approvals import Grant
from broker.leaks.alerts import Alert
from broker.leaks.watcher import WatcherHealth

MAX_LINE = 1 << 20  # a request is a few hundred bytes; a line this long is not a dashboard

# -- encoding -------------------------------------------------------------------------

_EVENTS: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        ev.ApprovalRequested,
        ev.ApprovalResolved,
        ev.AuditRecorded,
        ev.Refused,
        ev.BrokerStateChanged,
        ev.ConfigReloaded,
        ev.ConfigRejected,
        ev.ConfigStaged,
        ev.ConfigStageCleared,
        ev.AlertOpened,
        ev.AlertUpdated,
        ev.AlertResolved,
        ev.AlertIgnored,
        ev.WatcherStatus,
    )
}


def encode_approval(a: ev.PendingApproval) -> dict[str, Any]:
    return dataclasses.asdict(a)


def decode_approval(d: dict[str, Any]) -> ev.PendingApproval:
    fields = dict(d)
    fields["query"] = tuple(tuple(pair) for pair in fields.get("query", ()))
    fields["headers"] = tuple(tuple(pair) for pair in fields.get("headers", ()))
    return ev.PendingApproval(**fields)


def encode_event(event: ev.Event) -> dict[str, Any]:
    """An engine event as JSON: its type's name and its fields."""
    name = type(event).__name__
    if isinstance(event, ev.ApprovalRequested | ev.ApprovalResolved):
        body: dict[str, Any] = {"approval": encode_approval(event.approval)}
        if isinstance(event, ev.ApprovalResolved):
            body.update(decision=event.decision, approver=event.approver)
    elif isinstance(event, ev.AlertOpened | ev.AlertUpdated | ev.AlertResolved | ev.AlertIgnored):
        body = {"alert": event.alert.to_json()}
    else:
        body = dataclasses.asdict(event)
    return {"type": name, **body}


def decode_event(d: dict[str, Any]) -> ev.Event:
    """The inverse of encode_event; raises KeyError/TypeError/ValueError when malformed."""
    fields = dict(d)
    cls = _EVENTS[fields.pop("type")]
    if "approval" in fields:
        fields["approval"] = decode_approval(fields["approval"])
    if "alert" in fields:
        fields["alert"] = Alert.from_json(fields["alert"])
    if "health" in fields:
        fields["health"] = decode_watcher(fields["health"])
    event: ev.Event = cls(**fields)
    return event


def encode_snapshot(snap: Any, now: float) -> dict[str, Any]:
    """An engine Snapshot as JSON (config.toml the dashboard reads itself); `now` is the grants' clock."""
    return {
        "state": snap.state,
        "locked": snap.locked,
        "socket": snap.socket,
        "pending": [encode_approval(a) for a in snap.pending],
        # Grants expire on the broker's monotonic clock: sent as seconds left.
        "grants": [{"key": list(g.key), "left": g.expires - now} for g in snap.grants],
        "alerts": [a.to_json() for a in snap.alerts],
        "watcher": dataclasses.asdict(snap.watcher) if snap.watcher is not None else None,
        "staged": dataclasses.asdict(snap.staged) if getattr(snap, "staged", None) is not None else None,
        "sessions": snap.sessions,
    }


def decode_staged(d: dict[str, Any] | None) -> ev.ConfigStaged | None:
    return None if d is None else ev.ConfigStaged(**d)


def decode_grants(rows: list[dict[str, Any]], clock: Callable[[], float]) -> list[Grant]:
    now = clock()
    return [Grant(key=tuple(r["key"]), expires=now + float(r["left"])) for r in rows]


def decode_watcher(d: dict[str, Any] | None) -> WatcherHealth | None:
    if d is None:
        return None
    return WatcherHealth.from_dict(d)
