"""A config.toml change that waits for the operator: what it does, accept (y), reject (n), or later (escape)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


class ConfigReviewScreen(ModalScreen[bool | None]):
    """Dismisses with True (accept), False (reject) or None (decide later)."""

    BINDINGS = [
        Binding("y", "answer(True)", "Accept", id="config-accept"),
        Binding("n", "answer(False)", "Reject", id="config-reject"),
        Binding("escape", "answer(None)", "Later", id="config-later"),
    ]

    def __init__(self, widening: list[str], applied: list[str]) -> None:
        super().__init__()
        self.widening = widening
        self.applied = applied

    def compose(self) -> ComposeResult:
        text = "config.toml was changed outside Outloop. These changes widen access and wait for you:\n"
        text += "\n".join(f"  {line}" for line in self.widening)
        if self.applied:
            text += "\n\nAlready in force (they narrow access):\n" + "\n".join(f"  {line}" for line in self.applied)
        text += "\n\nReject puts config.toml back to the config in force."
        with Vertical(id="dialog", classes="confirm"):
            yield Label("Config change", id="dialog-title")
            with VerticalScroll():
                yield Static(text, markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Accept (y)", id="accept", variant="warning")
                yield Button("Reject (n)", id="reject")
                yield Button("Later (esc)", id="later")

    def on_mount(self) -> None:
        self.query_one("#later", Button).focus()

    def action_answer(self, answer: bool | None) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss({"accept": True, "reject": False}.get(event.button.id or ""))
