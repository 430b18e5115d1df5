"""The writer: :class:`AuditLog`, with group commit (DESIGN §6).

Writes use group commit: :meth:`AuditLog.record` queues the record in call order
and one writer task chains and writes everything queued so far together, and one
fsync covers everything written while the previous one ran, so concurrent
callers share one fsync instead of paying one each. A caller may ask only for
the write (``durable=False``): the record is in the file, so it survives a
crash of the broker, and its fsync comes with the next batch.

Where each fsync runs (on the event loop or the audit thread) and how long a
record written with ``durable=False`` waits for one is decided by
:class:`FsyncPlacement`; the file work itself is :mod:`broker.audit.store`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from broker.audit.chain import GENESIS, AuditKey, Clock, Record, _clean, _new_id, _now, _seal, format_ts
from broker.audit.store import AuditError, Head, TornTail, _DayFile, _head_line, _Store

logger = logging.getLogger("outloop.audit")

Subscriber = Callable[[Record], None]


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
# Where and when an fsync runs

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


class FsyncPlacement:
    """Where and when the writer's next fsync runs: the loop or the audit thread, and how lazily.

    On the loop while the disk has been fast (smoothed latency within
    :data:`INLINE_SYNC_MAX_SECONDS`), on the thread otherwise; one fsync on the
    loop slower than :data:`INLINE_SYNC_GIVE_UP_SECONDS` sends every later one
    to the thread, for good. Records with no caller waiting for their fsync get
    one of their own :data:`LAZY_SYNC_SECONDS` after the oldest was written.

    The thresholds are read at each decision, so a test may patch them on this
    module. :meth:`observe` may be called from the audit thread; the writer
    never runs two fsyncs at once, so calls never overlap.
    """

    def __init__(self) -> None:
        # Smoothed time an fsync takes here; it starts slow, so the first fsyncs run
        # on the thread and a disk that hangs from the start never stalls the loop.
        self.seconds = 0.01
        self.gave_up = False  # True once an fsync on the loop was very slow

    def inline(self) -> bool:
        """Whether the next fsync runs on the loop (the disk has been fast) or the thread."""
        return not self.gave_up and self.seconds <= INLINE_SYNC_MAX_SECONDS

    def observe(self, seconds: float, *, on_loop: bool) -> None:
        """Count one fsync (failed or not) that took ``seconds``, on the loop or on the thread."""
        self.seconds = 0.8 * self.seconds + 0.2 * seconds
        if on_loop and seconds > INLINE_SYNC_GIVE_UP_SECONDS and not self.gave_up:
            self.gave_up = True
            logger.warning(
                "an audit fsync blocked the broker for %.0f ms; fsyncs run on the audit thread from now on",
                seconds * 1000,
            )

    def lazy_deadline(self, since: float) -> float:
        """Loop time by which records written at ``since``, none of them waited on, get their own fsync."""
        return since + LAZY_SYNC_SECONDS


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
    With ``key`` every record is sealed with HMAC-SHA-256 under it (the broker
    passes the keyring's audit key); without, with plain SHA-256.
    """

    def __init__(self, audit_dir: Path, *, clock: Clock | None = None, key: AuditKey | None = None) -> None:
        self.audit_dir = Path(audit_dir)
        self.stats = AuditStats()
        self._clock: Clock = clock or _now
        self._key = key
        self._store = _Store(self.audit_dir, key)
        self._store.clock = self._clock
        self._state = _State()
        self._head = GENESIS
        self._last_ts: datetime | None = None
        self._tail = GENESIS  # hash of the last record written, durable or not
        self._tail_seq = 0  # its seq
        self._head_seq = 0  # seq of the last durable record
        self._head_id = ""
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
        self._placement = FsyncPlacement()  # where the next fsync runs, and when a lazy one is due
        self._writing = False  # the writer task is writing a batch (it may be waiting to)

    @property
    def head(self) -> str:
        """Hash of the last durable record (64 zeros for an empty log)."""
        return self._head

    @property
    def last(self) -> Head | None:
        """The last durable record (hash, id, seq), or None before the first."""
        if self._head == GENESIS or not self._head_id:
            return None
        return Head(self._head, self._head_id, self._head_seq)

    @property
    def key(self) -> AuditKey | None:
        """The key records are sealed with (None: plain SHA-256)."""
        return self._key

    def use_key(self, key: AuditKey | None, anchor: Head | None = None) -> None:
        """Seal with ``key`` from the next :meth:`open` on; ``anchor`` is the head kept in the keyring."""
        if self._state.opened:
            raise AuditError("the audit key is set before the log is opened")
        self._key = key
        self._store.key = key
        self._store.anchor = anchor

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
        self._head_seq = self._tail_seq = opened.seq
        self._head_id = opened.id
        self._last_ts = opened.last_ts
        self._state.opened = True
        self._writer = asyncio.create_task(self._run_writer(), name="outloop-audit-writer")
        if self._key is not None and not opened.hmac:
            # From here on the chain is HMAC-sealed; this record says so, and
            # which key (by its id, never the key) seals it.
            await self.record({"event": "audit_hmac_started", "key_id": self._key.key_id, "after": opened.seq})
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
            line = _seal(full, self._tail, self._tail_seq + 1, self._key)
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit record is not JSON-serialisable: {type(exc).__name__}") from None
        try:
            self._store.append(current, line)
        except Exception as exc:
            self._write_failed([item], exc)
            return await future  # raises the AuditError its caller is told
        self._written([item])
        if durable and not batch and self._syncing is None and self._placement.inline():
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
            self._lazy_timer = loop.call_at(self._placement.lazy_deadline(self._unsynced_since), self._wake.set)

    def _lazy_due(self) -> bool:
        return asyncio.get_running_loop().time() >= self._placement.lazy_deadline(self._unsynced_since)

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
        self._tail_seq = items[-1].record["seq"]
        if not self._unsynced:
            self._unsynced_since = asyncio.get_running_loop().time()
        self._unsynced.extend(items)
        for item in items:
            if item.durable:
                self._unsynced_durable += 1
            elif not item.future.done():
                item.future.set_result(item.record)

    def _chain(self, part: _Part) -> list[_Pending]:
        prev, seq = self._tail, self._tail_seq
        chained: list[_Pending] = []
        for item in part.items:
            try:
                part.data += _seal(item.record, prev, seq + 1, self._key)
            except (TypeError, ValueError) as exc:
                if not item.future.done():
                    item.future.set_exception(
                        AuditError(f"audit record is not JSON-serialisable: {type(exc).__name__}")
                    )
                continue
            chained.append(item)
            prev, seq = item.record["hash"], seq + 1
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
        head_line = _head_line(last["hash"], last["id"], last["seq"])
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._syncing = done
        size, head = current.size, last["hash"]
        if self._placement.inline():
            job: asyncio.Future[None] = loop.create_future()
            try:
                self._timed_sync(current, size, head, head_line, True)
            except Exception as exc:
                job.set_exception(exc)
            else:
                job.set_result(None)
            self.stats.inline_fsyncs += 1
            self._synced(job, current, items, done)
            return
        job = loop.run_in_executor(self._executor, self._timed_sync, current, size, head, head_line, False)
        job.add_done_callback(lambda f: self._synced(f, current, items, done))

    def _timed_sync(self, current: _DayFile, size: int, head: str, head_line: bytes, on_loop: bool) -> None:
        start = time.perf_counter()
        try:
            self._store.sync(current, size, head, head_line)
        finally:
            self._placement.observe(time.perf_counter() - start, on_loop=on_loop)

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
            self._head_seq = items[-1].record["seq"]
            self._head_id = items[-1].record["id"]
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
            self._tail, self._tail_seq = self._head, self._head_seq
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
