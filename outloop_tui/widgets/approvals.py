"""The pending-approvals pane (calls waiting for the operator), the approval details screen,
and the list of live "always" grants, each of which can be revoked alone.

The table is updated by diff (rows added and removed by approval id, the two
clock columns rewritten) inside one `batch_update`, so a tick never rebuilds it.
Its columns come in the order an operator reads them, so a narrow terminal
still shows the countdown, method and path; Enter opens everything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label, OptionList, Static
from textual.widgets.option_list import Option

from broker.events import PendingApproval

if TYPE_CHECKING:
    from broker.calls.approvals import GrantKey

# Fixed widths: the table never re-measures (and never jumps) as asks come and go, and
# what the operator reads before pressing `y` is where it was a moment ago. What does
# not fit is cut at the pane's edge (no horizontal scrollbar) and shown by Enter.
COLUMNS = (
    ("left", "Left", 6),
    ("method", "Method", 7),
    ("path", "Path", 32),
    ("tenant", "Tenant", 10),
    ("credential", "Credential", 12),
    ("reason", "Reason", 40),
    ("rule", "Rule", 26),
    ("process", "Process", 18),
    ("workspace", "Workspace", 14),
    ("age", "Age", 5),
)


def duration(seconds: float) -> str:
    """12s, 4m05s, 1h02m."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def short_workspace(path: str) -> str:
    """The last two folders of a workspace: enough to tell clients' repos apart."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 2 else path


INTERPRETERS = ("python", "node", "bun", "deno", "ruby", "perl", "bash", "sh")


def program_name(approval: PendingApproval) -> str:
    """The program a person would name: `outloop` or `claude`, not `python3.11` or `node`."""
    words = approval.cmdline.split()
    if words:
        first = Path(words[0]).name
        if first.startswith(INTERPRETERS):
            for i, word in enumerate(words[1:], 1):
                if word == "-c":  # inline code: the interpreter is all there is to name
                    break
                if word == "-m" and i + 1 < len(words):
                    return words[i + 1]
                if not word.startswith("-"):
                    return Path(word).name
        return first
    return Path(approval.exe).name if approval.exe else "?"


def process_label(approval: PendingApproval) -> str:
    return f"{program_name(approval)}[{approval.pid}]"


class ApprovalsPane(Vertical):
    """The table of waiting calls and, below it, the live "always" grants."""

    def __init__(self, clock: Callable[[], float], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._clock = clock
        self._shown: dict[str, PendingApproval] = {}

    def compose(self) -> ComposeResult:
        yield DataTable(id="approvals-table", cursor_type="row", show_cursor=True)
        yield Static("", id="grants")

    def on_mount(self) -> None:
        self.border_title = "Pending approvals"
        table = self.table
        for key, label, width in COLUMNS:
            table.add_column(label, key=key, width=width)
        self._update_title()

    @property
    def table(self) -> DataTable[str | Text]:
        return self.query_one("#approvals-table", DataTable)

    def highlighted(self) -> str | None:
        """The id of the approval under the cursor, if any."""
        table = self.table
        if not table.row_count:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return row_key.value

    def sync(self, pending: Sequence[PendingApproval], grants: Sequence[tuple[str, float]] = ()) -> None:
        """Make the table show `pending` (oldest first); `grants` are (label, seconds left)."""
        now = self._clock()
        table = self.table
        wanted = {a.id: a for a in pending}
        with self.app.batch_update():
            for approval_id in [k for k in self._shown if k not in wanted]:
                table.remove_row(approval_id)
                del self._shown[approval_id]
            for approval in pending:
                if approval.id not in self._shown:
                    table.add_row(*self._cells(approval, now), key=approval.id)
                    self._shown[approval.id] = approval
                else:
                    table.update_cell(approval.id, "age", duration(now - approval.created))
                    table.update_cell(approval.id, "left", self._left(approval, now))
            self._update_title()
            self.query_one("#grants", Static).update(self._grants_text(grants))

    def _cells(self, a: PendingApproval, now: float) -> tuple[str | Text, ...]:
        return (
            self._left(a, now),
            Text(a.method, style="bold"),
            a.path,
            a.tenant,
            a.credential,
            a.reason,
            a.rule or "(no rules: ask)",
            process_label(a),
            short_workspace(a.workspace),
            duration(now - a.created),
        )

    @staticmethod
    def _left(a: PendingApproval, now: float) -> Text:
        left = a.deadline - now
        style = "bold red" if left < 15 else "yellow" if left < 45 else ""
        return Text(duration(left), style=style)

    def _update_title(self) -> None:
        count = len(self._shown)
        self.border_title = f"Pending approvals ({count})" if count else "Pending approvals"
        self.set_class(count > 0, "-waiting")
        self.border_subtitle = "y approve · n deny · a always · enter details" if count else "nothing waiting"

    @staticmethod
    def _grants_text(grants: Sequence[tuple[str, float]]) -> Text:
        text = Text()
        for label, left in grants:
            if text:
                text.append("\n")
            text.append("always ", style="bold green")
            text.append(label)
            text.append(f"  expires in {duration(left)}", style="dim")
        return text


class ApprovalScreen(ModalScreen[str | None]):
    """Everything about one waiting call, and the keys to answer it.

    Dismissed with "approved", "always" or "denied", or None to close. `a` on a call
    that can change something (anything but GET, HEAD, OPTIONS) asks for a second
    press: "always" lets every later call of that rule through unasked.
    """

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close", id="approval-close"),
        Binding("y", "answer('approved')", "Approve", id="approval-approve"),
        Binding("n", "answer('denied')", "Deny", id="approval-deny"),
        Binding("a", "answer('always')", "Always", id="approval-always"),
    ]

    def __init__(self, approval: PendingApproval) -> None:
        super().__init__()
        self.approval = approval
        self._always_armed = False

    def compose(self) -> ComposeResult:
        a = self.approval
        with Vertical(id="dialog", classes="approval-dialog"):
            yield Label(Text.assemble((a.method, "bold"), " ", a.path), id="dialog-title")
            with VerticalScroll(id="approval-details"):
                yield Static(approval_details(a), id="approval-fields")
            yield Static("", id="approval-confirm")
            with Horizontal(classes="buttons"):
                yield Button("Approve (y)", id="approve", variant="success")
                yield Button("Deny (n)", id="deny", variant="error")
                yield Button("Always (a)", id="always")
                yield Button("Close (esc)", id="close")

    def action_answer(self, decision: str) -> None:
        if decision == "always" and self.approval.method not in SAFE_METHODS and not self._always_armed:
            self._always_armed = True
            self.query_one("#approval-confirm", Static).update(
                Text(
                    f"Always lets every {self.approval.method} matching "
                    f"{self.approval.rule or 'this path'} through unasked until it expires: press a again.",
                    style="bold",
                )
            )
            return
        self.dismiss(decision)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        actions = {"approve": "approved", "deny": "denied", "always": "always"}
        if event.button.id in actions:
            self.action_answer(actions[event.button.id])
        else:
            self.dismiss(None)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def approval_details(a: PendingApproval) -> Text:
    """The details screen's text: who asks, for what, under which rule, and what it sends."""
    text = Text()

    def row(label: str, value: str, style: str = "") -> None:
        text.append(f"{label:<12}", style="dim")
        text.append(value + "\n", style=style)

    row("tenant", a.tenant, "bold")
    row("credential", f"{a.credential}  ({a.host})")
    row("rule", a.rule or "(the credential has no rules: everything asks)")
    row("reason", a.reason or "(none given)", "italic" if a.reason else "dim")
    row("program", f"{program_name(a)} [pid {a.pid}]")
    if a.cmdline:
        row("command", a.cmdline)
    row("workspace", a.workspace)
    row("session", a.session or "(none: identified by its folder)")
    if a.query:
        row("query", "&".join(f"{k}={v}" for k, v in a.query))
    for name, value in a.headers:
        row("header", f"{name}: {value}")
    if a.body_preview:
        text.append("body\n", style="dim")
        text.append(a.body_preview)
    return text


class GrantsScreen(ModalScreen["GrantKey | None"]):
    """The live "always" grants; Enter revokes the highlighted one, Esc closes."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close", id="grants-close")]

    def __init__(self, grants: Sequence[tuple[GrantKey, float]]) -> None:
        super().__init__()
        self.grants = list(grants)

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Always grants: Enter revokes one", id="dialog-title")
            yield OptionList(
                *(
                    Option(f"{t} · {c} · {rule}   (expires in {duration(left)})", id=str(i))
                    for i, ((t, c, _m, rule), left) in enumerate(self.grants)
                ),
                id="grant-list",
            )
            yield Static("Revoking takes effect at once: the next such call asks again.", classes="form-hint")

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.grants[int(event.option.id or 0)][0])
