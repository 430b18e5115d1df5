"""Which config.toml the operator approved: a digest in the keyring, a copy in the state folder.

Outloop's own writes (every `ConfigEditor.save`: the management commands and
the dashboard's forms; `outloop config accept`) record the SHA-256 of the bytes
they write in the keyring (service `outloop`, username `_config/approved`)
before writing them, and keep those bytes as `state/config.approved.toml`
(0600, private folder). The broker enforces config.toml as it is only when its
digest is the approved one; any other content is reviewed against the approved
copy (broker/config_review.py): what narrows applies, what widens waits.

A process that can only write files (a sandboxed agent: no keyring bus, no
state folder) cannot make its edit look approved. One that can talk to the
keyring can; that is the same-user boundary of DESIGN §9.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import keyring
import keyring.backend
import keyring.errors

from broker.paths import Paths, atomic_write, ensure_private_dir
from broker.secrets import SERVICE

DIGEST_USERNAME = "_config/approved"
COPY_NAME = "config.approved.toml"


def digest(data: bytes) -> str:
    """The SHA-256 hex digest config files are approved by."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Approved:
    """The approved digest (None: nothing was ever approved here) and the approved copy, if it matches."""

    digest: str | None
    copy: bytes | None


def _backend(backend: keyring.backend.KeyringBackend | None) -> keyring.backend.KeyringBackend:
    return backend or keyring.get_keyring()


def approved_digest(backend: keyring.backend.KeyringBackend | None = None) -> str | None:
    """The digest in the keyring; None when there is none or the keyring cannot be read."""
    try:
        return _backend(backend).get_password(SERVICE, DIGEST_USERNAME) or None
    except keyring.errors.KeyringError:
        return None


def read_approved(paths: Paths, backend: keyring.backend.KeyringBackend | None = None) -> Approved:
    """The approved digest and the copy of the approved file (None when missing or not the approved one)."""
    known = approved_digest(backend)
    copy: bytes | None = None
    with contextlib.suppress(OSError):
        copy = (paths.state_dir / COPY_NAME).read_bytes()
    if known is None or copy is None or digest(copy) != known:
        copy = None
    return Approved(known, copy)


def approve(paths: Paths, data: bytes, backend: keyring.backend.KeyringBackend | None = None) -> bool:
    """Record ``data`` as the operator's config: the approved copy, then its digest in the keyring.

    Called before config.toml itself is written, so a broker that sees the new
    file already finds it approved. False when the keyring could not be
    written: the broker will then stage the change for the operator to accept.
    """
    ensure_private_dir(paths.state_dir)
    atomic_write(paths.state_dir / COPY_NAME, data)
    try:
        _backend(backend).set_password(SERVICE, DIGEST_USERNAME, digest(data))
    except keyring.errors.KeyringError:
        return False
    return True
