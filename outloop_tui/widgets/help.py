"""The help screen: every key of the dashboard, and the audit filter syntax."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

FILTER_HELP = (
    "Audit filter (/):  tenant:ID  outcome:allowed|refused|error  and any words; all must match.\n"
    "Pressing / on a tenant in the tree starts the filter with that tenant."
)
APPROVAL_HELP = (
    "y / n / a act on the highlighted approval when the approvals pane has focus, "
    "otherwise on the oldest one. 'a' lets the same tenant, credential, method and rule "
    "through without asking until the grant expires (shown under the table); l revokes all."
)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close", id="help-close")]

    def __init__(self, bindings: Iterable[Binding]) -> None:
        super().__init__()
        self.bindings_list = [b for b in bindings if b.description]

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for b in self.bindings_list:
            keys = ", ".join(self.app.get_key_display(Binding(k.strip(), "")) for k in b.key.split(","))
            table.add_row(keys, b.tooltip or b.description)
        table.add_row("ctrl+p", "command palette: every action by name")
        table.add_row("enter", "on an alert: details, acknowledge, ignore")
        with Vertical(id="dialog", classes="help"):
            yield Label("Outloop keys", id="dialog-title")
            with VerticalScroll():
                yield Static(table)
                yield Static(Text("\n" + APPROVAL_HELP + "\n\n" + FILTER_HELP, style="dim"))
