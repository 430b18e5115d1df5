"""The chain: how a record is cleaned, sealed and hashed, and how one line is checked (DESIGN §6).

Every record carries ``prev``, the hash of the record before it (the chain runs
across day files; the first record ever has 64 zeros, :data:`GENESIS`), and
``hash``, the SHA-256 hex digest of ``prev`` (ASCII) followed by the record's
canonical JSON: every field except ``hash``, keys sorted, separators ``,`` and
``:``, UTF-8, no ASCII escaping. Editing, deleting or reordering a record breaks
the chain, and :func:`broker.audit.verify` names the first bad one.

No I/O: no files, no event loop. The store, the writer and the readers all
build on these.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64

_RESERVED = frozenset({"ts", "id", "prev", "hash"})
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


def record_hash(prev: str, record: Mapping[str, Any]) -> str:
    """Return the chain hash of ``record``: SHA-256 hex of ``prev`` + canonical JSON."""
    return hashlib.sha256(prev.encode("ascii") + canonical_json(record)).hexdigest()


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


def _seal(record: Record, prev: str) -> bytes:
    """Chain `record` to the record whose hash is `prev`: set its prev and hash, return its line."""
    record["prev"] = prev
    canon = _dumps(record)  # no "hash" key yet, so this is the canonical form
    digest = hashlib.sha256(prev.encode("ascii") + canon).hexdigest()
    record["hash"] = digest
    return canon[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}\n'


def _hash_marker(hash_hex: str) -> bytes:
    # How a record's own hash appears in its line; its successor holds the
    # same digest only under "prev", so this finds the record itself.
    return b'"hash":"' + hash_hex.encode("ascii") + b'"'


def _check_line(raw: bytes) -> tuple[Record | None, str | None]:
    """Parse and check one line on its own: (record, None) or (maybe record, reason)."""
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
        expected = record_hash(rec["prev"], rec)
    except (ValueError, TypeError, UnicodeEncodeError):
        return rec, "cannot be hashed"
    if expected != rec["hash"]:
        return rec, "its hash does not match its contents (the record was edited)"
    return rec, None
