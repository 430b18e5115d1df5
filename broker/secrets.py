"""Credential secrets in the OS keyring (service "outloop", username "<tenant>/<credential>").

Secrets are held in a `Secret`, whose repr and str are masked, so that a log call,
an exception message or a test failure can never print one by accident.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import keyring
import keyring.backend
import keyring.errors

SERVICE = "outloop"


class SecretStoreError(Exception):
    """The keyring could not be used; the message says what to install or run."""


class Secret:
    """A secret value that does not show itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value:
            raise ValueError("a secret cannot be empty")
        self._value = value

    def reveal(self) -> str:
        """The value itself: only for putting it on the wire or matching it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True)
class BackendInfo:
    name: str
    usable: bool
    advice: str  # what to do when not usable; empty otherwise


def username(tenant: str, credential: str) -> str:
    return f"{tenant}/{credential}"


def backend_info(backend: keyring.backend.KeyringBackend | None = None) -> BackendInfo:
    """Which keyring backend is in use and whether it can hold secrets."""
    kr = backend or keyring.get_keyring()
    cls = type(kr)
    name = f"{cls.__module__}.{cls.__qualname__}"
    usable = True
    try:
        usable = kr.priority > 0  # the fail and null backends have priority 0 or less
    except Exception:
        usable = False
    if "fail" in cls.__module__ or "null" in cls.__module__:
        usable = False
    if usable:
        return BackendInfo(name, True, "")
    advice = (
        "no usable keyring backend: on Linux install and start a Secret Service "
        "(e.g. `apt-get install gnome-keyring dbus` and run inside a desktop session, "
        "or `dbus-run-session` with `gnome-keyring-daemon --unlock --components=secrets`); "
        "on macOS the Keychain is used automatically"
    )
    return BackendInfo(name, False, advice)


class SecretStore:
    """Reads and writes credential secrets through `keyring`, caching reads in memory.

    A keyring lookup costs ~13 ms over D-Bus, so the broker asks once per credential
    and keeps the answer until it is told the credential changed.
    """

    def __init__(self, backend: keyring.backend.KeyringBackend | None = None) -> None:
        self._backend = backend
        self._cache: dict[tuple[str, str], Secret | None] = {}
        self._lock = threading.Lock()

    @property
    def backend(self) -> keyring.backend.KeyringBackend:
        return self._backend or keyring.get_keyring()

    def get(self, tenant: str, credential: str) -> Secret | None:
        """The secret for a credential, or None when the keyring holds none."""
        key = (tenant, credential)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            value = self.backend.get_password(SERVICE, username(tenant, credential))
        except keyring.errors.KeyringError as e:
            raise SecretStoreError(f"keyring lookup failed: {type(e).__name__}") from None
        secret = Secret(value) if value else None
        with self._lock:
            self._cache[key] = secret
        return secret

    def set(self, tenant: str, credential: str, secret: Secret) -> None:
        """Store a credential's secret in the keyring."""
        try:
            self.backend.set_password(SERVICE, username(tenant, credential), secret.reveal())
        except keyring.errors.KeyringError as e:
            raise SecretStoreError(
                f"could not store the secret in the keyring ({type(e).__name__}); `outloop doctor` says what to fix"
            ) from None
        with self._lock:
            self._cache[(tenant, credential)] = secret

    def delete(self, tenant: str, credential: str) -> bool:
        """Remove a credential's secret; False when there was none."""
        with self._lock:
            self._cache.pop((tenant, credential), None)
        try:
            self.backend.delete_password(SERVICE, username(tenant, credential))
        except keyring.errors.PasswordDeleteError:
            return False
        except keyring.errors.KeyringError as e:
            raise SecretStoreError(f"the keyring refused to remove the secret ({type(e).__name__})") from None
        return True

    def forget(self) -> None:
        """Drop the in-memory cache (after a config change)."""
        with self._lock:
            self._cache.clear()

    def managed(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Secret]:
        """The secrets for the given (tenant, credential) pairs that the keyring holds."""
        found: dict[tuple[str, str], Secret] = {}
        for tenant, credential in keys:
            secret = self.get(tenant, credential)
            if secret is not None:
                found[(tenant, credential)] = secret
        return found
