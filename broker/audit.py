"""Tamper-evident audit log: hash-chained JSON lines in daily files (DESIGN §6).

Every record carries ``prev``, the hash of the record before it (the chain runs
across day files; the first record ever has 64 zeros), and ``hash``, the SHA-256
hex digest of ``prev`` (ASCII) followed by the record's canonical JSON: every
field except ``hash``, keys sorted, separators ``,`` and ``:``, UTF-8, no ASCII
escaping. Editing, deleting or reordering a record breaks the chain, and
:func:`verify` names the first bad one.

Files live in ``audit_dir`` as ``audit-YYYY-MM-DD.jsonl`` (UTC day of the record's
``ts``), 0600 in a 0700 directory. A small ``audit.head`` file holds the hash of
the last record known to be on disk. It lets :func:`verify` notice records cut
from the end of the log, which a chain alone cannot, and lets
:meth:`AuditLog.open` tell a line torn by a crash (never committed, so set aside)
from a committed record that was edited afterwards (kept, so verify reports it).

Writes use group commit: :meth:`AuditLog.record` queues the record in call order
and one writer task chains and writes everything queued so far together, and one
fsync covers everything written while the previous one ran, so concurrent
callers share one fsync instead of paying one each. A caller may ask only for
the write (``durable=False``): the record is in the file, so it survives a
crash of the broker, and its fsync comes with the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "GENESIS",
    "AuditError",
    "AuditLog",
    "AuditStats",
    "BadRecord",
    "TornTail",
    "VerifyResult",
    "canonical_json",
    "day_file_name",
    "follow",
    "format_ts",
    "iter_records",
    "last_records",
    "list_torn_tails",
    "record_hash",
    "verify",
]

logger = logging.getLogger("outloop.audit")

GENESIS = "0" * 64
HEAD_NAME = "audit.head"
# The head file is rewritten in place with a fixed size, so a write never
# leaves a shorter line followed by stale bytes of the previous one.
_HEAD_SIZE = 128
_DAY_RE = re.compile(r"^audit-(\d{4}-\d{2}-\d{2})\.jsonl$")
_TORN_RE = re.compile(r"^(audit-\d{4}-\d{2}-\d{2}\.jsonl)\.torn-(.+)$")
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

# How long a record written with durable=False may wait for a durable one to
# share its fsync (group commit) before it is fsynced on its own.
LAZY_SYNC_SECONDS = 0.005

# An fsync runs on the event loop itself while the disk answers within this
# (smoothed), on the audit thread once it is slower. Handing an fsync to a
# thread and back costs ~0.15 ms of CPU and as much latency on a 2-core VM,
# about what a fast disk takes for the fsync itself; a slow disk must not
# stall the loop (the dashboard shares it), so there the thread takes it.
INLINE_SYNC_MAX_SECONDS = 0.002
# An fsync on the loop that takes longer than this (a disk or network file
# system gone bad) sends every later fsync to the thread, for good.
INLINE_SYNC_GIVE_UP_SECONDS = 0.05

Record = dict[str, Any]
Clock = Callable[[], datetime]
Subscriber = Callable[[Record], None]


class AuditError(Exception):
    """The audit log cannot be opened or written; the caller must fail closed."""


# ---------------------------------------------------------------------------
# Pure chain logic


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


def day_file_name(day: date) -> str:
    """Return the name of the daily audit file for ``day`` (a UTC date)."""
    return f"audit-{day.isoformat()}.jsonl"


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


def _split_tail(data: bytes | mmap.mmap, head: str | None) -> tuple[int, bool]:
    """Find where the intact part of a daily file ends.

    Returns ``(keep, terminate)``: bytes from ``keep`` on are a torn tail to set
    aside. ``terminate`` says the kept part lacks its final newline, which
    happens only when someone removed it from a committed record.
    """
    marker = _hash_marker(head) if head else None
    end = len(data)
    if end == 0:
        return 0, False
    if data[end - 1 : end] != b"\n":
        start = data.rfind(b"\n", 0, end) + 1
        if marker is not None and data.find(marker, start, end) >= 0:
            return end, True
        end = start
    # Lines that do not verify after the last good one belong to the write a
    # crash interrupted (a block of zeros, a half-flushed page). A line that
    # the head file names was committed: keep it, verify will report it.
    while end > 0:
        start = data.rfind(b"\n", 0, end - 1) + 1
        line = bytes(data[start:end])
        _, problem = _check_line(line)
        if problem is None or (marker is not None and marker in line):
            break
        end = start
    return end, False


# ---------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class TornTail:
    """Bytes cut from the end of a daily file after a crash and kept beside it."""

    path: Path
    source: str
    size: int


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

    ``ok`` is False only when ``bad`` names a broken record. ``unfinished`` is a
    last line that is incomplete or does not verify and that no commit covers:
    torn by a crash (the broker sets it aside on its next start) or being
    written right now. ``torn`` lists tails already set aside.
    """

    ok: bool
    count: int
    files: int
    bad: BadRecord | None = None
    unfinished: BadRecord | None = None
    torn: tuple[TornTail, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass
class AuditStats:
    """Counters for benchmarks and ``doctor``: how well group commit batches."""

    records: int = 0
    batches: int = 0
    fsyncs: int = 0
    failures: int = 0
    largest_batch: int = 0
    inline_fsyncs: int = 0  # of `fsyncs`, how many ran on the event loop


# ---------------------------------------------------------------------------
# Blocking file work; runs on the audit writer thread, or (a fast fsync) on
# the loop while no thread job is running: never two at once


def _ensure_dir(path: Path) -> None:
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
    os.chmod(path, 0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _datasync(fd: int) -> None:
    # fdatasync skips timestamps but still flushes the size an append changed.
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fd)


def _read_head(raw: bytes) -> tuple[str, str] | None:
    parts = raw.decode("ascii", "replace").split()
    if len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
        return parts[0], parts[1]
    return None


def _day_files(audit_dir: Path) -> list[tuple[date, Path]]:
    found: list[tuple[date, Path]] = []
    try:
        entries = list(os.scandir(audit_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _DAY_RE.match(entry.name)
        if match and entry.is_file():
            try:
                found.append((date.fromisoformat(match.group(1)), audit_dir / entry.name))
            except ValueError:
                continue
    found.sort()
    return found


@dataclass
class _DayFile:
    day: date
    path: Path
    fd: int
    size: int  # bytes written (write(2) returned)
    ident: tuple[int, int]
    synced: int  # bytes known to be on disk
    failed: bool = False  # a write or sync failed: reopen before writing again


@dataclass
class _Opened:
    head: str
    last_ts: datetime | None
    torn: list[TornTail]


class _Store:
    """Owns the file descriptors. Every method runs on the single writer thread."""

    def __init__(self, audit_dir: Path) -> None:
        self.dir = audit_dir
        self.head_fd: int | None = None
        self.current: _DayFile | None = None
        self.head_hash: str | None = None
        self.fsyncs = 0
        self.torn: list[TornTail] = []
        self.clock: Clock = _now

    # -- opening and crash recovery

    def open(self, now: datetime) -> _Opened:
        _ensure_dir(self.dir)
        head_path = self.dir / HEAD_NAME
        fd = os.open(head_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditError(f"the audit log in {self.dir} is in use by another process") from None
            head = _read_head(os.pread(fd, _HEAD_SIZE, 0))
        except BaseException:
            os.close(fd)
            raise
        self.head_fd = fd
        self.head_hash = head[0] if head else None
        torn: list[TornTail] = []
        last: Record | None = None
        head_seen = False
        for _, path in reversed(_day_files(self.dir)):
            if last is None:
                # Only the file the chain ends in can hold a torn write; an
                # older file's tail is never cut, whatever it holds.
                cut = self._recover(path, now)
                if cut is not None:
                    torn.append(cut)
            found_last, found_head = self._inspect(path)
            head_seen = head_seen or found_head
            if last is None:
                if found_last is None:
                    continue  # empty: the chain ends in an earlier day
                last = found_last
                if head_seen or self.head_hash is None:
                    break
                # The head may be one batch behind and that batch may have
                # crossed midnight, so look one more file back for it.
                continue
            break
        prev = GENESIS
        last_ts: datetime | None = None
        if last is not None:
            prev = str(last.get("hash", self.head_hash or GENESIS))
            with contextlib.suppress(ValueError, TypeError):
                last_ts = datetime.fromisoformat(str(last["ts"]).replace("Z", "+00:00"))
        if self.head_hash is not None and not head_seen:
            # Records the broker committed are gone from the end. Chain new
            # records to the last committed one so the gap stays visible to
            # verify instead of being papered over.
            logger.warning("audit log ends before its last committed record; verify will fail")
            prev = self.head_hash
        return _Opened(head=prev, last_ts=last_ts, torn=torn)

    def _recover(self, path: Path, now: datetime) -> TornTail | None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o600)
            size = os.fstat(fd).st_size
            if size == 0:
                return None
            with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data:
                keep, terminate = _split_tail(data, self.head_hash)
                torn_bytes = bytes(data[keep:size])
            if terminate:
                os.pwrite(fd, b"\n", size)
                _datasync(fd)
                return None
            if not torn_bytes:
                return None
            aside = self._set_aside(path, torn_bytes, now)
            # Only cut the live file once the torn bytes are safely elsewhere.
            os.ftruncate(fd, keep)
            os.fsync(fd)
            _fsync_dir(self.dir)
            logger.warning("torn tail of %s (%d bytes) set aside at %s", path.name, len(torn_bytes), aside)
            cut = TornTail(path=aside, source=path.name, size=len(torn_bytes))
            self.torn.append(cut)
            return cut
        finally:
            os.close(fd)

    def _set_aside(self, path: Path, data: bytes, now: datetime) -> Path:
        stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S") + f".{now.microsecond // 1000:03d}Z"
        for n in range(1000):
            suffix = f"torn-{stamp}" if n == 0 else f"torn-{stamp}-{n}"
            aside = path.with_name(f"{path.name}.{suffix}")
            try:
                fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.dir)
            return aside
        raise AuditError(f"could not find a free name to set aside the torn tail of {path}")

    def _inspect(self, path: Path) -> tuple[Record | None, bool]:
        """Return the last record of ``path`` and whether the head record is in it."""
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return None, False
            with mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) as data:
                start = data.rfind(b"\n", 0, size - 1) + 1
                try:
                    last = json.loads(bytes(data[start:size]))
                except (ValueError, UnicodeDecodeError):
                    last = {}
                if not isinstance(last, dict):
                    last = {}
                seen = bool(self.head_hash) and data.find(_hash_marker(self.head_hash or "")) >= 0
        return last, seen

    # -- writing
    #
    # The writer task calls these on the event loop's thread, except `open_day`
    # and `sync`, which block and run on the audit thread. The writer never
    # runs `open_day` while a `sync` is in flight, so an fd is never closed
    # under a running fsync.

    def writable(self, day: date) -> _DayFile | None:
        """The open file for ``day`` if a batch can be appended to it right now."""
        current = self.current
        if current is None or current.day != day or current.failed:
            return None
        try:
            st = os.stat(current.path)
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != current.ident:
            return None  # removed or replaced under us: `open_day` reopens
        return current

    def open_day(self, day: date) -> _DayFile:
        """Open (or reopen, after a failure) the file for ``day``; blocking."""
        return self._day_file(day)

    def append(self, current: _DayFile, data: bytes) -> None:
        """Write one batch to the file; not durable until a `sync` covers it."""
        try:
            _write_all(current.fd, data)
        except BaseException:
            # Cut a partial write so the file ends on a whole record, and
            # reopen next time so recovery sets aside whatever remains.
            with contextlib.suppress(OSError):
                os.ftruncate(current.fd, current.size)
            current.failed = True
            raise
        current.size += len(data)

    def sync(self, current: _DayFile, size: int, head: str, head_line: bytes) -> None:
        """Make the first ``size`` bytes durable, then name their last record in the head file."""
        _datasync(current.fd)
        self.fsyncs += 1
        current.synced = size
        if self.head_fd is not None:
            # Written only after the records are durable: the head never
            # names a record that is not on disk. Not fsynced on purpose: a
            # head that lags after a crash is harmless, one per batch is not free.
            os.pwrite(self.head_fd, head_line, 0)
        self.head_hash = head

    def cut_unsynced(self, current: _DayFile) -> None:
        """After a failed sync: drop what may not be on disk; reopen before writing again."""
        current.failed = True
        with contextlib.suppress(OSError):
            os.ftruncate(current.fd, current.synced)
            current.size = current.synced

    def _day_file(self, day: date) -> _DayFile:
        current = self.current
        if current is not None and current.day == day and not current.failed:
            try:
                st = os.stat(current.path)
                same = (st.st_dev, st.st_ino) == current.ident
            except FileNotFoundError:
                same = False
            if same:
                return current
            # Removed or replaced under us: records written to the old inode
            # would be lost, so open the path again (or fail if we cannot).
            logger.warning("audit file %s was removed or replaced; reopening", current.path)
            self._close_current()
        elif current is not None:
            self._close_current()
        path = self.dir / day_file_name(day)
        created = False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            created = True
        except FileExistsError:
            self._recover(path, self.clock())
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o600)
            st = os.fstat(fd)
            if created:
                _fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        self.current = _DayFile(day, path, fd, st.st_size, (st.st_dev, st.st_ino), synced=st.st_size)
        return self.current

    def _close_current(self) -> None:
        if self.current is not None:
            with contextlib.suppress(OSError):
                os.close(self.current.fd)
            self.current = None

    def close(self) -> None:
        self._close_current()
        if self.head_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.head_fd)  # also releases the flock
            self.head_fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("short write to the audit log")
        view = view[written:]


# ---------------------------------------------------------------------------
# The log


@dataclass
class _Pending:
    record: Record
    day: date
    future: asyncio.Future[Record]
    durable: bool = True


@dataclass
class _Part:
    day: date
    data: bytearray = field(default_factory=bytearray)
    items: list[_Pending] = field(default_factory=list)


@dataclass
class _State:
    opened: bool = False
    closing: bool = False
    closed: bool = False
    broken: bool = False


class AuditLog:
    """The broker's audit log. Use from one event loop::

        log = AuditLog(paths.audit_dir)
        await log.open()
        attempt = await log.record({"event": "attempt", "tenant": "acme", ...})
        await log.record({"event": "outcome", "attempt": attempt["id"], ...})
        await log.close()

    ``clock`` returns an aware datetime; tests inject one to cross midnight.
    """

    def __init__(self, audit_dir: Path, *, clock: Clock | None = None) -> None:
        self.audit_dir = Path(audit_dir)
        self.stats = AuditStats()
        self._clock: Clock = clock or _now
        self._store = _Store(self.audit_dir)
        self._store.clock = self._clock
        self._state = _State()
        self._head = GENESIS
        self._last_ts: datetime | None = None
        self._tail = GENESIS  # hash of the last record written, durable or not
        self._unsynced_since = 0.0  # loop time the oldest unsynced record was written
        self._pending: list[_Pending] = []  # recorded, not yet written
        self._unsynced: list[_Pending] = []  # written, not yet covered by an fsync
        self._unsynced_durable = 0  # how many of those have a caller waiting for the fsync
        self._syncing: asyncio.Future[None] | None = None
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        # One dedicated thread: audit writes never queue behind other blocking
        # work in the loop's default executor, and the store needs no locks.
        self._executor: ThreadPoolExecutor | None = None
        self._subscribers: list[Subscriber] = []
        # Smoothed time an fsync takes here; it starts slow, so the first fsyncs run
        # on the thread and a disk that hangs from the start never stalls the loop.
        self._sync_seconds = 0.01
        self._inline_ok = True  # False once an fsync on the loop was very slow
        self._writing = False  # the writer task is writing a batch (it may be waiting to)

    @property
    def head(self) -> str:
        """Hash of the last durable record (64 zeros for an empty log)."""
        return self._head

    @property
    def torn_tails(self) -> tuple[TornTail, ...]:
        """Torn tails this log set aside (when opened, or when reopening a file after a failed write)."""
        return tuple(self._store.torn)

    async def __aenter__(self) -> AuditLog:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the folder, take the lock, recover a torn tail, load the chain head.

        A torn tail is moved to ``<daily file>.torn-<time>`` and noted in the chain
        as an ``audit_torn_tail`` record. Raises :class:`AuditError` if the log
        cannot be opened (so the broker does not start without its audit).
        """
        if self._state.opened:
            raise AuditError("the audit log is already open")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outloop-audit")
        loop = asyncio.get_running_loop()
        try:
            opened = await loop.run_in_executor(self._executor, self._store.open, self._clock())
        except AuditError:
            await self._shutdown_store()
            raise
        except OSError as exc:
            await self._shutdown_store()
            raise AuditError(f"cannot open the audit log in {self.audit_dir}: {exc.strerror or exc}") from exc
        self._head = self._tail = opened.head
        self._last_ts = opened.last_ts
        self._state.opened = True
        self._writer = asyncio.create_task(self._run_writer(), name="outloop-audit-writer")
        for torn in opened.torn:
            await self.record(
                {
                    "event": "audit_torn_tail",
                    "file": torn.source,
                    "set_aside": torn.path.name,
                    "bytes": torn.size,
                }
            )

    async def close(self) -> None:
        """Write what is queued, then release the files and the lock."""
        if not self._state.opened or self._state.closed:
            return
        self._state.closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        self._state.closed = True
        await self._shutdown_store()

    async def _shutdown_store(self) -> None:
        if self._executor is None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            await loop.run_in_executor(self._executor, self._store.close)
        self._executor.shutdown(wait=False)
        self._executor = None

    async def record(self, fields: Mapping[str, Any], *, durable: bool = True, batch: bool = True) -> Record:
        """Append one record and return it, with ts, id, prev and hash, once it is on disk.

        Records are chained in the order of the calls. Keys that could carry a
        body, headers or a secret are dropped. Raises :class:`AuditError` when the
        record cannot be written; the broker then refuses the request.

        With ``durable=False`` the call returns once the record is written to
        the file (write(2): it survives a crash of this process) instead of
        once it is fsynced; the fsync follows with the next batch, at most
        :data:`LAZY_SYNC_SECONDS` later. A failed write still raises.

        With ``batch=False`` the caller knows no other record is on its way to
        share the fsync with (the broker has no other call in flight): on a
        fast disk the fsync then runs at once, inside this call, instead of on
        the writer task's next pass.
        """
        if not self._state.opened or self._state.closing:
            raise AuditError("the audit log is not open")
        if self._state.broken:
            raise AuditError("the audit writer has stopped; restart the broker")
        record = _clean(fields)
        moment = self._clock()
        if moment.tzinfo is None:
            raise ValueError("the audit clock must return an aware datetime")
        # Keep ts monotonic even if the wall clock steps back, so the day
        # files stay in chain order.
        if self._last_ts is not None and moment < self._last_ts:
            moment = self._last_ts
        self._last_ts = moment
        if moment.tzinfo is not UTC:
            moment = moment.astimezone(UTC)
        full: Record = {"ts": format_ts(moment), "id": _new_id(moment), **record}
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        item = _Pending(full, moment.date(), future, durable)
        current = None if self._pending or self._writing else self._store.writable(item.day)
        if current is None:
            self._pending.append(item)
            self._wake.set()
            return await future
        # Nothing queued and the writer idle: append now, in call order, instead
        # of a round trip through the writer task.
        try:
            line = _seal(full, self._tail)
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit record is not JSON-serialisable: {type(exc).__name__}") from None
        try:
            self._store.append(current, line)
        except Exception as exc:
            self._write_failed([item], exc)
            return await future  # raises the AuditError its caller is told
        self._written([item])
        if durable and not batch and self._syncing is None and self._sync_inline():
            # Nothing to share an fsync with, and a fast disk: fsync now, so the record
            # is durable when this returns, with no wake of the writer task in between.
            self._start_sync()
        elif not durable and self._syncing is None:
            self._arm_lazy_sync()  # what the writer task would do if woken for it
        else:
            self._wake.set()
        return await future

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(record)`` on the loop for every record once it is on disk (fsynced).

        Callbacks must be quick and must not block (the dashboard buffers and
        drains on a timer). Returns a function that unsubscribes.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    # -- the writer
    #
    # One task writes, in call order: it takes what is pending, chains it, and
    # appends it to the day file with one write(2) on the loop's thread (a
    # small write to the page cache). Only the fsync may run on the audit
    # thread (when the disk is slow, see INLINE_SYNC_MAX_SECONDS), one at a
    # time; while it runs the writer keeps appending, and the next fsync
    # covers everything appended meanwhile. An fsync on the loop blocks it for
    # its fraction of a millisecond, and what arrives meanwhile forms the next
    # batch. That is the group commit: a batch is what one fsync covers. A
    # caller waiting for durability is answered when the fsync covering its
    # record returns; a ``durable=False`` caller when its record is written.
    # Records appended only by such callers wait up to LAZY_SYNC_SECONDS for a
    # durable record to share the fsync.

    async def _run_writer(self) -> None:
        batch: list[_Pending] = []
        try:
            while True:
                if self._pending:
                    batch, self._pending = self._pending, []
                    self._writing = True
                    try:
                        await self._write(batch)
                    finally:
                        self._writing = False
                    batch = []
                    continue
                if (
                    self._unsynced
                    and self._syncing is None
                    and (self._unsynced_durable or self._state.closing or self._lazy_due())
                ):
                    self._start_sync()
                    continue
                if self._state.closing and not self._unsynced and self._syncing is None:
                    return
                if self._unsynced and self._syncing is None:
                    self._arm_lazy_sync()
                self._wake.clear()
                await self._wake.wait()
        except BaseException as exc:
            # Cancelled (the loop is shutting down) or a bug: nobody may be
            # left believing a record was written, and later calls must fail.
            self._state.broken = True
            self._fail(batch + self._unsynced + self._pending, exc)
            self._pending = []
            self._unsynced = []
            self._unsynced_durable = 0
            if not isinstance(exc, Exception):
                raise
            logger.exception("audit writer stopped")

    def _arm_lazy_sync(self) -> None:
        """Wake the writer when the oldest unsynced record has waited LAZY_SYNC_SECONDS."""
        if self._lazy_timer is None:
            loop = asyncio.get_running_loop()
            self._lazy_timer = loop.call_at(self._unsynced_since + LAZY_SYNC_SECONDS, self._wake.set)

    def _lazy_due(self) -> bool:
        return asyncio.get_running_loop().time() >= self._unsynced_since + LAZY_SYNC_SECONDS

    async def _write(self, batch: list[_Pending]) -> None:
        # Almost always one part; a batch spans two only across midnight. Each
        # part is chained just before it is appended, from the last record
        # actually written, so a part that fails is never chained to.
        parts: list[_Part] = []
        for item in batch:
            if not parts or parts[-1].day != item.day:
                parts.append(_Part(item.day))
            parts[-1].items.append(item)
        for index, part in enumerate(parts):
            current = self._store.writable(part.day)
            if current is None:
                try:
                    current = await self._open_day(part.day)
                except Exception as exc:
                    self._write_failed([item for later in parts[index:] for item in later.items], exc)
                    return
            if not self._append(current, part):
                self._write_failed(
                    [item for later in parts[index + 1 :] for item in later.items],
                    AuditError("an earlier record could not be written"),
                )
                return

    def _append(self, current: _DayFile, part: _Part) -> bool:
        """Chain `part` and append it to `current`; False (its callers told) if the write failed."""
        items = self._chain(part)
        if not items:
            return True
        try:
            self._store.append(current, bytes(part.data))
        except Exception as exc:
            self._write_failed(part.items, exc)
            return False
        self._written(items)
        return True

    def _written(self, items: list[_Pending]) -> None:
        """`items` are in the file: they wait for an fsync; lazy callers are answered now."""
        self._tail = items[-1].record["hash"]
        if not self._unsynced:
            self._unsynced_since = asyncio.get_running_loop().time()
        self._unsynced.extend(items)
        for item in items:
            if item.durable:
                self._unsynced_durable += 1
            elif not item.future.done():
                item.future.set_result(item.record)

    def _chain(self, part: _Part) -> list[_Pending]:
        prev = self._tail
        chained: list[_Pending] = []
        for item in part.items:
            try:
                part.data += _seal(item.record, prev)
            except (TypeError, ValueError) as exc:
                if not item.future.done():
                    item.future.set_exception(
                        AuditError(f"audit record is not JSON-serialisable: {type(exc).__name__}")
                    )
                continue
            chained.append(item)
            prev = item.record["hash"]
        return chained

    async def _open_day(self, day: date) -> _DayFile:
        """Open the day's file on the audit thread once what precedes it is durable.

        Records of the old file are fsynced first, so that a crash can never
        keep a later record (in the new file) and lose an earlier one.
        """
        await self._drain()
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._store.open_day, day)

    async def _drain(self) -> None:
        """Wait until nothing written is waiting for an fsync."""
        while self._syncing is not None or self._unsynced:
            if self._syncing is None:
                self._start_sync()
            if self._syncing is not None:  # None: it ran on the loop, and is done
                await asyncio.shield(self._syncing)

    def _start_sync(self) -> None:
        current = self._store.current
        assert current is not None and self._executor is not None
        items, self._unsynced = self._unsynced, []
        self._unsynced_durable = 0
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        last = items[-1].record
        head_line = f"{last['hash']} {last['id']}".encode().ljust(_HEAD_SIZE - 1) + b"\n"
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._syncing = done
        size, head = current.size, last["hash"]
        if self._sync_inline():
            job: asyncio.Future[None] = loop.create_future()
            start = time.perf_counter()
            try:
                self._timed_sync(current, size, head, head_line)
            except Exception as exc:
                job.set_exception(exc)
            else:
                job.set_result(None)
            if time.perf_counter() - start > INLINE_SYNC_GIVE_UP_SECONDS:
                self._inline_ok = False
                logger.warning(
                    "an audit fsync blocked the broker for %.0f ms; fsyncs run on the audit thread from now on",
                    (time.perf_counter() - start) * 1000,
                )
            self.stats.inline_fsyncs += 1
            self._synced(job, current, items, done)
            return
        job = loop.run_in_executor(self._executor, self._timed_sync, current, size, head, head_line)
        job.add_done_callback(lambda f: self._synced(f, current, items, done))

    def _sync_inline(self) -> bool:
        """Whether the next fsync runs on the loop (the disk has been fast) or the thread."""
        return self._inline_ok and self._sync_seconds <= INLINE_SYNC_MAX_SECONDS

    def _timed_sync(self, current: _DayFile, size: int, head: str, head_line: bytes) -> None:
        start = time.perf_counter()
        try:
            self._store.sync(current, size, head, head_line)
        finally:
            self._sync_seconds = 0.8 * self._sync_seconds + 0.2 * (time.perf_counter() - start)

    def _synced(
        self, job: asyncio.Future[None], current: _DayFile, items: list[_Pending], done: asyncio.Future[None]
    ) -> None:
        self._syncing = None
        if self._pending or self._unsynced or self._state.closing:
            self._wake.set()
        if job.cancelled():  # nothing cancels it; should it happen, nobody is told "written"
            self._state.broken = True
            self._fail(items + self._unsynced, asyncio.CancelledError())
            self._unsynced = []
            self._unsynced_durable = 0
            if not done.done():
                done.set_result(None)
            return
        exc = job.exception()
        if exc is None:
            self._head = items[-1].record["hash"]
            self.stats.records += len(items)
            self.stats.batches += 1
            self.stats.fsyncs = self._store.fsyncs
            self.stats.largest_batch = max(self.stats.largest_batch, len(items))
            for item in items:
                if not item.future.done():
                    item.future.set_result(item.record)
            if self._subscribers:
                self._notify(items)
        else:
            # What may not be on disk is cut, and everything written after it
            # goes too: it was chained to what was cut. The chain continues
            # from the last durable record.
            self.stats.failures += 1
            logger.error("audit fsync failed: %s", exc)
            lost = items + self._unsynced
            self._unsynced = []
            self._unsynced_durable = 0
            self._store.cut_unsynced(current)
            self._tail = self._head
            acknowledged = sum(1 for item in lost if item.future.done() and not item.future.exception())
            if acknowledged:
                logger.error("%d audit records written without waiting for the fsync were cut", acknowledged)
            self._fail(lost, exc)
        if not done.done():
            done.set_result(None)

    def _write_failed(self, items: list[_Pending], exc: BaseException) -> None:
        self.stats.failures += 1
        logger.error("audit write failed: %s", exc)
        self._fail(items, exc)

    def _notify(self, done: list[_Pending]) -> None:
        for subscriber in tuple(self._subscribers):
            for item in done:
                try:
                    subscriber(dict(item.record))
                except Exception:
                    logger.exception("audit subscriber %r failed", subscriber)

    @staticmethod
    def _fail(items: list[_Pending], exc: BaseException) -> None:
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
        else:
            reason = str(exc) or type(exc).__name__
        for item in items:
            if not item.future.done():
                error = AuditError(f"could not write the audit log: {reason}")
                error.__cause__ = exc
                item.future.set_exception(error)


# ---------------------------------------------------------------------------
# Reading: verify, iterate, tail, follow


def list_torn_tails(audit_dir: Path) -> list[TornTail]:
    """Torn tails set aside in ``audit_dir``, oldest first."""
    found: list[TornTail] = []
    try:
        names = sorted(os.listdir(audit_dir))
    except FileNotFoundError:
        return []
    for name in names:
        match = _TORN_RE.match(name)
        if match:
            path = Path(audit_dir) / name
            with contextlib.suppress(OSError):
                found.append(TornTail(path=path, source=match.group(1), size=path.stat().st_size))
    return found


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


def _intact_end(path: Path, head: str | None) -> tuple[int, int]:
    """``(where the part recovery would keep ends, file size)`` of one snapshot of ``path``."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return 0, 0
        with mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) as data:
            keep, _ = _split_tail(data, head)
    return keep, size


def verify(audit_dir: Path) -> VerifyResult:
    """Check the whole chain in ``audit_dir``; read-only, safe while the broker runs.

    Fails on the first record that does not parse, whose hash does not match
    its contents, whose ``prev`` is not the hash of the record before it, or
    that sits in another day's file, and when records the head file names as
    written are missing from the end. An incomplete last line is not a failure:
    it is reported in ``unfinished``.
    """
    audit_dir = Path(audit_dir)
    head: tuple[str, str] | None = None
    notes: list[str] = []
    # Read the head before the records: it is written after they are on
    # disk, so every record it names is already there.
    with contextlib.suppress(FileNotFoundError), open(audit_dir / HEAD_NAME, "rb") as handle:
        head = _read_head(handle.read(_HEAD_SIZE))
    days = _day_files(audit_dir)
    torn = tuple(list_torn_tails(audit_dir))
    if days and head is None:
        notes.append(f"{HEAD_NAME} is missing, so records cut from the end cannot be detected")
    head_hash = head[0] if head else None
    prev = GENESIS
    count = 0
    head_seen = head_hash is None or head_hash == GENESIS
    last_place: tuple[Path, int] = (audit_dir, 0)
    unfinished: BadRecord | None = None

    def broken(path: Path, line: int, rec: Record | None, reason: str) -> VerifyResult:
        rid = rec.get("id") if rec is not None else None
        return VerifyResult(
            ok=False,
            count=count,
            files=len(days),
            bad=BadRecord(path, line, rid if isinstance(rid, str) else None, reason),
            torn=torn,
            notes=tuple(notes),
        )

    for index, (day, path) in enumerate(days):
        # Past this offset of the newest file lies what a crash left half
        # written; the broker sets it aside when it next opens the log.
        # The broker may be appending while we read: judge the newest file
        # by one snapshot of its size and ignore what arrives after it.
        intact: int | None = None
        limit: int | None = None
        if index == len(days) - 1:
            intact, limit = _intact_end(path, head_hash)
        last_place = (path, 0)
        for number, offset, raw in _lines(path, limit):
            rec: Record | None = None
            problem: str | None = "incomplete"
            if raw.endswith(b"\n"):
                rec, problem = _check_line(raw)
            if intact is not None and offset >= intact:
                what = "incomplete" if problem in ("incomplete", None) else f"damaged ({problem})"
                unfinished = BadRecord(path, number, None, f"the last line is {what}")
                break
            if problem == "incomplete":
                return broken(path, number, None, "the line is not terminated")
            if problem is not None:
                return broken(path, number, rec, problem)
            assert rec is not None
            if rec["prev"] != prev:
                return broken(
                    path,
                    number,
                    rec,
                    "its prev does not match the hash of the record before it "
                    "(records were deleted, inserted or reordered)",
                )
            if not rec["ts"].startswith(day.isoformat()):
                return broken(path, number, rec, f"its time {rec['ts']} does not belong in this day's file")
            prev = rec["hash"]
            count += 1
            last_place = (path, number)
            if prev == head_hash:
                head_seen = True
    if not head_seen:
        assert head is not None
        path, number = last_place
        return broken(
            path,
            number + 1,
            {"id": head[1]},
            f"the log ends before record {head[1]}, the last one written "
            f"(per {HEAD_NAME}): records were removed from the end",
        )
    return VerifyResult(
        ok=True,
        count=count,
        files=len(days),
        unfinished=unfinished,
        torn=torn,
        notes=tuple(notes),
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
