"""The command palette: every dashboard action by name (ctrl+p)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

# (palette name, action on the dashboard screen, help)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("approval: Approve", "answer('approved')", "Approve the highlighted (or oldest) pending call once"),
    ("approval: Deny", "answer('denied')", "Refuse the highlighted (or oldest) pending call"),
    (
        "approval: Always",
        "answer('always')",
        "Approve, and let the same credential + method + rule through until the grant expires",
    ),
    ("audit: Filter", "filter", "Filter the audit stream: tenant:ID outcome:refused words"),
    ("tenant: Add tenant", "add_tenant", "Add a tenant (a client)"),
    ("tenant: Add workspace", "add_workspace", "Map a workspace folder to a tenant"),
    (
        "tenant: Add credential",
        "add_credential",
        "Add a credential; the secret is typed into a password field and stored in the keyring",
    ),
    ("tenant: Edit credential", "edit", "Change the highlighted credential's URL, auth or rules, or rotate its secret"),
    ("tenant: Remove", "remove", "Remove the highlighted tenant, workspace or credential (asks first)"),
    ("approval: Revoke an always grant", "grants", "List the live 'always' grants and revoke one"),
    ("session: End an agent session", "sessions", "List the live agent sessions (outloop run) and end one"),
    (
        "config: Review a waiting config change",
        "review_config",
        "Accept or reject a config.toml change that widens access",
    ),
    ("alerts: Rescan workspaces", "rescan", "Scan every workspace for leaked keys again"),
    ("broker: Lock / unlock", "toggle_lock", "Refuse every call until unlocked"),
    ("view: Focus tenants", "focus('#tenants')", "Move to the tenants pane"),
    ("view: Focus approvals", "focus('#approvals-table')", "Move to the pending approvals"),
    ("view: Focus audit", "focus('#audit-log')", "Move to the audit stream"),
    ("view: Focus alerts", "focus('#alerts')", "Move to the leak alerts"),
    ("help: Keys", "help", "Show every key"),
    ("app: Quit", "app.quit", "Quit; pending calls are refused (asks first)"),
)


class OutloopCommands(Provider):
    """Dashboard actions, run on the dashboard screen whatever screen the palette covers."""

    def _runner(self, action: str) -> Callable[[], object]:
        screen = self.app.screen_stack[0]
        return partial(screen.run_action, action)

    async def discover(self) -> Hits:
        for name, action, help_text in COMMANDS:
            yield DiscoveryHit(name, self._runner(action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, action, help_text in COMMANDS:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), self._runner(action), help=help_text)
