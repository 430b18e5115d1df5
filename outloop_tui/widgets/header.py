"""The status line at the top: broker state, socket, counts; and the warning banner."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

STATE_STYLE = {
    "listening": "bold #0b2e13 on #5fbf77",
    "locked": "bold white on #b03030",
    "error": "bold white on #b03030",
    "starting": "bold black on #d9a932",
    "stopped": "bold white on #555555",
}


@dataclass(frozen=True)
class Status:
    state: str
    socket: str
    tenants: int = 0
    workspaces: int = 0
    credentials: int = 0
    pending: int = 0
    alerts: int = 0
    audit: int = 0
    watcher: str = ""
    scanning: str = ""  # the leak watcher's scan under way, briefly ("scanning 3%"; the alerts pane says more)


class StatusHeader(Static):
    """One line; re-rendered only when something in it changed."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self._status: Status | None = None

    def show(self, status: Status) -> None:
        if status == self._status:
            return
        self._status = status
        s = status
        text = Text.assemble(
            (" outloop ", "bold reverse"),
            " ",
            (f" {s.state.upper()} ", STATE_STYLE.get(s.state, "bold")),
            "  ",
            ("socket ", "dim"),
            s.socket,
        )
        text.append("   ")
        parts = [(f"{s.tenants}", "tenants"), (f"{s.workspaces}", "workspaces"), (f"{s.credentials}", "credentials")]
        for value, label in parts:
            text.append(value, style="bold")
            text.append(f" {label}  ", style="dim")
        text.append(f"{s.pending}", style="bold yellow" if s.pending else "bold")
        text.append(" pending  ", style="dim")
        text.append(f"{s.alerts}", style="bold red" if s.alerts else "bold")
        text.append(" alerts  ", style="dim")
        if s.scanning:  # so "0 alerts" is not read as "nothing leaked" while files are still being read
            text.append(f"({s.scanning})  ", style="#d9a932")
        text.append(f"{s.audit:,}", style="bold")
        text.append(" audit events", style="dim")
        if s.watcher:
            text.append(f"  {s.watcher}", style="dim")
        self.update(text)


class Banner(Static):
    """A full-width warning (no usable keyring, config rejected, broker error)."""

    def say(self, message: str) -> None:
        self.update(message)
        self.display = bool(message)
