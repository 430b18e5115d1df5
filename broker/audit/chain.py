"""The chain: how a record is cleaned, sealed and hashed, and how one line is checked (DESIGN §6).

Every record carries ``prev``, the hash of the record before it (the chain runs
across day files; the first record ever has 64 zeros, :data:`GENESIS`), and
``hash``, a digest of ``prev`` (ASCII) followed by the record's canonical JSON:
every field except ``hash``, keys sorted, separators ``,`` and ``:``, UTF-8, no
ASCII escaping. Editing, deleting or reordering a record breaks the chain, and
:func:`broker.audit.verify` names the first bad one.

Two chains share that format. A record with ``"chain": "hmac-sha256"`` is
sealed with HMAC-SHA-256 under the audit key (:class:`AuditKey`, kept in the
OS keyring), so nobody without the key can write a record that verifies; a
record without it is plain SHA-256 (logs written before the key existed, and
logs opened without a key). Records also carry ``seq``, their 1-based place in
the chain, so that a cut can be counted, not only found.

No I/O: no files, no event loop. The store, the writer and the readers all
build on these.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64
HMAC_CHAIN = "hmac-sha256"

_RESERVED = frozenset({"ts", "id", "prev", "hash", "chain", "seq"})
# Keys that would carry request or response content, or a credential. The
# broker never passes them; dropping them here is a second line of defence.
_FORBIDDEN = frozenset(
    {
        "body",
        "request_body",
        "response_body",
        "headers",
        "request_headers",
        "response_headers",
        "query",
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "secret",
        "password",
        "token",
        "api_key",
        "apikey",
    }
)

Record = dict[str, Any]
Clock = Callable[[], datetime]


def canonical_json(record: Mapping[str, Any]) -> bytes:
    """Return the canonical JSON bytes of ``record`` without its ``hash`` field."""
    return _dumps({k: v for k, v in record.items() if k != "hash"})


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _dumps(record: Mapping[str, Any]) -> bytes:
    return _CANONICAL.encode(record).encode("utf-8")


class AuditKey:
    """The key the audit chain is sealed with (HMAC-SHA-256); its repr never shows it."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("an audit key has at least 16 bytes")
        self._key = key

    @classmethod
    def generate(cls) -> AuditKey:
        """A fresh random 256-bit key."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_text(cls, text: str) -> AuditKey:
        """The key as the keyring holds it (hex); ValueError when it is not one."""
        return cls(bytes.fromhex(text.strip()))

    def to_text(self) -> str:
        """The key as hex, for the keyring and nothing else."""
        return self._key.hex()

    @property
    def key_id(self) -> str:
        """A short name for the key (a hash of it): records name the key they were sealed with."""
        return hashlib.sha256(b"outloop audit key id\0" + self._key).hexdigest()[:16]

    def mac(self, data: bytes) -> str:
        """HMAC-SHA-256 of ``data`` under this key, in hex."""
        return hmac.digest(self._key, data, "sha256").hex()

    def __repr__(self) -> str:
        return "AuditKey('****')"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("an audit key cannot be pickled")


class KeyNeeded(Exception):
    """An HMAC-chained record was met and no audit key was given."""


def record_hash(prev: str, record: Mapping[str, Any], key: AuditKey | None = None) -> str:
    """Return the chain hash of ``record``: of ``prev`` + canonical JSON, SHA-256 or HMAC.

    A record marked ``"chain": "hmac-sha256"`` needs ``key`` (:class:`KeyNeeded` without it).
    """
    data = prev.encode("ascii") + canonical_json(record)
    if record.get("chain") == HMAC_CHAIN:
        if key is None:
            raise KeyNeeded("this record is sealed with the audit key")
        return key.mac(data)
    return hashlib.sha256(data).hexdigest()


def format_ts(moment: datetime) -> str:
    """Format ``moment`` as RFC 3339 UTC with milliseconds, e.g. ``2025-01-02T03:04:05.678Z``."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"  # "+00:00" becomes "Z"


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id(moment: datetime) -> str:
    # Sortable like a ULID: milliseconds since the epoch, then 48 random bits. An id
    # names a record, it grants nothing: `random` (seeded from the OS) is enough, and
    # spares a system call per record.
    return f"{int(moment.timestamp() * 1000):012x}{random.getrandbits(48):012x}"


_SCALARS = (str, int, float, bool, type(None))


def _strip(value: Any) -> Any:
    # Scalars first: this runs for every field of every record.
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Mapping):
        return {str(k): _strip(v) for k, v in value.items() if str(k).lower() not in _FORBIDDEN}
    if isinstance(value, list | tuple):
        return [_strip(v) for v in value]
    return value


# Field names the broker writes on every call; a record holding only these, with
# plain values, needs no cleaning (the common case, on every call).
_PLAIN_FIELDS = frozenset(
    {
        "event",
        "tenant",
        "workspace",
        "pid",
        "exe",
        "credential",
        "method",
        "host",
        "path",
        "rule",
        "decision",
        "reason",
        "approver",
        "status",
        "bytes",
        "ms",
        "attempt",
        "message",
    }
)
_SCALAR_TYPES = frozenset(_SCALARS)


def _clean(fields: Mapping[str, Any]) -> Record:
    if fields.keys() <= _PLAIN_FIELDS and set(map(type, fields.values())) <= _SCALAR_TYPES:
        return dict(fields)
    out: Record = {}
    for key, value in fields.items():
        if not isinstance(key, str):
            raise TypeError("audit field names must be strings")
        if key.lower() in _FORBIDDEN:
            continue
        if key in _RESERVED:
            raise ValueError(f"audit field {key!r} is set by the audit log itself")
        out[key] = value if isinstance(value, _SCALARS) else _strip(value)
    return out


def _seal(record: Record, prev: str, seq: int, key: AuditKey | None = None) -> bytes:
    """Chain `record` to the record whose hash is `prev`: set prev, seq (and chain) and hash; return its line."""
    record["prev"] = prev
    record["seq"] = seq
    if key is not None:
        record["chain"] = HMAC_CHAIN
    canon = _dumps(record)  # no "hash" key yet, so this is the canonical form
    data = prev.encode("ascii") + canon
    digest = key.mac(data) if key is not None else hashlib.sha256(data).hexdigest()
    record["hash"] = digest
    return canon[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}\n'


def _hash_marker(hash_hex: str) -> bytes:
    # How a record's own hash appears in its line; its successor holds the
    # same digest only under "prev", so this finds the record itself.
    return b'"hash":"' + hash_hex.encode("ascii") + b'"'


def _check_line(raw: bytes, key: AuditKey | None = None) -> tuple[Record | None, str | None]:
    """Parse and check one line on its own: (record, None) or (maybe record, reason).

    Raises :class:`KeyNeeded` for an HMAC-chained record when ``key`` is None.
    """
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "not valid JSON"
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    for name in ("ts", "id", "prev", "hash"):
        if not isinstance(rec.get(name), str):
            return rec, f"field {name!r} is missing"
    try:
        expected = record_hash(rec["prev"], rec, key)
    except (ValueError, TypeError, UnicodeEncodeError):
        return rec, "cannot be hashed"
    if expected != rec["hash"]:
        if rec.get("chain") == HMAC_CHAIN:
            return rec, "its HMAC does not match its contents (the record was edited, or this is not the log's key)"
        return rec, "its hash does not match its contents (the record was edited)"
    return rec, None
