"""Reading the log: verify the chain, iterate, tail and follow (DESIGN §6).

Everything here only reads, and is safe while the broker is writing: the
``outloop audit`` commands, the benchmarks and the tests use it; the broker
itself only writes, through :class:`broker.audit.AuditLog`.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from broker.audit.chain import GENESIS, HMAC_CHAIN, AuditKey, Record, _check_line
from broker.audit.store import (
    _HEAD_SIZE,
    HEAD_NAME,
    Head,
    TornTail,
    _day_files,
    _read_head,
    _split_tail,
    list_torn_tails,
)


@dataclass(frozen=True)
class BadRecord:
    """Where the chain breaks: the file, 1-based line, record id if readable, and why."""

    path: Path
    line: int
    id: str | None
    reason: str


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    ``ok`` is False only when ``bad`` names a broken record; ``kind`` then says
    how it broke: ``edited``, ``removed`` (records missing in the middle or at
    the start), ``cut`` (missing from the end), ``forged`` (a record not sealed
    with the audit key where one must be), ``key_mismatch`` (the key given is
    not the log's) or ``misplaced`` (in another day's file). ``cut`` is how many
    records are missing, when the records' ``seq`` says so. ``unfinished`` is a
    last line that is incomplete or does not verify and that no commit covers:
    torn by a crash (the broker sets it aside on its next start) or being
    written right now. ``torn`` lists tails already set aside. ``hmac`` and
    ``plain`` count the records of each chain.
    """

    ok: bool
    count: int
    files: int
    bad: BadRecord | None = None
    unfinished: BadRecord | None = None
    torn: tuple[TornTail, ...] = ()
    notes: tuple[str, ...] = ()
    kind: str | None = None
    cut: int | None = None
    hmac: int = 0
    plain: int = 0
    last_seq: int | None = None


def _lines(path: Path, limit: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(1-based line number, byte offset, raw line)`` of the first ``limit`` bytes."""
    with open(path, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            if limit is not None:
                if offset >= limit:
                    return
                raw = raw[: limit - offset]
            yield number, offset, raw
            offset += len(raw)


def _intact_end(path: Path, head: str | None, key: AuditKey | None) -> tuple[int, int]:
    """``(where the part recovery would keep ends, file size)`` of one snapshot of ``path``."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return 0, 0
        with mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) as data:
            keep, _ = _split_tail(data, head, key)
    return keep, size


def _seq(rec: Record) -> int | None:
    seq = rec.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _none_verify(days: list[tuple[date, Path]], key: AuditKey) -> bool:
    """Whether no HMAC-sealed record of the log verifies under ``key`` (so it is the wrong key)."""
    for _, path in days:
        with open(path, "rb") as handle:
            for raw in handle:
                if HMAC_CHAIN.encode() in raw and raw.endswith(b"\n") and _check_line(raw, key)[1] is None:
                    return False
    return True


def _seq_later(days: list[tuple[date, Path]], wanted: range) -> bool:
    """Whether a record numbered in ``wanted`` appears in these files (a record moved, not deleted)."""
    for _, path in days:
        for rec in _read_records(path):
            seq = _seq(rec)
            if seq is not None and seq in wanted:
                return True
    return False


def verify(audit_dir: Path, key: AuditKey | None = None, anchor: Head | None = None) -> VerifyResult:
    """Check the whole chain in ``audit_dir``; read-only, safe while the broker runs.

    Fails on the first record that does not parse, whose hash (or HMAC, under
    ``key``) does not match its contents, whose ``prev`` is not the hash of the
    record before it, that is plain SHA-256 after HMAC-sealed records, or that
    sits in another day's file; and when records the head file, or ``anchor``
    (the head kept in the keyring), names as written are missing from the end.
    With a ``key``, a log with records but none sealed with it fails too. An
    incomplete last line is not a failure: it is reported in ``unfinished``.

    Raises :class:`~broker.audit.chain.KeyNeeded` when the log holds
    HMAC-sealed records and ``key`` is None.
    """
    audit_dir = Path(audit_dir)
    head: Head | None = None
    notes: list[str] = []
    # Read the head before the records: it is written after they are on
    # disk, so every record it names is already there.
    with contextlib.suppress(FileNotFoundError), open(audit_dir / HEAD_NAME, "rb") as handle:
        head = _read_head(handle.read(_HEAD_SIZE))
    days = _day_files(audit_dir)
    torn = tuple(list_torn_tails(audit_dir))
    if days and head is None:
        notes.append(f"{HEAD_NAME} is missing, so records cut from the end cannot be detected by it")
    head_hash = head.hash if head else None
    prev = GENESIS
    prev_seq: int | None = 0
    count = hmac_count = 0
    head_seen = head_hash is None or head_hash == GENESIS
    anchor_seen = anchor is None
    last_place: tuple[Path, int] = (audit_dir, 0)
    unfinished: BadRecord | None = None

    def broken(
        path: Path, line: int, rec: Record | None, reason: str, kind: str, cut: int | None = None
    ) -> VerifyResult:
        rid = rec.get("id") if rec is not None else None
        return VerifyResult(
            ok=False,
            count=count,
            files=len(days),
            bad=BadRecord(path, line, rid if isinstance(rid, str) else None, reason),
            torn=torn,
            notes=tuple(notes),
            kind=kind,
            cut=cut,
            hmac=hmac_count,
            plain=count - hmac_count,
            last_seq=prev_seq,
        )

    for index, (day, path) in enumerate(days):
        # Past this offset of the newest file lies what a crash left half
        # written; the broker sets it aside when it next opens the log.
        # The broker may be appending while we read: judge the newest file
        # by one snapshot of its size and ignore what arrives after it.
        intact: int | None = None
        limit: int | None = None
        if index == len(days) - 1:
            # Without the head file, the keyring's head says which lines were committed.
            intact, limit = _intact_end(path, head_hash or (anchor.hash if anchor else None), key)
        last_place = (path, 0)
        for number, offset, raw in _lines(path, limit):
            rec: Record | None = None
            problem: str | None = "incomplete"
            if raw.endswith(b"\n"):
                rec, problem = _check_line(raw, key)
            if intact is not None and offset >= intact:
                what = "incomplete" if problem in ("incomplete", None) else f"damaged ({problem})"
                unfinished = BadRecord(path, number, None, f"the last line is {what}")
                break
            if problem == "incomplete":
                return broken(path, number, None, "the line is not terminated", "edited")
            sealed = rec is not None and rec.get("chain") == HMAC_CHAIN
            if problem is not None:
                if sealed and key is not None and hmac_count == 0 and _none_verify(days, key):
                    return broken(
                        path,
                        number,
                        rec,
                        "no record of this log verifies under the audit key in the keyring: "
                        "it is not the key this log was sealed with",
                        "key_mismatch",
                    )
                return broken(path, number, rec, problem, "edited")
            assert rec is not None
            seq = _seq(rec)
            if hmac_count and not sealed:
                return broken(
                    path,
                    number,
                    rec,
                    "a plain SHA-256 record after HMAC-sealed ones: it was written without the audit key",
                    "forged",
                )
            if rec["prev"] != prev:
                missing = None
                if seq is not None and prev_seq is not None and seq > prev_seq + 1:
                    missing = seq - prev_seq - 1
                    if _seq_later(days[index:], range(prev_seq + 1, seq)):
                        missing = None  # the "missing" ones come later: moved, not deleted
                where = "from the start" if count == 0 else "before it"
                if missing:
                    reason = (
                        f"{missing} record{'s are' if missing > 1 else ' is'} missing {where} (records were deleted)"
                    )
                else:
                    reason = (
                        "its prev does not match the hash of the record before it "
                        "(records were deleted, inserted or reordered)"
                    )
                return broken(path, number, rec, reason, "removed", missing)
            if not rec["ts"].startswith(day.isoformat()):
                return broken(
                    path, number, rec, f"its time {rec['ts']} does not belong in this day's file", "misplaced"
                )
            prev = rec["hash"]
            prev_seq = seq
            count += 1
            hmac_count += sealed
            last_place = (path, number)
            if prev == head_hash:
                head_seen = True
            if anchor is not None and prev == anchor.hash:
                anchor_seen = True
    path, number = last_place
    for seen, named, by in ((head_seen, head, HEAD_NAME), (anchor_seen, anchor, "the keyring's audit head")):
        if seen or named is None:
            continue
        cut = named.seq - prev_seq if named.seq is not None and prev_seq is not None else None
        how_many = f"{cut} record{'s were' if cut != 1 else ' was'}" if cut else "records were"
        return broken(
            path,
            number + 1,
            {"id": named.id},
            f"the log ends before record {named.id}, the last one written (per {by}): {how_many} removed from the end",
            "cut",
            cut if cut and cut > 0 else None,
        )
    if key is not None and count and not hmac_count:
        return broken(
            path,
            number,
            None,
            "the keyring holds an audit key but no record is sealed with it: the log was rewritten or replaced",
            "forged",
        )
    if count - hmac_count:
        notes.append(
            f"{count - hmac_count} record(s) are chained with plain SHA-256 (written before the audit key), "
            "which anyone can recompute"
        )
    return VerifyResult(
        ok=True,
        count=count,
        files=len(days),
        unfinished=unfinished,
        torn=torn,
        notes=tuple(notes),
        hmac=hmac_count,
        plain=count - hmac_count,
        last_seq=prev_seq,
    )


def iter_records(audit_dir: Path) -> Iterator[Record]:
    """Yield every readable record in chain order; skips lines that do not parse."""
    for _, path in _day_files(Path(audit_dir)):
        yield from _read_records(path)


def _read_records(path: Path) -> Iterator[Record]:
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
        for raw in handle:
            rec = _parse(raw)
            if rec is not None:
                yield rec


def _parse(raw: bytes) -> Record | None:
    if not raw.endswith(b"\n"):
        return None
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def last_records(audit_dir: Path, count: int) -> list[Record]:
    """The last ``count`` readable records, oldest first."""
    return _last_in([path for _, path in _day_files(Path(audit_dir))], count)


def _last_in(paths: list[Path], count: int) -> list[Record]:
    if count <= 0:
        return []
    chunks: list[list[Record]] = []
    needed = count
    # Newest files first, so a long history is not read to show ten lines.
    for path in reversed(paths):
        chunk = list(deque(_read_records(path), maxlen=needed))
        chunks.append(chunk)
        needed -= len(chunk)
        if needed <= 0:
            break
    return [rec for chunk in reversed(chunks) for rec in chunk]


def _parsed(lines: list[bytes]) -> list[Record]:
    return [rec for rec in map(_parse, lines) if rec is not None]


def follow(
    audit_dir: Path,
    *,
    backlog: int = 0,
    from_start: bool = False,
    poll_interval: float = 0.2,
    stop: Callable[[], bool] | None = None,
) -> Iterator[Record]:
    """Yield records as they are appended, across day files, until ``stop()`` is true.

    First yields the last ``backlog`` records (everything with ``from_start``),
    then what is appended after them, with nothing lost or repeated in between.
    A torn tail cut by the broker (the file shrinks) is skipped; an incomplete
    line is held back until its newline arrives.
    """
    audit_dir = Path(audit_dir)
    days = _day_files(audit_dir)
    current: Path | None = days[-1][1] if days else None
    offset = 0
    pending = b""
    if current is not None:
        if from_start or backlog > 0:
            lines, offset, pending = _read_new(current, 0, b"")
            newest = _parsed(lines)
            older = [path for _, path in days[:-1]]
            if from_start:
                for path in older:
                    yield from _read_records(path)
                yield from newest
            else:
                yield from _last_in(older, backlog - len(newest))
                yield from newest[-backlog:]
        else:
            with contextlib.suppress(FileNotFoundError):
                offset = current.stat().st_size
    while stop is None or not stop():
        progressed = False
        if current is not None:
            lines, offset, pending = _read_new(current, offset, pending)
            if lines:
                progressed = True
                yield from _parsed(lines)
        newer = [path for _, path in _day_files(audit_dir) if current is None or path > current]
        if newer and not progressed:
            # Drain the old file once more before moving on, then start the
            # next day from its beginning.
            if current is not None:
                lines, offset, pending = _read_new(current, offset, pending)
                yield from _parsed(lines)
            current, offset, pending = newer[0], 0, b""
            continue
        if not progressed:
            time.sleep(poll_interval)


def _read_new(path: Path, offset: int, pending: bytes) -> tuple[list[bytes], int, bytes]:
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < offset:
                # The broker cut a torn tail; what we held back is gone too.
                return [], size, b""
            handle.seek(offset)
            chunk = handle.read(size - offset)
    except FileNotFoundError:
        return [], offset, pending
    if not chunk:
        return [], offset, pending
    data = pending + chunk
    end = data.rfind(b"\n") + 1
    lines = data[:end].splitlines(keepends=True)
    return lines, offset + len(chunk), data[end:]
