"""The leak-alerts pane, and the alert detail screen (context masked, acknowledge, ignore).

Alerts carry only a masked preview and a fingerprint, never the value; the
detail screen reads the lines around the finding from the file itself and masks
every long token in them before anything reaches the screen.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Static

from outloop_tui.widgets.approvals import duration

if TYPE_CHECKING:
    from broker.leaks.alerts import Alert

SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}
SEVERITY_STYLE = {"critical": "bold white on #b03030", "high": "bold #e5534b", "medium": "#d9a932", "low": "dim"}
# Fixed widths, as in the approvals table: rows never shift as alerts come and go.
COLUMNS = (
    ("severity", "Severity", 15),
    ("tenant", "Tenant", 10),
    ("where", "File:line", 36),
    ("rule", "Rule", 30),
    ("preview", "Preview", 12),
    ("age", "Age", 6),
)
CONTEXT_LINES = 3
_TOKEN = re.compile(r"[A-Za-z0-9_\-+/=.~]{12,}")


@dataclass(frozen=True)
class AlertView:
    """What the pane shows of one alert (nothing here can hold a secret)."""

    id: str
    severity: str
    tenant: str
    workspace: str
    path: str
    line: int
    rule: str
    preview: str
    fingerprint: str
    ts: float

    @classmethod
    def of(cls, alert: Alert) -> AlertView:
        try:
            ts = datetime.fromisoformat(alert.ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            ts = 0.0
        return cls(
            alert.id,
            alert.severity,
            alert.tenant or "-",
            alert.workspace or "",
            alert.path,
            alert.line,
            alert.rule,
            alert.preview,
            alert.fingerprint,
            ts,
        )

    @property
    def where(self) -> str:
        path = Path(self.path)
        try:
            shown = str(path.relative_to(self.workspace)) if self.workspace else str(path)
        except ValueError:
            shown = str(path)
        return f"{shown}:{self.line}"


def mask_token(token: str) -> str:
    """First 4 and last 2 characters at most, as alert previews do."""
    if len(token) <= 8:
        return "*" * len(token)
    return f"{token[:4]}{'*' * min(8, len(token) - 6)}{token[-2:]}"


def masked_context(view: AlertView, radius: int = CONTEXT_LINES) -> list[tuple[int, str]]:
    """The lines around the finding, every long token and the found value masked."""
    try:
        with open(view.path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    start = max(1, view.line - radius)
    end = min(len(lines), view.line + radius)
    out = []
    for number in range(start, end + 1):
        text = lines[number - 1][:200]
        out.append((number, _mask_line(text, view.fingerprint, number == view.line)))
    return out


def _mask_line(text: str, fingerprint: str, is_finding: bool) -> str:
    def repl(m: re.Match[str]) -> str:
        return mask_token(m.group(0))

    masked = _TOKEN.sub(repl, text)
    if is_finding and fingerprint:
        # Short secrets escape the token rule: mask any value whose hash is the fingerprint.
        for m in re.finditer(r"[^\s'\"=:,;]+", text):
            if hashlib.sha256(m.group(0).encode()).hexdigest() == fingerprint:
                masked = masked.replace(m.group(0), mask_token(m.group(0)))
    return masked


class AlertsPane(DataTable[str | Text]):
    """Open leak alerts, most severe first."""

    def __init__(self, wall: Callable[[], float], *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row")
        self._wall = wall
        self.views: dict[str, AlertView] = {}
        self._acked: Set[str] = frozenset()
        self.note = ""

    def on_mount(self) -> None:
        self.border_title = "Leak alerts"
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    def sync(self, alerts: Sequence[Alert], note: str = "", acked: Set[str] = frozenset()) -> None:
        now = self._wall()
        acked_changed = set(acked) != set(self._acked)
        self._acked = frozenset(acked)
        views = sorted(
            (AlertView.of(a) for a in alerts), key=lambda v: (SEVERITY_ORDER.get(v.severity, 9), -v.ts, v.id)
        )
        wanted = {v.id: v for v in views}
        with self.app.batch_update():
            if list(wanted) != list(self.views) or acked_changed:
                row = self.cursor_row
                self.clear()
                for v in views:
                    self.add_row(*self._cells(v, now), key=v.id)
                if views:
                    self.move_cursor(row=min(row, len(views) - 1))
            else:
                for v in views:
                    self.update_cell(v.id, "age", duration(now - v.ts) if v.ts else "")
        self.views = wanted
        count = len(views)
        self.border_title = f"Leak alerts ({count})" if count else "Leak alerts"
        self.set_class(any(v.severity in ("critical", "high") for v in views), "-alarm")
        self.border_subtitle = note or ("enter: details · acknowledge · ignore" if count else "no open alerts")

    def _cells(self, v: AlertView, now: float) -> tuple[str | Text, ...]:
        age = duration(now - v.ts) if v.ts else ""
        if v.id in self._acked:  # acknowledged: still open, shown quietly
            return tuple(
                Text(c, style="dim") for c in (f"{v.severity} (seen)", v.tenant, v.where, v.rule, v.preview, age)
            )
        return (
            Text(v.severity.upper(), style=SEVERITY_STYLE.get(v.severity, "")),
            v.tenant,
            v.where,
            v.rule,
            v.preview,
            age,
        )

    def highlighted(self) -> AlertView | None:
        if not self.row_count:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return self.views.get(str(row_key.value))


@dataclass(frozen=True)
class AlertAction:
    kind: str  # "ack" | "ignore" | "import" (move the key into the keyring)
    reason: str = ""


class AlertScreen(ModalScreen[AlertAction | None]):
    """One alert: where, which rule, the masked context; acknowledge or ignore it."""

    AUTO_FOCUS = "#ack"  # so k and i act at once instead of typing into the reason box

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close", id="alert-close"),
        Binding("k", "ack", "Acknowledge", id="alert-ack"),
        Binding("i", "ignore", "Ignore by fingerprint", id="alert-ignore"),
        Binding("m", "move", "Move into the keyring", id="alert-move"),
    ]

    def __init__(self, view: AlertView) -> None:
        super().__init__()
        self.view = view
        from broker.importer import importable_alert

        # A .env finding of a provider the catalog knows can go to the keyring (outloop import's plan).
        self.importable = importable_alert(view.path, view.line, view.rule)

    def compose(self) -> ComposeResult:
        v = self.view
        with Vertical(id="dialog", classes="alert-dialog"):
            yield Label(
                Text.assemble((v.severity.upper(), SEVERITY_STYLE.get(v.severity, "")), f"  {v.rule}"),
                id="dialog-title",
            )
            yield Static(
                Text.assemble(
                    ("tenant     ", "dim"),
                    v.tenant,
                    "\n",
                    ("file       ", "dim"),
                    f"{v.path}:{v.line}",
                    "\n",
                    ("preview    ", "dim"),
                    v.preview,
                    "\n",
                    ("fingerprint ", "dim"),
                    v.fingerprint[:16] + "…",
                )
            )
            context = Text()
            for number, line in masked_context(v):
                style = "bold" if number == v.line else "dim"
                context.append(f"{number:>5} │ ", style="dim")
                context.append(line + "\n", style=style)
            yield Static(context or Text("(the file can no longer be read)", style="dim"), id="alert-context")
            yield Input(placeholder="reason for ignoring (required to ignore)", id="ignore-reason")
            with Horizontal(classes="buttons"):
                yield Button("Acknowledge (k)", id="ack", variant="primary")
                yield Button("Ignore (i)", id="ignore", variant="warning")
                if self.importable:
                    yield Button("Move into the keyring (m)", id="move", variant="success")
                yield Button("Close (esc)", id="close")

    def action_ack(self) -> None:
        self.dismiss(AlertAction("ack"))

    def action_ignore(self) -> None:
        reason = self.query_one("#ignore-reason", Input)
        if not reason.value.strip():
            reason.focus()
            self.notify("Give a reason to ignore this fingerprint.", severity="warning")
            return
        self.dismiss(AlertAction("ignore", reason.value.strip()))

    def action_move(self) -> None:
        if self.importable:
            self.dismiss(AlertAction("import"))

    @on(Input.Submitted, "#ignore-reason")
    def _reason_given(self) -> None:
        self.action_ignore()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ack":
            self.action_ack()
        elif event.button.id == "ignore":
            self.action_ignore()
        elif event.button.id == "move":
            self.action_move()
        else:
            self.dismiss(None)
