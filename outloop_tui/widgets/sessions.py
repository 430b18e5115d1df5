"""The live agent sessions (`outloop run`), each of which the operator can end at once."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from outloop_tui.widgets.approvals import duration


def session_line(session: dict[str, Any], now: float) -> str:
    """label · tenant · workspace · pid, how long it has run and has left."""
    return (
        f"{session.get('label') or '?'} · {session.get('tenant')} · {session.get('workspace')} · "
        f"pid {session.get('root_pid')} · up {duration(now - float(session.get('started', now)))}, "
        f"ends in {duration(float(session.get('expires', now)) - now)}"
    )


class SessionsScreen(ModalScreen[str | None]):
    """Enter ends the highlighted session (its token stops working, its tree is no longer trusted)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close", id="sessions-close")]

    def __init__(self, sessions: Sequence[dict[str, Any]], now: float | None = None) -> None:
        super().__init__()
        self.sessions = list(sessions)
        self.now = time.time() if now is None else now

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Agent sessions: Enter ends one", id="dialog-title")
            yield OptionList(
                *(Option(session_line(s, self.now), id=str(s["id"])) for s in self.sessions), id="session-list"
            )
            yield Static(
                "Ending a session refuses its next call; the agent keeps running but acts for no tenant.",
                classes="form-hint",
            )

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
