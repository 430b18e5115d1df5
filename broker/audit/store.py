"""The store: day files, the head file, and crash recovery (DESIGN §6).

Files live in ``audit_dir`` as ``audit-YYYY-MM-DD.jsonl`` (UTC day of the record's
``ts``), 0600 in a 0700 directory. A small ``audit.head`` file holds the hash,
id and ``seq`` of the last record known to be on disk. It lets :func:`broker.audit.verify` notice
records cut from the end of the log, which a chain alone cannot, and lets
:meth:`broker.audit.AuditLog.open` tell a line torn by a crash (never committed,
so set aside as ``<daily file>.torn-<time>``) from a committed record that was
edited afterwards (kept, so verify reports it).

:class:`_Store` owns the file descriptors and does the blocking file work; the
writer in :mod:`broker.audit.log` decides when each piece of it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from broker.audit.chain import (
    GENESIS,
    HMAC_CHAIN,
    AuditKey,
    Clock,
    KeyNeeded,
    Record,
    _check_line,
    _hash_marker,
    _now,
)

logger = logging.getLogger("outloop.audit")

HEAD_NAME = "audit.head"
# The head file is rewritten in place with a fixed size, so a write never
# leaves a shorter line followed by stale bytes of the previous one.
_HEAD_SIZE = 128
_DAY_RE = re.compile(r"^audit-(\d{4}-\d{2}-\d{2})\.jsonl$")
_TORN_RE = re.compile(r"^(audit-\d{4}-\d{2}-\d{2}\.jsonl)\.torn-(.+)$")


class AuditError(Exception):
    """The audit log cannot be opened or written; the caller must fail closed."""


def day_file_name(day: date) -> str:
    """Return the name of the daily audit file for ``day`` (a UTC date)."""
    return f"audit-{day.isoformat()}.jsonl"


# ---------------------------------------------------------------------------
# Torn tails: what a crash left half written at the end of the newest file


def _split_tail(data: bytes | mmap.mmap, head: str | None, key: AuditKey | None = None) -> tuple[int, bool]:
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
        _, problem = _check_line(line, key)
        # A whole record whose hash does not match was edited, not torn: a crash
        # leaves a cut line or a block of zeros, never well-formed JSON with a bad hash.
        edited = problem is not None and "does not match" in problem
        if problem is None or edited or (marker is not None and marker in line):
            break
        end = start
    return end, False


@dataclass(frozen=True)
class TornTail:
    """Bytes cut from the end of a daily file after a crash and kept beside it."""

    path: Path
    source: str
    size: int


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


@dataclass(frozen=True)
class Head:
    """A record named from outside the log (the head file, the keyring): its hash, id and seq."""

    hash: str
    id: str
    seq: int | None = None

    def text(self) -> str:
        return f"{self.hash} {self.id}" + ("" if self.seq is None else f" {self.seq}")


def parse_head(text: str) -> Head | None:
    """The inverse of :meth:`Head.text`; None when ``text`` does not name a record."""
    parts = text.split()
    if len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
        seq = int(parts[2]) if len(parts) >= 3 and parts[2].isdigit() else None
        return Head(parts[0], parts[1], seq)
    return None


def _read_head(raw: bytes) -> Head | None:
    return parse_head(raw.decode("ascii", "replace"))


def _head_line(hash_hex: str, record_id: str, seq: int | None = None) -> bytes:
    """What the head file holds to name a record: hash, id and seq, padded to ``_HEAD_SIZE`` bytes."""
    return Head(hash_hex, record_id, seq).text().encode().ljust(_HEAD_SIZE - 1) + b"\n"


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
    seq: int = 0  # seq of the record `head` names (the next record gets seq + 1)
    hmac: bool = False  # the chain ends in an HMAC-sealed record
    id: str = ""  # id of the record `head` names


class _Store:
    """Owns the file descriptors. Every method runs on the single writer thread."""

    def __init__(self, audit_dir: Path, key: AuditKey | None = None) -> None:
        self.dir = audit_dir
        self.key = key
        self.anchor: Head | None = None  # the head kept in the keyring, when the broker has one
        self.head_fd: int | None = None
        self.current: _DayFile | None = None
        self.head_hash: str | None = None
        self.fsyncs = 0
        self.torn: list[TornTail] = []
        self.clock: Clock = _now

    # -- opening and crash recovery

    def open(self, now: datetime) -> _Opened:
        try:
            return self._open(now)
        except KeyNeeded:
            self.close()
            raise AuditError(
                "the audit log is sealed with the audit key and the keyring has none; `outloop audit verify` says more"
            ) from None

    def _open(self, now: datetime) -> _Opened:
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
        if head is None and self.anchor is not None:
            # The head file is gone: the keyring's head names a committed record instead.
            head = self.anchor
        self.head_hash = head.hash if head else None
        self._check_key()
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
        seq = 0
        hmac_sealed = False
        last_id = ""
        if last is not None:
            last_id = str(last.get("id", ""))
            prev = str(last.get("hash", self.head_hash or GENESIS))
            with contextlib.suppress(ValueError, TypeError):
                last_ts = datetime.fromisoformat(str(last["ts"]).replace("Z", "+00:00"))
            hmac_sealed = last.get("chain") == HMAC_CHAIN
            found = last.get("seq")
            # A log from before records carried seq is counted once.
            seq = found if isinstance(found, int) and not isinstance(found, bool) else self._count()
        if self.head_hash is not None and not head_seen:
            # Records the broker committed are gone from the end. Chain new
            # records to the last committed one (and number them after it) so
            # the gap stays visible to verify instead of being papered over.
            logger.warning("audit log ends before its last committed record; verify will fail")
            prev = self.head_hash
            if head is not None:
                last_id = head.id
                if head.seq is not None:
                    seq = max(seq, head.seq)
        return _Opened(head=prev, last_ts=last_ts, torn=torn, seq=seq, hmac=hmac_sealed, id=last_id)

    def _check_key(self) -> None:
        """If the newest records are HMAC-sealed, one of them must verify under our key.

        Checked before recovery: under a wrong key every record would look torn.
        """
        sealed = False
        for _, path in reversed(_day_files(self.dir)[-2:]):
            with open(path, "rb") as handle:
                lines = handle.readlines()
            for raw in reversed(lines[-200:]):
                if HMAC_CHAIN.encode() not in raw:
                    continue
                sealed = True
                if self.key is None:
                    raise KeyNeeded("the log is sealed with the audit key")
                _, problem = _check_line(raw, self.key)
                if problem is None:
                    return
        if not sealed:
            return
        raise AuditError(
            "the audit key in the keyring is not the key this audit log was sealed with; "
            "`outloop audit verify` says more"
        )

    def _count(self) -> int:
        count = 0
        for _, path in _day_files(self.dir):
            with open(path, "rb") as handle:
                count += sum(1 for raw in handle if raw.endswith(b"\n"))
        return count

    def _recover(self, path: Path, now: datetime) -> TornTail | None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o600)
            size = os.fstat(fd).st_size
            if size == 0:
                return None
            with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data:
                keep, terminate = _split_tail(data, self.head_hash, self.key)
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
# Torn tails already set aside (verify lists them)


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
