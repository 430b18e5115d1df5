"""The leak alert store: `state/alerts.jsonl`, one alert per (file, fingerprint).

The file is append-only JSON lines; each line is the full, latest state of one
alert, so the current set is "last line per id wins". An alert's id is derived
from its file and fingerprint, so two processes that find the same leak agree
on its id. A torn last line (a crash mid-write) is skipped on load and the next
append starts on a fresh line. When the file holds many more lines than
alerts, loading rewrites it compactly (atomically).

Subscribers get `AlertOpened`, `AlertUpdated`, `AlertResolved` and
`AlertIgnored` events (broker/events.py), called in the thread that changed
the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from broker.events import AlertEvent, AlertIgnored, AlertOpened, AlertResolved, AlertUpdated
from broker.leaks.rules import SEVERITY_RANK, Severity
from broker.leaks.scan import Finding
from broker.paths import atomic_write, ensure_private_dir

log = logging.getLogger(__name__)

AlertStatus = Literal["open", "resolved", "ignored"]
STATUSES: tuple[AlertStatus, ...] = ("open", "resolved", "ignored")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_id(path: Path | str, fingerprint: str) -> str:
    """The stable id of the alert for `fingerprint` in the file at `path`."""
    return hashlib.sha256(f"{path}\0{fingerprint}".encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Alert:
    """A leak alert as DESIGN §7 lists it. Holds a masked preview, never the value."""

    id: str
    ts: str
    tenant: str | None
    workspace: str | None
    path: str
    line: int
    rule: str
    severity: Severity
    preview: str
    fingerprint: str
    status: AlertStatus
    first_seen: str = ""
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The alert as a JSON object (the format of alerts.jsonl and --json)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Alert:
        """Parse one stored alert; raises KeyError/TypeError/ValueError if malformed."""
        status = data["status"]
        severity = data["severity"]
        if status not in STATUSES or severity not in SEVERITY_RANK:
            raise ValueError("unknown status or severity")
        return cls(
            id=str(data["id"]),
            ts=str(data["ts"]),
            tenant=data.get("tenant"),
            workspace=data.get("workspace"),
            path=str(data["path"]),
            line=int(data["line"]),
            rule=str(data["rule"]),
            severity=severity,
            preview=str(data["preview"]),
            fingerprint=str(data["fingerprint"]),
            status=status,
            first_seen=str(data.get("first_seen") or data["ts"]),
            reason=data.get("reason"),
        )

    @classmethod
    def from_finding(cls, finding: Finding, status: AlertStatus = "open") -> Alert:
        """A fresh alert for a scanner finding."""
        ts = _now()
        return cls(
            id=alert_id(finding.path, finding.fingerprint),
            ts=ts,
            tenant=finding.tenant,
            workspace=str(finding.workspace) if finding.workspace is not None else None,
            path=str(finding.path),
            line=finding.line,
            rule=finding.rule,
            severity=finding.severity,
            preview=finding.preview,
            fingerprint=finding.fingerprint,
            status=status,
            first_seen=ts,
        )


Subscriber = Callable[[AlertEvent], None]


class AlertStore:
    """Current alerts, persisted to `path` (0600, in a 0700 folder). Thread-safe."""

    COMPACT_FACTOR = 4

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._alerts: dict[str, Alert] = {}
        self._subscribers: list[Subscriber] = []
        self._torn_tail = False
        self.skipped_lines = 0
        self.load()

    # --- persistence -------------------------------------------------------------------

    def load(self) -> None:
        """(Re)read the file. Malformed lines, including a torn last one, are skipped."""
        with self._lock:
            self._alerts.clear()
            self.skipped_lines = 0
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                self._torn_tail = False
                return
            self._torn_tail = bool(data) and not data.endswith(b"\n")
            lines = data.split(b"\n")
            for raw in lines:
                if not raw.strip():
                    continue
                try:
                    alert = Alert.from_json(json.loads(raw))
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1
                    continue
                self._alerts[alert.id] = alert
            if self.skipped_lines:
                log.warning("alerts: skipped %d unreadable line(s) in %s", self.skipped_lines, self.path)
            if len(lines) > self.COMPACT_FACTOR * len(self._alerts) + 1000:
                self._compact()

    def _compact(self) -> None:
        body = "".join(json.dumps(a.to_json()) + "\n" for a in self._alerts.values())
        atomic_write(self.path, body.encode())
        self._torn_tail = False

    def _append(self, alerts: Iterable[Alert]) -> None:
        body = "".join(json.dumps(a.to_json()) + "\n" for a in alerts)
        if not body:
            return
        if self._torn_tail:
            body = "\n" + body  # leave the torn line on its own, unparseable, line
        ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, body.encode())
        finally:
            os.close(fd)
        self._torn_tail = False

    # --- subscription --------------------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(event)` on every change; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def _publish(self, events: Sequence[AlertEvent]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for event in events:
            for callback in subscribers:
                try:
                    callback(event)
                except Exception:  # a broken subscriber must not stop the watcher
                    log.exception("alert subscriber failed")

    def _commit(self, changed: list[Alert], events: list[AlertEvent]) -> list[AlertEvent]:
        for alert in changed:
            self._alerts[alert.id] = alert
        self._append(changed)
        return events

    # --- queries -----------------------------------------------------------------------

    def alerts(self, statuses: Iterable[AlertStatus] = ("open", "ignored")) -> list[Alert]:
        """Alerts with one of `statuses`, most severe first, then by path and line."""
        wanted = set(statuses)
        with self._lock:
            found = [a for a in self._alerts.values() if a.status in wanted]
        return sorted(found, key=lambda a: (SEVERITY_RANK[a.severity], a.path, a.line))

    def open_alerts(self) -> list[Alert]:
        """The alerts that need attention."""
        return self.alerts(("open",))

    def get(self, alert_id: str) -> Alert | None:
        """One alert by id, whatever its status."""
        with self._lock:
            return self._alerts.get(alert_id)

    def ignored_fingerprints(self) -> set[str]:
        """Fingerprints the operator ignored."""
        with self._lock:
            return {a.fingerprint for a in self._alerts.values() if a.status == "ignored"}

    # --- changes -----------------------------------------------------------------------

    def reconcile_file(self, path: Path, findings: Sequence[Finding]) -> list[AlertEvent]:
        """Make the alerts for `path` match what a fresh scan of it found.

        New values open alerts (or are recorded as ignored, if their fingerprint
        was ignored), values that moved update theirs, values that are gone
        resolve theirs. Returns (and publishes) the events.
        """
        key = str(path)
        with self._lock:
            ignored = self.ignored_fingerprints()
            seen: dict[str, Finding] = {}
            for f in findings:
                seen.setdefault(f.fingerprint, f)  # one alert per (file, fingerprint)
            changed: list[Alert] = []
            events: list[AlertEvent] = []
            for fp, finding in seen.items():
                old = self._alerts.get(alert_id(key, fp))
                if old is None or old.status == "resolved":
                    status: AlertStatus = "ignored" if fp in ignored else "open"
                    alert = Alert.from_finding(finding, status)
                    if old is not None:
                        alert = replace(alert, first_seen=old.first_seen)
                    if status == "ignored":
                        ref = next(a for a in self._alerts.values() if a.fingerprint == fp and a.status == "ignored")
                        alert = replace(alert, reason=ref.reason)
                        changed.append(alert)
                    else:
                        changed.append(alert)
                        events.append(AlertOpened(alert))
                elif (old.line, old.rule, old.severity) != (finding.line, finding.rule, finding.severity):
                    alert = replace(
                        old,
                        ts=_now(),
                        line=finding.line,
                        rule=finding.rule,
                        severity=finding.severity,
                        preview=finding.preview,
                    )
                    changed.append(alert)
                    if old.status == "open":
                        events.append(AlertUpdated(alert))
            for alert in list(self._alerts.values()):
                if alert.path == key and alert.status == "open" and alert.fingerprint not in seen:
                    gone = replace(alert, ts=_now(), status="resolved")
                    changed.append(gone)
                    events.append(AlertResolved(gone))
            self._commit(changed, events)
        self._publish(events)
        return events

    def resolve_path(self, path: Path) -> list[AlertEvent]:
        """Resolve the open alerts of a file that is gone, or of every file under a
        folder that is gone."""
        key = str(path)
        prefix = key.rstrip(os.sep) + os.sep
        with self._lock:
            changed = [
                replace(a, ts=_now(), status="resolved")
                for a in self._alerts.values()
                if a.status == "open" and (a.path == key or a.path.startswith(prefix))
            ]
            events: list[AlertEvent] = [AlertResolved(a) for a in changed]
            self._commit(changed, events)
        self._publish(events)
        return events

    def resolve_absent(self, root: Path, present: Iterable[Path]) -> list[AlertEvent]:
        """After a full scan of `root`: resolve open alerts under it for files that
        no longer exist. (Files that were scanned were reconciled one by one.)"""
        prefix = str(root).rstrip(os.sep) + os.sep
        keep = {str(p) for p in present}
        with self._lock:
            stale = [
                a
                for a in self._alerts.values()
                if a.status == "open"
                and a.path.startswith(prefix)
                and a.path not in keep
                and not os.path.lexists(a.path)
            ]
            changed = [replace(a, ts=_now(), status="resolved") for a in stale]
            events: list[AlertEvent] = [AlertResolved(a) for a in changed]
            self._commit(changed, events)
        self._publish(events)
        return events

    def ignore(self, fingerprint: str, reason: str) -> list[AlertEvent]:
        """Ignore a value everywhere, now and when it is found again, with a reason."""
        with self._lock:
            changed = [
                replace(a, ts=_now(), status="ignored", reason=reason)
                for a in self._alerts.values()
                if a.fingerprint == fingerprint and a.status != "ignored"
            ]
            events: list[AlertEvent] = [AlertIgnored(a) for a in changed]
            self._commit(changed, events)
        self._publish(events)
        return events
