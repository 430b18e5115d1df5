"""The audit log's secrets in the OS keyring: the HMAC key, and the head kept out of the log's folder.

Service ``outloop`` like every Outloop secret, usernames that no tenant can
have (tenant ids start with a letter or digit):

- ``_audit/hmac-key``: the key the chain is sealed with (:class:`AuditKey`, hex),
  created by the broker on its first start. ``outloop audit verify`` needs it.
- ``_audit/head``: hash, id and seq of a record known to be in the log, written
  by the broker when it starts, when it stops, and every
  :data:`KEYRING_HEAD_SECONDS` while records are written. A sandboxed session
  sees neither the keyring nor the state folder, so it cannot move this head
  back after cutting the end of the log. It lags the log by up to that many
  seconds: a cut of only the records written since it was last updated is
  caught by ``audit.head`` (in the state folder), not by this.

A keyring write costs ~10-20 ms over D-Bus, so it is never on a call's path.
"""

from __future__ import annotations

import keyring.backend
import keyring.errors

from broker.audit.chain import AuditKey
from broker.audit.store import AuditError, Head, parse_head
from broker.secrets import SERVICE

KEY_USERNAME = "_audit/hmac-key"
HEAD_USERNAME = "_audit/head"
# How often a broker writing records updates the head in the keyring.
KEYRING_HEAD_SECONDS = 30.0


def _backend(backend: keyring.backend.KeyringBackend | None) -> keyring.backend.KeyringBackend:
    return backend or keyring.get_keyring()


def read_key(backend: keyring.backend.KeyringBackend | None = None) -> AuditKey | None:
    """The audit key in the keyring, None when there is none; AuditError when unreadable."""
    try:
        text = _backend(backend).get_password(SERVICE, KEY_USERNAME)
    except keyring.errors.KeyringError as e:
        raise AuditError(f"the audit key cannot be read from the keyring ({type(e).__name__})") from None
    if not text:
        return None
    try:
        return AuditKey.from_text(text)
    except ValueError:
        raise AuditError(f"the keyring's {KEY_USERNAME} entry is not an audit key") from None


def load_or_create_key(backend: keyring.backend.KeyringBackend | None = None) -> AuditKey:
    """The audit key, made and stored on first use."""
    key = read_key(backend)
    if key is not None:
        return key
    key = AuditKey.generate()
    try:
        _backend(backend).set_password(SERVICE, KEY_USERNAME, key.to_text())
    except keyring.errors.KeyringError as e:
        raise AuditError(f"the audit key cannot be stored in the keyring ({type(e).__name__})") from None
    return key


def read_head(backend: keyring.backend.KeyringBackend | None = None) -> Head | None:
    """The head kept in the keyring, None when there is none or the keyring cannot be read."""
    try:
        text = _backend(backend).get_password(SERVICE, HEAD_USERNAME)
    except keyring.errors.KeyringError:
        return None
    return parse_head(text) if text else None


def write_head(head: Head, backend: keyring.backend.KeyringBackend | None = None) -> bool:
    """Keep ``head`` in the keyring (blocking: call it off the event loop); False if that failed."""
    try:
        _backend(backend).set_password(SERVICE, HEAD_USERNAME, head.text())
    except keyring.errors.KeyringError:
        return False
    return True
