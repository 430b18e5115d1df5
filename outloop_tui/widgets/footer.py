"""The key bar: Textual's Footer, redrawn only when the keys it shows change.

Textual's Footer rebuilds all its key widgets on every focus change; moving
between panes here never changes the keys shown, and the rebuild (a style pass
over a dozen new widgets) was most of the time a Tab took to reach the screen.

Keys for the less urgent actions carry the class `-secondary`, so a narrow
screen can leave them to `?` and the palette and keep y / n / a, help and quit.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

SECONDARY_ACTIONS = frozenset(
    {
        "filter",
        "add_tenant",
        "add_workspace",
        "add_credential",
        "edit",
        "remove",
        "grants",
        "sessions",
        "rescan",
        "toggle_lock",
    }
)


class KeyFooter(Footer):
    def __init__(self) -> None:
        super().__init__()
        self._shown: tuple[tuple[str, str, bool], ...] | None = None

    def bindings_changed(self, screen: Screen[object]) -> None:
        shown = tuple(
            (key, active.binding.description, active.enabled)
            for key, active in screen.active_bindings.items()
            if active.binding.show
        )
        if shown == self._shown:
            return
        self._shown = shown
        super().bindings_changed(screen)

    def compose(self) -> ComposeResult:
        for widget in super().compose():
            if isinstance(widget, FooterKey) and widget.action in SECONDARY_ACTIONS:
                widget.add_class("-secondary")
            yield widget
