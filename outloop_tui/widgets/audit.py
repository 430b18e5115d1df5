"""The live audit pane: one line per audit record, coloured by outcome, filterable.

Records reach the pane in batches (the app drains the engine's buffer about ten
times a second) and are written with one `Log.write_lines` call per batch. The
pane keeps at most `LINE_CAP` lines, on screen and in the history used to
re-filter, so memory stays flat however long the dashboard runs.

The pane follows the stream while it is scrolled to the end (a filter keeps it
following); scrolled up, it stays put and counts what arrived below ("12 new").
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from rich.highlighter import Highlighter
from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, Log

LINE_CAP = 5_000

ALLOWED = frozenset({"allow", "approved", "always"})
OUTCOME_CLASSES = ("allowed", "refused", "error", "event")
CALL_EVENTS = frozenset({"attempt", "outcome"})
# What else the chain records (the operator's actions, sessions, the broker's own life):
# shown as what happened, by whom, in a colour of its own.
DETAIL_KEYS = ("credential", "method", "rule", "label", "session", "reason", "approver")

_GREEN = Style(color="#5fbf77")
_RED = Style(color="#e5534b", bold=True)
_YELLOW = Style(color="#d9a932")
_DIM = Style(dim=True)
_BLUE = Style(color="#6cb6ff")
# Labels of records that are not calls start with one of these (session_end, grant_revoked, ...).
EVENT_PREFIXES = frozenset({"session", "grant", "broker", "config", "audit", "alert"})


@dataclass(frozen=True, slots=True)
class AuditLine:
    text: str
    tenant: str
    outcome: str  # one of OUTCOME_CLASSES


def outcome_of(record: Mapping[str, Any]) -> tuple[str, str]:
    """(label shown in the line, outcome class) for an audit record."""
    decision = str(record.get("decision") or "")
    event = str(record.get("event") or "")
    if event and event not in CALL_EVENTS:
        return event, "event"
    if record.get("event") == "outcome":
        status = record.get("status")
        if isinstance(status, int):
            return f"<- {status}", "allowed" if 200 <= status < 400 else "error"
        return str(status or "error"), "error"
    if decision in ALLOWED:
        return {"allow": "allowed", "approved": "approved", "always": "always"}[decision], "allowed"
    return decision or "refused", "refused"


def _clock_time(ts: object) -> str:
    if not isinstance(ts, str):
        return "--:--:--"
    return _local_time(ts[:19])


@lru_cache(maxsize=4096)
def _local_time(ts: str) -> str:
    """HH:MM:SS local time of a UTC 'YYYY-MM-DDTHH:MM:SS' (cached: floods share seconds)."""
    try:
        return datetime.fromisoformat(ts + "+00:00").astimezone().strftime("%H:%M:%S")
    except ValueError:
        return ts[11:19] or "--:--:--"


def format_record(record: Mapping[str, Any]) -> AuditLine:
    """The pane's line for one record: time, outcome, tenant, credential, call, details."""
    label, outcome = outcome_of(record)
    tenant = str(record.get("tenant") or "-")
    if outcome == "event":
        details = [
            f"{k} {record[k]}" if k not in ("approver", "reason") else str(record[k])
            for k in DETAIL_KEYS
            if record.get(k)
        ]
        text = f"{_clock_time(record.get('ts'))}  {label:<18} {tenant:<12} " + " · ".join(details)
        return AuditLine(text.rstrip(), tenant, outcome)
    extra: list[str] = []
    if record.get("event") == "outcome":
        if record.get("ms") is not None:
            extra.append(f"{record['ms']:.0f} ms")
        if record.get("bytes") is not None:
            extra.append(f"{record['bytes']} B")
    elif record.get("approver") not in (None, "policy"):
        extra.append(f"by {record['approver']}")
    if record.get("reason"):
        extra.append(f'"{record["reason"]}"')
    text = (
        f"{_clock_time(record.get('ts'))}  {label:<18} {tenant:<12} "
        f"{record.get('credential') or '-':<12} {record.get('method') or '':<6} "
        f"{record.get('path') or ''}"
    )
    if extra:
        text += "  " + " · ".join(extra)
    return AuditLine(text, tenant, outcome)


@dataclass(frozen=True)
class AuditFilter:
    """`tenant:ID outcome:allowed|refused|error` and free words, all of which must match."""

    tenant: str | None = None
    outcome: str | None = None
    words: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AuditFilter:
        tenant = outcome = None
        words: list[str] = []
        for token in text.split():
            key, sep, value = token.partition(":")
            if sep and key == "tenant" and value:
                tenant = value
            elif sep and key == "outcome" and value:
                outcome = value
            else:
                words.append(token.lower())
        return cls(tenant, outcome, tuple(words))

    @property
    def active(self) -> bool:
        return bool(self.tenant or self.outcome or self.words)

    def matches(self, line: AuditLine) -> bool:
        if self.tenant and line.tenant != self.tenant:
            return False
        if self.outcome and not line.outcome.startswith(self.outcome):
            return False
        lowered = line.text.lower()
        return all(w in lowered for w in self.words)


class OutcomeHighlighter(Highlighter):
    """Colours the outcome column of each visible line (run only for lines on screen)."""

    _label = re.compile(r"^(\S+)  (\S+(?: \d{3})?)")

    def highlight(self, text: Text) -> None:
        m = self._label.match(text.plain)
        if not m:
            return
        text.stylize(_DIM, 0, m.end(1))
        label = m.group(2)
        if label in ("allowed", "approved", "always") or label.startswith("<- 2"):
            style = _GREEN
        elif "_" in label and label.split("_")[0] in EVENT_PREFIXES or label in ("locked", "unlocked"):
            style = _BLUE
        elif label.startswith("<- ") or label == "upstream_error":
            style = _YELLOW
        else:
            style = _RED
        text.stylize(style, m.start(2), m.end(2))


class AuditPane(Vertical):
    """The audit stream with its filter box (hidden until `/`)."""

    BINDINGS = [
        Binding("escape", "clear_filter", "Clear filter", id="audit-clear-filter", show=False),
    ]

    def __init__(self, *, line_cap: int = LINE_CAP, id: str | None = None) -> None:
        super().__init__(id=id)
        self.line_cap = line_cap
        self.history: deque[AuditLine] = deque(maxlen=line_cap)
        self.filter = AuditFilter()
        self.unseen = 0  # lines that arrived below while the operator was scrolled up
        self.filter_text = ""

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter: tenant:acme outcome:refused|allowed|error words…", id="audit-filter")
        log = Log(max_lines=self.line_cap, id="audit-log", highlight=True)
        log.highlighter = OutcomeHighlighter()
        yield log

    def on_mount(self) -> None:
        self.border_title = "Audit"
        self.query_one("#audit-filter").display = False

    @property
    def log_widget(self) -> Log:
        return self.query_one("#audit-log", Log)

    def add_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append a batch of records: one write to the Log, whatever the batch size."""
        lines = [format_record(r) for r in records]
        if not lines:
            return
        self.history.extend(lines)
        shown = [line.text for line in lines if self.filter.matches(line)]
        if shown:
            log = self.log_widget
            if not log.is_vertical_scroll_end:
                self.unseen += len(shown)
            log.write_lines(shown[-self.line_cap :])
        self.mark_unseen()

    def mark_unseen(self) -> None:
        """Keep the "N new" marker true: gone once the operator is back at the end."""
        if self.unseen and self.log_widget.is_vertical_scroll_end:
            self.unseen = 0
        self._update_subtitle()

    def _update_subtitle(self) -> None:
        parts = []
        if self.filter.active:
            parts.append(f"filter: {self.filter_text.strip()}")
        if self.unseen:
            parts.append(f"{self.unseen} new below (end)")
        subtitle = " · ".join(parts)
        if subtitle != self.border_subtitle:
            self.border_subtitle = subtitle

    def open_filter(self, prefill: str | None = None) -> None:
        box = self.query_one("#audit-filter", Input)
        box.display = True
        if prefill is not None:
            box.value = prefill
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#audit-filter", Input)
        box.value = ""
        box.display = False
        self.log_widget.focus()

    @on(Input.Changed, "#audit-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.apply_filter(event.value)

    @on(Input.Submitted, "#audit-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            event.input.display = False
        self.log_widget.focus()

    def apply_filter(self, text: str) -> None:
        self.filter = AuditFilter.parse(text)
        self.filter_text = text
        log = self.log_widget
        log.clear()
        # clear() leaves the scroll offset where it was; without going back to the end the
        # pane would stop following the stream after a filter.
        log.write_lines([line.text for line in self.history if self.filter.matches(line)], scroll_end=False)
        log.scroll_end(animate=False, immediate=True, x_axis=False)
        self.unseen = 0
        self._update_subtitle()
