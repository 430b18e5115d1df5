"""`outloop audit verify` and `outloop audit tail [-f] [--json] [-n N]`.

Reads the audit files directly, so both work with or without a running broker.
Never imports textual.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from broker.audit import AuditError, AuditKey, BadRecord, Head, KeyNeeded, VerifyResult, follow, last_records, verify

DEFAULT_LINES = 20


def _audit_dir(args: argparse.Namespace) -> Path:
    override = getattr(args, "audit_dir", None)
    if override:
        return Path(override)
    from broker.paths import Paths

    return Paths.from_env().audit_dir


def _fail(exc: OSError) -> int:
    """One sentence on stderr, exit 2; the traceback only with OUTLOOP_DEBUG=1."""
    if os.environ.get("OUTLOOP_DEBUG") == "1":
        raise exc
    where = f" ({exc.filename})" if exc.filename else ""
    print(f"outloop: cannot read the audit log: {exc.strerror or exc}{where}", file=sys.stderr)
    return 2


def _keyring() -> tuple[AuditKey | None, Head | None]:
    """The audit key and the head kept in the keyring (None, None when it holds neither)."""
    from broker.audit import keys

    return keys.read_key(), keys.read_head()


def _refuse(args: argparse.Namespace, code: str, message: str) -> int:
    """A verification that could not be made: exit 2, one sentence (or JSON saying so)."""
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": {"code": code, "message": message}}, indent=2))
    else:
        print(f"outloop: {message}", file=sys.stderr)
    return 2


def run_verify(args: argparse.Namespace) -> int:
    """Check the whole chain; exit 0 if intact, 1 with the first bad record if not, 2 if it cannot."""
    audit_dir = _audit_dir(args)
    try:
        key, anchor = _keyring()
    except AuditError as exc:
        return _refuse(args, "key_unreadable", f"{exc}; the audit log cannot be verified without it")
    try:
        result = verify(audit_dir, key, anchor)
    except KeyNeeded:
        return _refuse(
            args,
            "key_missing",
            "the audit log is sealed with HMAC-SHA-256 and the keyring holds no audit key "
            "(service outloop, _audit/hmac-key), so it cannot be verified: restore that keyring entry",
        )
    except OSError as exc:
        return _fail(exc)
    if getattr(args, "json", False):
        print(json.dumps(_verify_json(result, key), indent=2))
        return 0 if result.ok else 1
    out = sys.stdout
    for note in result.notes:
        print(f"note: {note}", file=out)
    for torn in result.torn:
        print(
            f"torn tail set aside at {torn.path} ({torn.size} bytes cut from {torn.source})",
            file=out,
        )
    if result.unfinished is not None:
        u = result.unfinished
        print(
            f"unfinished last line at {u.path}:{u.line}: {u.reason}; torn by a crash or being "
            "written now, it is set aside when the broker next starts",
            file=out,
        )
    if not result.ok:
        assert result.bad is not None
        bad = result.bad
        ident = f" (record {bad.id})" if bad.id else ""
        print(
            f"audit chain BROKEN at {bad.path}:{bad.line}{ident}: {bad.reason}; "
            f"{result.count} records before it verified",
            file=sys.stderr,
        )
        return 1
    files = "file" if result.files == 1 else "files"
    records = "record" if result.count == 1 else "records"
    sealed = f", {result.hmac} sealed with the audit key (HMAC-SHA-256)" if result.hmac else ""
    print(f"audit chain OK: {result.count} {records} in {result.files} {files}{sealed}", file=out)
    return 0


def _verify_json(result: VerifyResult, key: AuditKey | None = None) -> dict[str, Any]:
    def bad(b: BadRecord | None) -> dict[str, Any] | None:
        return None if b is None else {"path": str(b.path), "line": b.line, "id": b.id, "reason": b.reason}

    return {
        "ok": result.ok,
        "kind": result.kind,
        "cut": result.cut,
        "records": result.count,
        "hmac_records": result.hmac,
        "plain_records": result.plain,
        "last_seq": result.last_seq,
        "key_id": key.key_id if key is not None else None,
        "files": result.files,
        "bad": bad(result.bad),
        "unfinished": bad(result.unfinished),
        "torn": [{"path": str(t.path), "source": str(t.source), "bytes": t.size} for t in result.torn],
        "notes": list(result.notes),
    }


def run_tail(args: argparse.Namespace) -> int:
    """Print the last records, then with ``-f`` follow new ones until Ctrl-C."""
    audit_dir = _audit_dir(args)
    as_json = bool(getattr(args, "json", False))
    lines = getattr(args, "lines", None)
    count = DEFAULT_LINES if lines is None else max(0, int(lines))
    try:
        if getattr(args, "follow", False):
            # One reader for history and new records, so none slip in between.
            _emit(follow(audit_dir, backlog=count), as_json)
        else:
            _emit(last_records(audit_dir, count), as_json)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (`| head`); stop quietly and keep Python from
        # complaining again while flushing stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        return _fail(exc)
    return 0


def _emit(records: Iterable[dict[str, Any]], as_json: bool) -> None:
    out = sys.stdout
    for record in records:
        if as_json:
            # Parsed records keep the file's key order, so this is the stored line.
            out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        else:
            out.write(format_record(record) + "\n")
        out.flush()


def _clean(value: Any) -> str:
    """Text safe for a terminal: agents choose paths and reasons, so escape controls."""
    if value is None or value == "":
        return "-"
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def format_record(record: dict[str, Any]) -> str:
    """One human-readable line: time, event, tenant, credential, request, decision, status, ms."""
    ts = str(record.get("ts", "")).replace("T", " ").rstrip("Z")
    event = record.get("event", "")
    if event not in ("attempt", "outcome"):
        known = {"ts", "id", "prev", "hash", "event"}
        extra = " ".join(f"{k}={_clean(v)}" for k, v in record.items() if k not in known)
        return f"{_clean(ts)}  {_clean(event)}  {extra}".rstrip()
    ms = record.get("ms")
    cols = [
        _clean(ts),
        f"{_clean(event):<7}",
        _clean(record.get("tenant")),
        _clean(record.get("credential")),
        f"{_clean(record.get('method'))} {_clean(record.get('path'))}",
        _clean(record.get("decision")),
        _clean(record.get("status")),
        "-" if ms is None else f"{_clean(ms)}ms",
    ]
    return "  ".join(cols)
