"""The first-run screen, shown while no tenant exists yet."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

WELCOME = Text.assemble(
    ("Welcome to Outloop\n\n", "bold"),
    "Agents ask Outloop to make API calls; the keys stay in your OS keyring.\nA ",
    ("tenant", "bold"),
    " is one client. Its ",
    ("workspaces", "bold"),
    " are the folders where agents work for it;\nits ",
    ("credentials", "bold"),
    " are the API keys they may use, each with allow / ask / deny rules.\n\n",
    "No tenant exists yet.\n\n",
    ("  t  ", "reverse"),
    "  add your first tenant, then map a folder and add a credential\n",
    ("  q  ", "reverse"),
    "  quit\n\n",
    ("To look around first, quit and run ", "dim"),
    ("outloop demo", "bold"),
    (": sample tenants, a local API and a scripted agent.", "dim"),
)


class FirstRunScreen(Screen[str | None]):
    """Dismissed with the id of the tenant the operator added, or None to quit."""

    BINDINGS = [
        Binding("t", "add_tenant", "Add tenant", id="first-add-tenant"),
        Binding("q", "dismiss(None)", "Quit", id="first-quit"),
    ]

    def compose(self) -> ComposeResult:
        with Center(), Vertical(id="welcome"):
            yield Static(WELCOME)
        yield Footer()

    def action_add_tenant(self) -> None:
        from outloop_tui.widgets.forms import Added, AddTenantScreen

        def added(result: Added | None) -> None:
            if result is not None:
                self.dismiss(result.tenant)

        self.app.push_screen(AddTenantScreen(self.app.engine.paths), added)  # type: ignore[attr-defined]
