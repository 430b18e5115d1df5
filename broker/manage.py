"""Management transactions: tenants, workspaces and credentials, config.toml and keyring together.

The command line (`outloop tenant|workspace|credential ...`) and the dashboard's
forms both go through these functions, so the two cannot drift apart. Each one
validates first, then writes config.toml atomically; a credential's secret goes
to the keyring before its config entry is saved and is taken back out if the
save fails, so neither is ever left without the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.config import Auth, ConfigEditor, ConfigError, check_base_url, validate
from broker.paths import Paths
from broker.policy import RuleError, parse_rule
from broker.secrets import Secret, SecretStore


def add_tenant(paths: Paths, tenant: str, name: str | None = None) -> None:
    """Add a tenant (a client) with an optional display name."""
    editor = ConfigEditor(paths)
    editor.add_tenant(tenant, name)
    editor.save()


def remove_tenant(paths: Paths, tenant: str, secrets: SecretStore) -> list[str]:
    """Remove a tenant and the keyring secrets of its credentials; returns their names."""
    editor = ConfigEditor(paths)
    credentials = editor.remove_tenant(tenant)
    editor.save()
    for name in credentials:
        secrets.delete(tenant, name)
    return credentials


def add_workspace(paths: Paths, tenant: str, folder: str) -> Path:
    """Map a folder to a tenant; returns the folder as config.toml now holds it."""
    editor = ConfigEditor(paths)
    path = editor.add_workspace(tenant, folder)
    editor.save()
    return path


def remove_workspace(paths: Paths, folder: str) -> str:
    """Unmap a folder; returns the tenant it belonged to."""
    editor = ConfigEditor(paths)
    tenant = editor.remove_workspace(folder)
    editor.save()
    return tenant


class BadField(ConfigError):
    """One field of a credential given by the user is wrong: `field` names it, `problem` says why.

    The command line words it as the flag (`--allow 'GET x': ...`), the dashboard as
    its form field, so an error never points at a config.toml line the user never wrote.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class BadBaseURL(BadField):
    """A credential's base URL is not one the broker can call."""

    def __init__(self, problem: str) -> None:
        super().__init__("base_url", problem)


def _check_fields(base_url: str | None, auth: str | None, rules: dict[str, list[str] | None]) -> None:
    """Check what the user typed, field by field, before config.toml sees it."""
    if base_url is not None and (problem := check_base_url(base_url)):
        raise BadBaseURL(problem)
    if auth is not None:
        try:
            Auth.parse(auth)
        except ValueError as e:
            raise BadField("auth", str(e)) from None
    for kind, given in rules.items():
        for rule in given or ():
            try:
                parse_rule(rule)
            except RuleError as e:
                raise BadField(kind, str(e)) from None


@dataclass
class NewCredential:
    """A credential checked and ready to be stored once its secret is known."""

    tenant: str
    name: str
    editor: ConfigEditor = field(repr=False)


def check_credential(
    paths: Paths,
    tenant: str,
    name: str,
    *,
    base_url: str,
    auth: str = "bearer",
    allow: list[str] | None = None,
    ask: list[str] | None = None,
    deny: list[str] | None = None,
) -> NewCredential:
    """Validate a new credential before its secret is asked for (bad rules never move a secret).

    Raises BadField (a field given is wrong) or ConfigError saying what is wrong.
    """
    _check_fields(base_url, auth, {"allow": allow, "ask": ask, "deny": deny})
    table: dict[str, Any] = {"base_url": base_url, "auth": auth}
    for kind, rules in (("allow", allow), ("ask", ask), ("deny", deny)):
        if rules:
            table[kind] = list(rules)
    editor = ConfigEditor(paths)
    editor.add_credential(tenant, name, table)
    validate(editor.raw, paths.config_file)
    return NewCredential(tenant, name, editor)


def add_credential(new: NewCredential, secret: Secret, secrets: SecretStore) -> None:
    """Store the secret in the keyring, then save config.toml; a failed save takes the secret back."""
    secrets.set(new.tenant, new.name, secret)
    try:
        new.editor.save()
    except BaseException:
        secrets.delete(new.tenant, new.name)
        raise


def set_secret(paths: Paths, tenant: str, name: str, secret: Secret, secrets: SecretStore) -> None:
    """Rotate a credential's secret; its base URL, auth and rules stay as they are."""
    editor = ConfigEditor(paths)
    if name not in editor.tenant(tenant).get("credentials", {}):
        raise ConfigError(f"tenant {tenant!r} has no credential {name!r}; add it with `outloop credential add`")
    secrets.set(tenant, name, secret)


def edit_credential(
    paths: Paths,
    tenant: str,
    name: str,
    *,
    base_url: str | None = None,
    auth: str | None = None,
    allow: list[str] | None = None,
    ask: list[str] | None = None,
    deny: list[str] | None = None,
    clear_rules: bool = False,
) -> None:
    """Change what is given (None leaves a field as it is); the secret stays in the keyring.

    A rule list given replaces that list; `clear_rules` empties all three (every call asks).
    """
    _check_fields(base_url, auth, {"allow": allow, "ask": ask, "deny": deny})
    editor = ConfigEditor(paths)
    creds = editor.tenant(tenant).get("credentials", {})
    if name not in creds:
        raise ConfigError(f"tenant {tenant!r} has no credential {name!r}")
    table = creds[name]
    if base_url is not None:
        table["base_url"] = base_url
    if auth is not None:
        table["auth"] = auth
    for kind, given in (("allow", allow), ("ask", ask), ("deny", deny)):
        if clear_rules:
            table.pop(kind, None)
        if given:
            table[kind] = list(given)
    editor.save()


def remove_credential(paths: Paths, tenant: str, name: str, secrets: SecretStore) -> None:
    """Remove a credential from config.toml and its secret from the keyring."""
    editor = ConfigEditor(paths)
    editor.remove_credential(tenant, name)
    editor.save()
    secrets.delete(tenant, name)
