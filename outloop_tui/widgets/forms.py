"""Modal forms: add a tenant, a workspace, a credential; edit a credential.

Each form checks its input with the same validation as config.toml itself
(broker.config), shows the problem in place, and writes only when everything is
valid. The credential's secret is typed into a password field and goes from
there straight into the keyring; the field is emptied as soon as it is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from broker import manage
from broker.config import ConfigError, Credential
from broker.paths import Paths
from broker.secrets import Secret, SecretStore, SecretStoreError


@dataclass(frozen=True)
class Added:
    """What a form added: kind ("tenant" | "workspace" | "credential"), tenant, name."""

    kind: str
    tenant: str
    name: str


def split_rules(text: str) -> list[str]:
    """Rules typed on one line, separated by commas: 'GET /a/**, POST /b'."""
    return [r.strip() for r in text.split(",") if r.strip()]


class FormScreen(ModalScreen[Added | None]):
    """A dialog with labelled fields, an error line, and Save / Cancel."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="form-cancel")]
    AUTO_FOCUS = None  # on_mount picks the first field still to fill
    TITLE_TEXT = ""
    SAVE_LABEL = "Save"

    def __init__(self, paths: Paths) -> None:
        super().__init__()
        self.paths = paths

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.TITLE_TEXT, id="dialog-title")
            with VerticalScroll(id="fields", can_focus=False):
                yield from self.fields()
            yield Static("", id="form-error")
            with Horizontal(classes="buttons"):
                yield Button(self.SAVE_LABEL, id="save", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        # Start on the first field still to fill (the tenant is often chosen already).
        for field in self.query(".field Select, .field Input"):
            empty = field.value == "" if isinstance(field, Input) else isinstance(field, Select) and field.is_blank()
            if empty:
                field.focus()
                return

    def fields(self) -> ComposeResult:
        yield from ()

    def value(self, widget_id: str) -> str:
        return self.query_one(f"#{widget_id}", Input).value.strip()

    def fail(self, message: str) -> None:
        self.query_one("#form-error", Static).update(message)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def _save(self) -> None:
        try:
            added = self.save()
        except (ConfigError, SecretStoreError, ValueError) as e:
            self.fail(str(e))
            return
        if added is not None:
            self.dismiss(added)

    def save(self) -> Added | None:
        raise NotImplementedError


def _labelled(label: str, widget: Any, hint: str = "") -> ComposeResult:
    """One row: the label, then the field; a hint becomes the field's tooltip."""
    if hint:
        widget.tooltip = hint
    with Horizontal(classes="field"):
        yield Label(label, classes="field-label")
        yield widget


class AddTenantScreen(FormScreen):
    TITLE_TEXT = "Add a tenant (a client)"
    SAVE_LABEL = "Add tenant"

    def fields(self) -> ComposeResult:
        yield from _labelled("Id", Input(placeholder="acme  (letters, digits, - _ .)", id="tenant-id"))
        yield from _labelled("Display name", Input(placeholder="Acme Corp", id="tenant-name"))

    def save(self) -> Added | None:
        tid = self.value("tenant-id")
        if not tid:
            self.fail("Give the tenant an id.")
            return None
        manage.add_tenant(self.paths, tid, self.value("tenant-name") or None)
        return Added("tenant", tid, tid)


class _TenantForm(FormScreen):
    def __init__(self, paths: Paths, tenants: Sequence[tuple[str, str]], tenant: str | None = None) -> None:
        super().__init__(paths)
        self.tenants = list(tenants)
        self.initial = tenant if tenant in {t for t, _ in tenants} else (self.tenants[0][0] if self.tenants else None)

    def tenant_select(self) -> ComposeResult:
        options = [(f"{name} ({tid})" if name != tid else tid, tid) for tid, name in self.tenants]
        select: Select[str] = Select(
            options,
            prompt="choose a tenant",
            id="tenant",
            value=self.initial if self.initial is not None else Select.NULL,
        )
        yield from _labelled("Tenant", select)

    def tenant(self) -> str | None:
        value = self.query_one("#tenant", Select).value
        return value if isinstance(value, str) else None


class AddWorkspaceScreen(_TenantForm):
    TITLE_TEXT = "Map a workspace folder to a tenant"
    SAVE_LABEL = "Add workspace"

    def fields(self) -> ComposeResult:
        yield from self.tenant_select()
        yield from _labelled("Folder", Input(placeholder="~/clients/acme/web", id="folder"))
        yield Static("Agents started in this folder or below act for the tenant.", classes="form-hint")

    def save(self) -> Added | None:
        tid = self.tenant()
        folder = self.value("folder")
        if tid is None or not folder:
            self.fail("Choose a tenant and give a folder.")
            return None
        path = manage.add_workspace(self.paths, tid, folder)
        if not Path(path).is_dir():
            self.notify(f"{path} does not exist yet; it is mapped anyway.", severity="warning")
        return Added("workspace", tid, str(path))


class AddCredentialScreen(_TenantForm):
    TITLE_TEXT = "Add a credential (the secret goes to the OS keyring)"
    SAVE_LABEL = "Add credential"

    def __init__(
        self,
        paths: Paths,
        tenants: Sequence[tuple[str, str]],
        tenant: str | None = None,
        secrets: SecretStore | None = None,
    ) -> None:
        super().__init__(paths, tenants, tenant)
        self.secrets = secrets or SecretStore()

    def fields(self) -> ComposeResult:
        yield from self.tenant_select()
        yield from _labelled("Name", Input(placeholder="github", id="cred-name"))
        yield from _labelled("Base URL", Input(placeholder="https://api.github.com", id="base-url"))
        yield from _labelled(
            "Auth", Input("bearer", id="auth", placeholder="bearer | basic:USER | header:NAME | query:PARAM")
        )
        yield from _labelled("Allow", Input(placeholder="GET /repos/**", id="allow"), "runs without asking")
        yield from _labelled("Ask", Input(placeholder="POST /repos/*/*/issues", id="ask"), "waits for you")
        yield from _labelled("Deny", Input(placeholder="DELETE /**", id="deny"), "refused; checked first")
        yield from _labelled(
            "Secret", Input(password=True, placeholder="stored in the OS keyring, never shown", id="secret")
        )
        yield Static(
            "Rules are 'METHOD /path/glob', several separated by commas; * is one path "
            "segment, ** any. No rules at all: every call asks you.",
            classes="form-hint",
        )

    def save(self) -> Added | None:
        tid = self.tenant()
        name = self.value("cred-name")
        base_url = self.value("base-url")
        if tid is None or not name or not base_url:
            self.fail("Choose a tenant and give a name and a base URL.")
            return None
        try:
            new = manage.check_credential(
                self.paths,
                tid,
                name,
                base_url=base_url,
                auth=self.value("auth") or "bearer",
                allow=split_rules(self.value("allow")),
                ask=split_rules(self.value("ask")),
                deny=split_rules(self.value("deny")),
            )
        except manage.BadField as e:
            self.fail(f"{FIELD_LABELS.get(e.field, e.field)}: {e.problem}.")
            return None
        secret_input = self.query_one("#secret", Input)
        if not secret_input.value.strip():
            self.fail("Type the secret (it is stored in the keyring, never in config.toml).")
            secret_input.focus()
            return None
        secret = Secret(secret_input.value.strip())
        secret_input.value = ""
        manage.add_credential(new, secret, self.secrets)
        return Added("credential", tid, name)


class EditCredentialScreen(FormScreen):
    """Change a credential's base URL, auth and rules; a secret typed here rotates the key."""

    TITLE_TEXT = "Edit a credential"
    SAVE_LABEL = "Save changes"

    def __init__(self, paths: Paths, credential: Credential, secrets: SecretStore | None = None) -> None:
        super().__init__(paths)
        self.credential = credential
        self.secrets = secrets or SecretStore()

    def fields(self) -> ComposeResult:
        c = self.credential
        yield Static(f"{c.tenant}/{c.name}", classes="form-hint")
        yield from _labelled("Base URL", Input(c.base_url, id="base-url"))
        yield from _labelled("Auth", Input(str(c.auth), id="auth"))
        yield from _labelled("Allow", Input(", ".join(c.allow), id="allow"), "runs without asking")
        yield from _labelled("Ask", Input(", ".join(c.ask), id="ask"), "waits for you")
        yield from _labelled("Deny", Input(", ".join(c.deny), id="deny"), "refused; checked first")
        yield from _labelled("New secret", Input(password=True, placeholder="leave empty to keep the key", id="secret"))
        yield Static(
            "Empty rule fields mean no rules of that kind; no rules at all: every call asks you.", classes="form-hint"
        )

    def save(self) -> Added | None:
        c = self.credential
        allow, ask, deny = (split_rules(self.value(k)) for k in ("allow", "ask", "deny"))
        try:
            manage.edit_credential(
                self.paths,
                c.tenant,
                c.name,
                base_url=self.value("base-url"),
                auth=self.value("auth") or "bearer",
                allow=allow,
                ask=ask,
                deny=deny,
                clear_rules=True,  # the form shows every list: what is left in it is the list
            )
        except manage.BadField as e:
            self.fail(f"{FIELD_LABELS.get(e.field, e.field)}: {e.problem}.")
            return None
        secret_input = self.query_one("#secret", Input)
        if secret_input.value.strip():
            secret = Secret(secret_input.value.strip())
            secret_input.value = ""
            manage.set_secret(self.paths, c.tenant, c.name, secret, self.secrets)
        return Added("credential", c.tenant, c.name)


FIELD_LABELS = {"base_url": "Base URL", "auth": "Auth", "allow": "Allow", "ask": "Ask", "deny": "Deny"}
