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

from broker.config import ConfigEditor, ConfigError, check_base_url, validate
from broker.paths import Paths
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


class BadBaseURL(ConfigError):
    """A credential's base URL is not one the broker can call; `problem` says why."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"base URL {problem}")
        self.problem = problem


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

    Raises BadBaseURL or ConfigError saying what is wrong.
    """
    problem = check_base_url(base_url)
    if problem:
        raise BadBaseURL(problem)
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


def remove_credential(paths: Paths, tenant: str, name: str, secrets: SecretStore) -> None:
    """Remove a credential from config.toml and its secret from the keyring."""
    editor = ConfigEditor(paths)
    editor.remove_credential(tenant, name)
    editor.save()
    secrets.delete(tenant, name)
