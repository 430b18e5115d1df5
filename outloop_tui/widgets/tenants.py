"""The tenants pane: tenant → workspaces and credentials (with rule summaries), alert counts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Tree

from broker.config import Config, Tenant, display_workspace

# Tenants are shown expanded when there are few of them; a long list starts collapsed.
EXPAND_UP_TO = 8
PATH_WIDTH = 34


@dataclass(frozen=True)
class NodeRef:
    """What a tree node stands for: a tenant, one of its workspaces or credentials."""

    kind: str  # "tenant" | "workspace" | "credential"
    tenant: str
    name: str = ""


def short_path(text: str, width: int = PATH_WIDTH) -> str:
    """A workspace path cut from the left to fit the pane: …/clients/acme/web."""
    if len(text) <= width:
        return text
    parts = text.split("/")
    kept = parts[-1]
    for part in reversed(parts[:-1]):
        if len(kept) + len(part) + 3 > width:
            break
        kept = f"{part}/{kept}"
    return f"…/{kept}"


class TenantsTree(Tree[NodeRef]):
    """Rebuilt from the config whenever it or the alert counts change."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("Tenants", id=id)
        self.show_root = False
        self.guide_depth = 3
        self._signature: object = None
        self._known: set[str] = set()

    def on_mount(self) -> None:
        self.border_title = "Tenants"

    def show(self, config: Config, open_alerts: Mapping[str, int]) -> None:
        """Show `config`'s tenants; a no-op when nothing visible changed."""
        signature = (id(config), tuple(sorted(open_alerts.items())))
        if signature == self._signature:
            return
        self._signature = signature
        expanded = {n.data.tenant for n in self.root.children if n.data and n.is_expanded}
        expand_all = len(config.tenants) <= EXPAND_UP_TO
        cursor = self.cursor_node.data if self.cursor_node else None
        self.clear()
        for tenant in config.tenants.values():
            node = self.root.add(
                self._tenant_label(tenant, open_alerts.get(tenant.id, 0)), NodeRef("tenant", tenant.id)
            )
            for ws in tenant.workspaces:
                node.add_leaf(Text(short_path(display_workspace(ws))), NodeRef("workspace", tenant.id, str(ws)))
            for cred in tenant.credentials.values():
                label = Text.assemble(("key ", "dim"), (cred.name, "bold"), (f"  {cred.rule_summary()}", "dim"))
                node.add_leaf(label, NodeRef("credential", tenant.id, cred.name))
            if not tenant.workspaces and not tenant.credentials:
                node.add_leaf(Text("no workspace yet: press w", style="dim italic"), NodeRef("tenant", tenant.id))
            if tenant.id in expanded or (expand_all and tenant.id not in self._known):
                node.expand()
        self._known = set(config.tenants)
        count = len(config.tenants)
        self.border_title = f"Tenants ({count})"
        if cursor is not None:
            self._restore_cursor(cursor)

    def _restore_cursor(self, ref: NodeRef) -> None:
        for tenant_node in self.root.children:
            for node in (tenant_node, *tenant_node.children):
                if node.data == ref:
                    self.move_cursor(node)
                    return

    @staticmethod
    def _tenant_label(tenant: Tenant, alerts: int) -> Text:
        label = Text.assemble((tenant.name, "bold"))
        if tenant.name != tenant.id:
            label.append(f"  {tenant.id}", style="dim")
        if alerts:
            label.append(f"  ! {alerts} alert{'s' if alerts > 1 else ''}", style="bold red")
        return label

    def selected_tenant(self) -> str | None:
        node = self.cursor_node
        return node.data.tenant if node is not None and node.data is not None else None
