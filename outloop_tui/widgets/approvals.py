"""The pending-approvals pane: calls waiting for the operator, with age and countdown.

The table is updated by diff (rows added and removed by approval id, the two
clock columns rewritten) inside one `batch_update`, so a tick never rebuilds it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from broker.events import PendingApproval

# Fixed widths: the table never re-measures (and never jumps) as asks come and go, and
# what the operator reads before pressing `y` is where it was a moment ago. Wider
# content scrolls horizontally.
COLUMNS = (
    ("age", "Age", 5),
    ("left", "Left", 6),
    ("tenant", "Tenant", 10),
    ("workspace", "Workspace", 14),
    ("process", "Process", 18),
    ("credential", "Credential", 12),
    ("method", "Method", 7),
    ("path", "Path", 32),
    ("rule", "Rule", 26),
    ("reason", "Reason", 40),
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


def process_label(approval: PendingApproval) -> str:
    exe = Path(approval.exe).name if approval.exe else "?"
    return f"{exe}[{approval.pid}]"


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
            duration(now - a.created),
            self._left(a, now),
            a.tenant,
            short_workspace(a.workspace),
            process_label(a),
            a.credential,
            Text(a.method, style="bold"),
            a.path,
            a.rule or "(no rules: ask)",
            a.reason,
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
        self.border_subtitle = "y approve · n deny · a always" if count else "nothing waiting"

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
