"""The audit log (DESIGN §6): chain, tamper detection, torn tails, group commit,
fail-closed writes, day files, kill -9, and the `outloop audit` commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    day_file_name,
    follow,
    iter_records,
    last_records,
    list_torn_tails,
    record_hash,
    verify,
)
from broker.audit import log as audit_log
from broker.audit import store as audit_store
from broker.paths import Paths
from outloop_tui import cmd_audit

REPO = Path(__file__).resolve().parent.parent
DAY1 = datetime(2025, 3, 9, 23, 59, 58, tzinfo=UTC)


class Clock:
    """A settable clock, so tests cross midnight without waiting for it."""

    def __init__(self, start: datetime = DAY1) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def audit_dir() -> Path:
    return Paths.from_env().audit_dir


@pytest.fixture
def clock() -> Clock:
    return Clock()


def call(n: int, **extra: Any) -> dict[str, Any]:
    """Fields like the broker's for one call attempt."""
    return {
        "event": "attempt",
        "tenant": "acme",
        "workspace": "/home/op/clients/acme/web",
        "pid": 4242,
        "exe": "/usr/bin/node",
        "credential": "github",
        "method": "GET",
        "host": "api.github.com",
        "path": f"/repos/acme/web/issues/{n}",
        "decision": "allow",
        "reason": "list issues",
        **extra,
    }


async def write_log(audit_dir: Path, count: int, clock: Clock | None = None) -> list[dict[str, Any]]:
    async with AuditLog(audit_dir, clock=clock) as log:
        return [await log.record(call(i)) for i in range(count)]


def day_files(audit_dir: Path) -> list[Path]:
    return sorted(audit_dir.glob("audit-*.jsonl"))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# -- the chain ---------------------------------------------------------------


async def test_round_trip(audit_dir: Path) -> None:
    records = await write_log(audit_dir, 5)
    assert records[0]["prev"] == GENESIS
    for before, after in zip(records, records[1:], strict=False):
        assert after["prev"] == before["hash"]
    for rec in records:
        assert rec["hash"] == record_hash(rec["prev"], rec)
        assert rec["ts"].endswith("Z") and len(rec["ts"]) == len("2025-01-01T00:00:00.000Z")
    assert len({rec["id"] for rec in records}) == 5
    assert list(iter_records(audit_dir)) == records
    assert last_records(audit_dir, 2) == records[-2:]
    result = verify(audit_dir)
    assert result.ok and result.count == 5 and result.files == 1
    assert result.unfinished is None and result.torn == ()


async def test_files_are_private(audit_dir: Path) -> None:
    await write_log(audit_dir, 1)
    assert stat.S_IMODE(audit_dir.stat().st_mode) == 0o700
    for path in audit_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


async def test_reopen_continues_the_chain(audit_dir: Path) -> None:
    first = await write_log(audit_dir, 3)
    second = await write_log(audit_dir, 3)
    assert second[0]["prev"] == first[-1]["hash"]
    assert verify(audit_dir).count == 6


async def test_no_secret_or_body_is_stored(audit_dir: Path) -> None:
    secret = "ghp_" + "S3cr3tV4lu3" * 3
    async with AuditLog(audit_dir) as log:
        rec = await log.record(
            call(
                1,
                body=secret,
                headers={"Authorization": f"Bearer {secret}"},
                Authorization=secret,
                query={"api_key": secret},
                extra={"token": secret, "kept": "yes"},
            )
        )
    assert "body" not in rec and "headers" not in rec and "Authorization" not in rec
    assert rec["extra"] == {"kept": "yes"}
    raw = b"".join(p.read_bytes() for p in audit_dir.iterdir())
    assert secret.encode() not in raw
    assert verify(audit_dir).ok


async def test_reserved_fields_are_refused(audit_dir: Path) -> None:
    async with AuditLog(audit_dir) as log:
        with pytest.raises(ValueError):
            await log.record({"event": "attempt", "hash": "0" * 64})
        # A value JSON cannot hold fails that record alone.
        with pytest.raises(AuditError):
            await log.record({"event": "attempt", "ms": float("nan")})
        await log.record(call(1))
    assert verify(audit_dir).count == 1


# -- tamper detection ----------------------------------------------------------


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


async def test_verify_finds_an_edited_record(audit_dir: Path) -> None:
    await write_log(audit_dir, 10)
    (path,) = day_files(audit_dir)
    lines = lines_of(path)
    rec = json.loads(lines[4])
    rec["decision"] = "deny"
    lines[4] = json.dumps(rec, separators=(",", ":")).encode() + b"\n"
    rewrite(path, lines)
    result = verify(audit_dir)
    assert not result.ok and result.bad is not None
    assert (result.bad.path, result.bad.line, result.bad.id) == (path, 5, rec["id"])
    assert "edited" in result.bad.reason
    assert result.count == 4


async def test_verify_finds_an_edit_with_a_recomputed_hash(audit_dir: Path) -> None:
    await write_log(audit_dir, 10)
    (path,) = day_files(audit_dir)
    lines = lines_of(path)
    rec = json.loads(lines[4])
    rec["path"] = "/admin"
    rec["hash"] = record_hash(rec["prev"], rec)
    lines[4] = json.dumps(rec, separators=(",", ":")).encode() + b"\n"
    rewrite(path, lines)
    result = verify(audit_dir)
    assert not result.ok and result.bad is not None
    assert result.bad.line == 6 and "prev does not match" in result.bad.reason


async def test_verify_finds_a_deleted_record(audit_dir: Path) -> None:
    await write_log(audit_dir, 10)
    (path,) = day_files(audit_dir)
    lines = lines_of(path)
    del lines[3]
    rewrite(path, lines)
    result = verify(audit_dir)
    assert not result.ok and result.bad is not None
    assert result.bad.line == 4 and "deleted" in result.bad.reason


async def test_verify_finds_two_swapped_records(audit_dir: Path) -> None:
    await write_log(audit_dir, 10)
    (path,) = day_files(audit_dir)
    lines = lines_of(path)
    lines[6], lines[7] = lines[7], lines[6]
    rewrite(path, lines)
    result = verify(audit_dir)
    assert not result.ok and result.bad is not None
    assert result.bad.line == 7 and "reordered" in result.bad.reason


async def test_verify_finds_the_last_record_deleted(audit_dir: Path) -> None:
    records = await write_log(audit_dir, 10)
    (path,) = day_files(audit_dir)
    rewrite(path, lines_of(path)[:-1])
    result = verify(audit_dir)
    assert not result.ok and result.bad is not None
    assert result.bad.id == records[-1]["id"]
    assert "removed from the end" in result.bad.reason


async def test_a_cut_end_stays_visible_after_a_restart(audit_dir: Path) -> None:
    await write_log(audit_dir, 10)
    (path,) = day_files(audit_dir)
    rewrite(path, lines_of(path)[:-2])
    # The broker starts again and writes on: the gap must not be papered over.
    await write_log(audit_dir, 2)
    result = verify(audit_dir)
    assert not result.ok and result.bad is not None
    assert result.bad.line == 9 and "deleted" in result.bad.reason


async def test_verify_finds_a_record_moved_between_days(audit_dir: Path, clock: Clock) -> None:
    async with AuditLog(audit_dir, clock=clock) as log:
        for i in range(3):
            await log.record(call(i))
        clock.advance(seconds=5)  # past midnight
        for i in range(3):
            await log.record(call(i))
    day1, day2 = day_files(audit_dir)
    assert verify(audit_dir).ok
    # Chain order is unchanged, only the file differs: the day check catches it.
    lines1, lines2 = lines_of(day1), lines_of(day2)
    rewrite(day1, lines1[:-1])
    rewrite(day2, [lines1[-1], *lines2])
    result = verify(audit_dir)
    assert not result.ok and result.bad is not None
    assert result.bad.path == day2 and result.bad.line == 1
    assert "day" in result.bad.reason


async def test_verify_finds_a_deleted_day(audit_dir: Path, clock: Clock) -> None:
    async with AuditLog(audit_dir, clock=clock) as log:
        await log.record(call(1))
        clock.advance(days=1)
        await log.record(call(2))
        clock.advance(days=1)
        await log.record(call(3))
    files = day_files(audit_dir)
    files[1].unlink()
    result = verify(audit_dir)
    assert not result.ok and result.bad is not None and result.bad.path == files[2]


# -- day files -------------------------------------------------------------------


async def test_the_chain_runs_across_days(audit_dir: Path, clock: Clock) -> None:
    async with AuditLog(audit_dir, clock=clock) as log:
        before = [await log.record(call(i)) for i in range(2)]
        clock.advance(seconds=3)
        after = [await log.record(call(i)) for i in range(2)]
    day1, day2 = day_files(audit_dir)
    assert day1.name == day_file_name(DAY1.date())
    assert day2.name == day_file_name(DAY1.date() + timedelta(days=1))
    assert after[0]["prev"] == before[-1]["hash"]
    assert json.loads(lines_of(day2)[0])["prev"] == json.loads(lines_of(day1)[-1])["hash"]
    result = verify(audit_dir)
    assert result.ok and result.count == 4 and result.files == 2


async def test_one_batch_across_midnight(audit_dir: Path, clock: Clock) -> None:
    async with AuditLog(audit_dir, clock=clock) as log:

        async def one(i: int) -> dict[str, Any]:
            clock.advance(milliseconds=100)  # runs before the writer takes the batch
            return await log.record(call(i))

        records = await asyncio.gather(*(one(i) for i in range(40)))
    assert len(day_files(audit_dir)) == 2
    assert verify(audit_dir).count == 40
    assert [r["hash"] for r in iter_records(audit_dir)] == [r["hash"] for r in records]


async def test_a_clock_stepping_back_keeps_time_in_order(audit_dir: Path, clock: Clock) -> None:
    async with AuditLog(audit_dir, clock=clock) as log:
        clock.advance(seconds=5)  # the next day
        first = await log.record(call(1))
        clock.advance(seconds=-10)  # back to the day before
        second = await log.record(call(2))
    assert second["ts"] >= first["ts"]
    assert len(day_files(audit_dir)) == 1
    assert verify(audit_dir).ok


# -- torn tails ----------------------------------------------------------------------


async def test_a_torn_tail_is_reported_then_set_aside(audit_dir: Path) -> None:
    await write_log(audit_dir, 5)
    (path,) = day_files(audit_dir)
    torn = b'{"credential":"github","event":"attempt","id":"0192'
    with open(path, "ab") as handle:
        handle.write(torn)
    # Before the broker restarts, verify reports it without failing.
    result = verify(audit_dir)
    assert result.ok and result.count == 5
    assert result.unfinished is not None and result.unfinished.line == 6
    assert "incomplete" in result.unfinished.reason

    async with AuditLog(audit_dir) as log:
        (cut,) = log.torn_tails
        assert cut.path.read_bytes() == torn
        assert cut.source == path.name
        assert stat.S_IMODE(cut.path.stat().st_mode) == 0o600
        await log.record(call(6))

    assert path.read_bytes().endswith(b"\n")
    result = verify(audit_dir)
    assert result.ok and result.unfinished is None
    assert [t.path for t in result.torn] == [cut.path]
    assert list_torn_tails(audit_dir) == list(result.torn)
    # The recovery itself is in the chain, between the old records and the new.
    events = [r["event"] for r in iter_records(audit_dir)]
    assert events[5] == "audit_torn_tail" and len(events) == 7
    assert json.loads(lines_of(path)[5])["set_aside"] == cut.path.name


async def test_a_damaged_uncommitted_last_line_is_set_aside(audit_dir: Path) -> None:
    await write_log(audit_dir, 3)
    (path,) = day_files(audit_dir)
    with open(path, "ab") as handle:
        handle.write(b"\0" * 40 + b'"}\n')  # zeros from a half-flushed page
    assert verify(audit_dir).ok
    async with AuditLog(audit_dir) as log:
        assert len(log.torn_tails) == 1
    assert verify(audit_dir).ok


async def test_an_edited_last_record_is_not_mistaken_for_a_torn_tail(audit_dir: Path) -> None:
    await write_log(audit_dir, 3)
    (path,) = day_files(audit_dir)
    lines = lines_of(path)
    lines[-1] = lines[-1].replace(b'"allow"', b'"deny"')
    rewrite(path, lines)
    async with AuditLog(audit_dir) as log:
        assert log.torn_tails == ()
        await log.record(call(4))
    result = verify(audit_dir)
    assert not result.ok and result.bad is not None and result.bad.line == 3


# -- group commit and concurrency -----------------------------------------------------------


@pytest.fixture(params=["loop", "thread"])
def sync_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where fsyncs run: on the event loop (a fast disk) or the audit thread (a slow one)."""
    monkeypatch.setattr(audit_log, "INLINE_SYNC_MAX_SECONDS", float("inf") if request.param == "loop" else -1.0)
    return str(request.param)


async def test_200_concurrent_records_share_fsyncs(audit_dir: Path, sync_on: str) -> None:
    async with AuditLog(audit_dir) as log:
        records = await asyncio.gather(*(log.record(call(i)) for i in range(200)))
        stats = log.stats
    assert [r["path"] for r in records] == [call(i)["path"] for i in range(200)]
    # Chained in call order: the file holds them in the order the calls were made.
    assert list(iter_records(audit_dir)) == records
    result = verify(audit_dir)
    assert result.ok and result.count == 200
    assert stats.records == 200 and stats.batches < 200 and stats.fsyncs == stats.batches
    assert stats.inline_fsyncs == (stats.fsyncs if sync_on == "loop" else 0)


async def test_fsyncs_run_on_the_loop_only_while_the_disk_is_fast(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran_on: list[int] = []
    delay = [0.0]

    def timed(fd: int) -> None:
        ran_on.append(threading.get_ident())
        time.sleep(delay[0])

    loop_thread = threading.get_ident()
    monkeypatch.setattr(audit_store, "_datasync", timed)
    async with AuditLog(audit_dir) as log:
        await log.record(call(0))
        assert ran_on[-1] != loop_thread  # not known to be fast yet: the thread
        for i in range(10):
            await log.record(call(1 + i))
        assert ran_on[-1] == loop_thread  # fast: on the loop, no thread hand-off
        delay[0] = 0.01  # slow, but not alarming
        for i in range(4):
            await log.record(call(20 + i))
        assert ran_on[-1] != loop_thread  # slow: the loop is not blocked
        delay[0] = 0.0
        for i in range(20):
            await log.record(call(30 + i))
        assert ran_on[-1] == loop_thread  # fast again: back on the loop
        delay[0] = 0.1  # one fsync on the loop that stalls it: never again
        await log.record(call(60))
        delay[0] = 0.0
        for i in range(20):
            await log.record(call(70 + i))
        assert ran_on[-1] != loop_thread
    assert verify(audit_dir).count == 56


async def test_verify_while_records_are_being_written(audit_dir: Path) -> None:
    async with AuditLog(audit_dir) as log:
        await log.record(call(0))
        stop = False

        async def writer() -> None:
            n = 0
            while not stop:
                await asyncio.gather(*(log.record(call(n + i, reason="r" * 2000)) for i in range(32)))
                n += 32

        task = asyncio.create_task(writer())
        try:
            results = [await asyncio.to_thread(verify, audit_dir) for _ in range(20)]
        finally:
            stop = True
            await task
    assert all(r.ok for r in results), [r.bad for r in results if not r.ok]
    assert verify(audit_dir).unfinished is None


async def test_a_second_writer_is_refused(audit_dir: Path) -> None:
    async with AuditLog(audit_dir):
        with pytest.raises(AuditError, match="in use"):
            await AuditLog(audit_dir).open()


async def test_record_needs_an_open_log(audit_dir: Path) -> None:
    log = AuditLog(audit_dir)
    with pytest.raises(AuditError):
        await log.record(call(1))
    await log.open()
    await log.close()
    with pytest.raises(AuditError):
        await log.record(call(1))


# -- fail closed ---------------------------------------------------------------------


async def test_a_record_that_cannot_be_written_fails_closed(audit_dir: Path) -> None:
    async with AuditLog(audit_dir) as log:
        await log.record(call(0))
        (path,) = day_files(audit_dir)
        # Root ignores permissions, so take the file away and put a folder there.
        path.unlink()
        path.mkdir()
        results = await asyncio.gather(*(log.record(call(i)) for i in range(20)), return_exceptions=True)
        assert all(isinstance(r, AuditError) for r in results), results
        # Once the path is usable again the log writes again, and the lost
        # record shows as a break instead of being hidden.
        path.rmdir()
        rec = await log.record(call(99))
    assert rec["path"].endswith("/99")
    result = verify(audit_dir)
    assert not result.ok and result.bad is not None and result.bad.line == 1


async def test_a_new_day_that_cannot_be_written_fails_closed(audit_dir: Path, clock: Clock) -> None:
    async with AuditLog(audit_dir, clock=clock) as log:
        await log.record(call(0))
        (audit_dir / day_file_name(DAY1.date() + timedelta(days=1))).mkdir()
        clock.advance(seconds=5)
        with pytest.raises(AuditError):
            await log.record(call(1))
    assert verify(audit_dir).count == 1


async def test_a_batch_across_midnight_keeps_the_part_that_was_written(audit_dir: Path, clock: Clock) -> None:
    (audit_dir / day_file_name(DAY1.date() + timedelta(days=1))).mkdir(parents=True)
    async with AuditLog(audit_dir, clock=clock) as log:

        async def one(i: int) -> dict[str, Any]:
            clock.advance(milliseconds=100)
            return await log.record(call(i))

        results = await asyncio.gather(*(one(i) for i in range(40)), return_exceptions=True)
        written = [r for r in results if isinstance(r, dict)]
        assert written and all(isinstance(r, AuditError) for r in results[len(written) :])
        assert all(r["ts"].startswith(DAY1.date().isoformat()) for r in written)
        assert log.head == written[-1]["hash"]
    result = verify(audit_dir)
    assert result.ok and result.count == len(written)


# -- durable=False: written before the call returns, fsynced with the next batch ---------------


def _head_hash(audit_dir: Path) -> str:
    return (audit_dir / "audit.head").read_bytes().split()[0].decode()


async def test_a_record_not_waiting_for_fsync_is_in_the_file_when_the_call_returns(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_log, "LAZY_SYNC_SECONDS", 30.0)  # no fsync of its own during the test
    async with AuditLog(audit_dir) as log:
        attempt = await log.record(call(1))
        fsyncs = log.stats.fsyncs
        outcome = await log.record({"event": "outcome", "attempt": attempt["id"], "status": 200}, durable=False)
        # In the file (write(2) done: a crash of this process keeps it), chained
        # after the attempt, but not fsynced yet: the head still names the attempt.
        assert list(iter_records(audit_dir)) == [attempt, outcome]
        assert outcome["prev"] == attempt["hash"]
        assert log.stats.fsyncs == fsyncs and log.head == attempt["hash"]
        assert _head_hash(audit_dir) == attempt["hash"]
        # The next durable record shares one fsync with it (group commit).
        nxt = await log.record(call(2))
        assert log.stats.fsyncs == fsyncs + 1
        assert log.head == nxt["hash"] and _head_hash(audit_dir) == nxt["hash"]
    result = verify(audit_dir)
    assert result.ok and result.count == 3 and result.unfinished is None


async def test_a_record_not_waiting_for_fsync_is_fsynced_soon_on_its_own(audit_dir: Path) -> None:
    async with AuditLog(audit_dir) as log:
        await log.record(call(1))
        outcome = await log.record({"event": "outcome", "status": 200}, durable=False)
        deadline = time.monotonic() + 5
        while log.head != outcome["hash"] and time.monotonic() < deadline:
            await asyncio.sleep(audit_log.LAZY_SYNC_SECONDS)
        assert log.head == outcome["hash"] and _head_hash(audit_dir) == outcome["hash"]


async def test_close_fsyncs_records_not_yet_fsynced(audit_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_log, "LAZY_SYNC_SECONDS", 30.0)
    async with AuditLog(audit_dir) as log:
        await log.record(call(1))
        outcome = await log.record({"event": "outcome", "status": 200}, durable=False)
    assert _head_hash(audit_dir) == outcome["hash"]
    assert verify(audit_dir).count == 2


async def test_subscribers_get_records_not_waiting_for_fsync_once_fsynced(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_log, "LAZY_SYNC_SECONDS", 30.0)
    seen: list[dict[str, Any]] = []
    async with AuditLog(audit_dir) as log:
        log.subscribe(seen.append)
        first = await log.record(call(1))
        outcome = await log.record({"event": "outcome", "status": 200}, durable=False)
        assert seen == [first]
        last = await log.record(call(2))
        assert seen == [first, outcome, last]


async def test_a_write_that_fails_fails_closed_without_waiting_for_fsync(audit_dir: Path) -> None:
    async with AuditLog(audit_dir) as log:
        await log.record(call(0))
        (path,) = day_files(audit_dir)
        path.unlink()
        path.mkdir()
        with pytest.raises(AuditError):
            await log.record({"event": "outcome", "status": 200}, durable=False)
        results = await asyncio.gather(
            *(log.record(call(i), durable=i % 2 == 0) for i in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, AuditError) for r in results), results
        path.rmdir()
        rec = await log.record(call(99), durable=False)
    assert rec["path"].endswith("/99")


async def test_a_record_that_is_not_json_is_refused_and_the_chain_goes_on(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AuditLog(audit_dir) as log:
        first = await log.record(call(0))
        with pytest.raises(AuditError, match="not JSON-serialisable"):
            await log.record({"event": "odd", "value": object()}, durable=False)
        # The same on the writer task's path (taken when the file must be reopened first).
        monkeypatch.setattr(log._store, "writable", lambda day: None)
        together = await asyncio.gather(
            log.record(call(1)),
            log.record({"event": "odd", "value": {1, 2}}),
            log.record(call(2)),
            return_exceptions=True,
        )
        monkeypatch.undo()
        assert isinstance(together[1], AuditError)
        last = await log.record(call(3))
    assert [r["id"] for r in iter_records(audit_dir)] == [first["id"], together[0]["id"], together[2]["id"], last["id"]]
    assert last["prev"] == together[2]["hash"] and first["hash"] == together[0]["prev"]
    assert verify(audit_dir).ok


def _no_space(fd: int, data: bytes) -> None:
    raise OSError(28, "No space left on device")


async def test_a_failed_write_of_a_record_fsynced_in_the_call_fails_closed(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_log, "INLINE_SYNC_MAX_SECONDS", float("inf"))  # fsync inside record()
    real = audit_store._write_all
    async with AuditLog(audit_dir) as log:
        first = await log.record(call(0), batch=False)
        monkeypatch.setattr(audit_store, "_write_all", _no_space)
        with pytest.raises(AuditError, match="No space left"):
            await log.record(call(1), batch=False)
        monkeypatch.setattr(audit_store, "_write_all", real)
        last = await log.record(call(2), batch=False)
    assert [r["id"] for r in iter_records(audit_dir)] == [first["id"], last["id"]]
    assert verify(audit_dir).ok


async def test_a_failed_write_does_not_stop_later_records_being_fsynced_on_their_own(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = audit_store._write_all
    async with AuditLog(audit_dir) as log:
        await log.record(call(0))
        monkeypatch.setattr(audit_store, "_write_all", _no_space)
        with pytest.raises(AuditError, match="No space left"):
            await log.record({"event": "outcome", "status": 200}, durable=False)
        monkeypatch.setattr(audit_store, "_write_all", real)
        await asyncio.sleep(audit_log.LAZY_SYNC_SECONDS * 4)
        outcome = await log.record({"event": "outcome", "status": 200}, durable=False)
        deadline = time.monotonic() + 5
        while log.head != outcome["hash"] and time.monotonic() < deadline:
            await asyncio.sleep(audit_log.LAZY_SYNC_SECONDS)
        assert log.head == outcome["hash"] and _head_hash(audit_dir) == outcome["hash"]


async def test_a_failed_fsync_fails_the_waiting_call_and_keeps_the_chain_whole(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch, sync_on: str
) -> None:
    monkeypatch.setattr(audit_log, "LAZY_SYNC_SECONDS", 30.0)
    real = audit_store._datasync

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    async with AuditLog(audit_dir) as log:
        first = await log.record(call(1))
        monkeypatch.setattr(audit_store, "_datasync", broken)
        await log.record({"event": "outcome", "status": 200}, durable=False)
        with pytest.raises(AuditError, match="Input/output error"):
            await log.record(call(2))
        monkeypatch.setattr(audit_store, "_datasync", real)
        last = await log.record(call(3))
        assert log.stats.failures == 1
    # What the failed fsync covered was cut, and the chain goes on from the
    # last durable record: nothing unverifiable is left behind.
    assert [r["id"] for r in iter_records(audit_dir)] == [first["id"], last["id"]]
    assert last["prev"] == first["hash"]
    result = verify(audit_dir)
    assert result.ok and result.count == 2


async def test_opening_where_the_folder_cannot_be_made_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AuditError):
        await AuditLog(blocker / "audit").open()


# -- subscription ------------------------------------------------------------------------


async def test_subscribers_get_records_once_written(audit_dir: Path) -> None:
    seen: list[dict[str, Any]] = []
    on_disk: list[bool] = []

    def watcher(rec: dict[str, Any]) -> None:
        seen.append(rec)
        on_disk.append(any(r["id"] == rec["id"] for r in iter_records(audit_dir)))

    def broken(rec: dict[str, Any]) -> None:
        raise RuntimeError("a buggy pane")

    async with AuditLog(audit_dir) as log:
        log.subscribe(broken)
        unsubscribe = log.subscribe(watcher)
        records = await asyncio.gather(*(log.record(call(i)) for i in range(10)))
        unsubscribe()
        await log.record(call(11))
    assert seen == records and all(on_disk)


# -- kill -9 ---------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from pathlib import Path
    from broker.audit import AuditLog

    audit_dir, mode = Path(sys.argv[1]), sys.argv[2]
    real_write = os.write
    slow = False

    def torn_write(fd, data):
        # Part of a write (a batch or one record), then a long stall: the parent
        # kills us in between, which is what a crash in the middle of a write
        # leaves behind.
        if not slow or not bytes(data).endswith(b"\\n"):
            return real_write(fd, data)
        written = real_write(fd, data[: len(data) // 2])
        time.sleep(60)
        return written

    os.write = torn_write

    async def main():
        global slow
        async with AuditLog(audit_dir) as log:
            async def one(n):
                rec = await log.record({"event": "attempt", "tenant": "acme", "n": n,
                                        "reason": "x" * 300}, durable=mode != "lazy")
                sys.stdout.write(rec["id"] + "\\n")
                sys.stdout.flush()
            n = 0
            while True:
                await asyncio.gather(*(one(n + i) for i in range(200)))
                n += 200
                if mode == "torn" and n >= 400:
                    slow = True

    asyncio.run(main())
    """
)


def run_writer(audit_dir: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(audit_dir), mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Any, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def acked_ids(proc: subprocess.Popen[str]) -> set[str]:
    out, _ = proc.communicate(timeout=30)
    lines = out.splitlines()
    # The last line may itself have been cut by the kill.
    return {line for line in lines if len(line) == 24}


def live_file_torn(audit_dir: Path) -> bool:
    files = day_files(audit_dir)
    if not files:
        return False
    data = files[-1].read_bytes()
    return data.count(b"\n") >= 400 and not data.endswith(b"\n")


@pytest.mark.timeout(120)
async def test_kill_9_mid_write_leaves_a_verifiable_chain_and_a_reported_torn_tail(
    audit_dir: Path,
) -> None:
    proc = run_writer(audit_dir, "torn")
    try:
        wait_for(lambda: live_file_torn(audit_dir), "a half-written batch")
    finally:
        proc.send_signal(signal.SIGKILL)
    acked = acked_ids(proc)
    assert proc.returncode == -signal.SIGKILL

    result = verify(audit_dir)
    assert result.ok, result.bad
    assert result.unfinished is not None
    assert result.count >= len(acked) >= 400

    async with AuditLog(audit_dir) as log:
        (cut,) = log.torn_tails
        await log.record(call(1))
    result = verify(audit_dir)
    assert result.ok and result.unfinished is None
    assert [t.path for t in result.torn] == [cut.path]
    # Every record the writer was told is written is still there.
    assert acked <= {r["id"] for r in iter_records(audit_dir)}
    assert cmd_audit.run_verify(argparse.Namespace()) == 0


@pytest.mark.timeout(120)
async def test_kill_9_at_any_moment_keeps_every_acknowledged_record(audit_dir: Path) -> None:
    proc = run_writer(audit_dir, "plain")
    try:
        wait_for(lambda: verify(audit_dir).count >= 1000, "a thousand records")
    finally:
        proc.send_signal(signal.SIGKILL)
    acked = acked_ids(proc)
    result = verify(audit_dir)
    assert result.ok, result.bad
    assert acked <= {r["id"] for r in iter_records(audit_dir)}
    async with AuditLog(audit_dir) as log:
        await log.record(call(1))
    assert verify(audit_dir).ok


@pytest.mark.timeout(120)
async def test_kill_9_keeps_every_record_written_without_waiting_for_fsync(audit_dir: Path) -> None:
    proc = run_writer(audit_dir, "lazy")
    try:
        wait_for(lambda: verify(audit_dir).count >= 1000, "a thousand records")
    finally:
        proc.send_signal(signal.SIGKILL)
    acked = acked_ids(proc)
    result = verify(audit_dir)
    assert result.ok, result.bad
    # Returned after write(2), before the fsync: a crash of the process keeps them.
    assert len(acked) >= 1000 and acked <= {r["id"] for r in iter_records(audit_dir)}
    async with AuditLog(audit_dir) as log:
        await log.record(call(1))
    assert verify(audit_dir).ok


# -- follow ---------------------------------------------------------------------------------


def test_follow_reads_new_records_across_days(audit_dir: Path) -> None:
    clock = Clock()
    asyncio.run(write_log(audit_dir, 2, clock))
    stop = threading.Event()
    seen: list[dict[str, Any]] = []

    def consume() -> None:
        for rec in follow(audit_dir, poll_interval=0.01, stop=stop.is_set):
            seen.append(rec)

    reader = threading.Thread(target=consume)
    reader.start()
    try:
        time.sleep(0.1)  # let the reader settle at the current end

        async def more() -> list[dict[str, Any]]:
            async with AuditLog(audit_dir, clock=clock) as log:
                out = [await log.record(call(10))]
                clock.advance(seconds=5)
                out.append(await log.record(call(11)))
                return out

        written = asyncio.run(more())
        wait_for(lambda: len(seen) >= 2, "followed records", limit=20)
    finally:
        stop.set()
        reader.join()
    assert seen == written
    assert len(day_files(audit_dir)) == 2


def test_follow_from_start_reads_everything(audit_dir: Path, clock: Clock) -> None:
    async def write() -> None:
        async with AuditLog(audit_dir, clock=clock) as log:
            await log.record(call(1))
            clock.advance(days=1)
            await log.record(call(2))

    asyncio.run(write())
    found: list[dict[str, Any]] = []
    for rec in follow(audit_dir, from_start=True, poll_interval=0.01, stop=lambda: len(found) >= 2):
        found.append(rec)
    assert [r["path"] for r in found] == [call(1)["path"], call(2)["path"]]


def test_follow_with_a_backlog(audit_dir: Path, clock: Clock) -> None:
    async def write() -> None:
        async with AuditLog(audit_dir, clock=clock) as log:
            for i in range(3):
                await log.record(call(i))
            clock.advance(days=1)
            for i in range(3, 5):
                await log.record(call(i))

    asyncio.run(write())
    found: list[dict[str, Any]] = []
    for rec in follow(audit_dir, backlog=4, poll_interval=0.01, stop=lambda: len(found) >= 4):
        found.append(rec)
    assert [r["path"] for r in found] == [call(i)["path"] for i in range(1, 5)]


# -- the commands -----------------------------------------------------------------------------


def ns(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"follow": False, "json": False, "lines": 20, **kw})


async def test_cli_verify_ok(audit_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await write_log(audit_dir, 3)
    assert cmd_audit.run_verify(ns()) == 0
    assert "audit chain OK: 3 records in 1 file" in capsys.readouterr().out


async def test_cli_verify_broken(audit_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = await write_log(audit_dir, 3)
    (path,) = day_files(audit_dir)
    lines = lines_of(path)
    rewrite(path, [lines[0], lines[2]])
    assert cmd_audit.run_verify(ns()) == 1
    err = capsys.readouterr().err
    assert f"{path}:2" in err and records[2]["id"] in err and "deleted" in err


async def test_cli_verify_names_a_torn_tail(audit_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await write_log(audit_dir, 2)
    with open(day_files(audit_dir)[0], "ab") as handle:
        handle.write(b'{"half":')
    await write_log(audit_dir, 1)
    assert cmd_audit.run_verify(ns()) == 0
    out = capsys.readouterr().out
    assert "torn tail set aside at " in out and ".torn-" in out
    assert "audit chain OK: 4 records" in out


def test_cli_verify_on_an_empty_home(capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_audit.run_verify(ns()) == 0
    assert "audit chain OK: 0 records in 0 files" in capsys.readouterr().out


def test_cli_errors_are_one_sentence(audit_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audit_dir.parent.mkdir(parents=True)
    audit_dir.write_text("a file where the folder should be")
    assert cmd_audit.run_verify(ns()) == 2
    err = capsys.readouterr().err
    assert err.startswith("outloop: ") and "Traceback" not in err and err.count("\n") == 1


async def test_cli_tail(audit_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with AuditLog(audit_dir) as log:
        for i in range(5):
            attempt = await log.record(call(i))
        await log.record(
            {
                "event": "outcome",
                "attempt": attempt["id"],
                "tenant": "acme",
                "credential": "github",
                "method": "GET",
                "path": "/repos/x\x1b[31m",
                "decision": "allow",
                "status": 200,
                "bytes": 512,
                "ms": 12,
            }
        )
    assert cmd_audit.run_tail(ns(lines=2)) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert "acme" in out[0] and "github" in out[0] and "/repos/acme/web/issues/4" in out[0]
    assert "200" in out[1] and "12ms" in out[1] and "allow" in out[1]
    assert "\x1b" not in out[1] and "\\x1b" in out[1]

    assert cmd_audit.run_tail(ns(lines=3, json=True)) == 0
    raw = capsys.readouterr().out
    (path,) = day_files(audit_dir)
    assert raw.encode() == b"".join(lines_of(path)[-3:])


def test_cli_tail_follow_stops_quietly_on_ctrl_c(audit_dir: Path) -> None:
    asyncio.run(write_log(audit_dir, 1))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, argparse; from outloop_tui.cmd_audit import run_tail; "
            "sys.exit(run_tail(argparse.Namespace(follow=True, json=True, lines=5)))",
        ],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A suite started in the background inherits SIGINT ignored, and Python keeps an
        # ignored SIGINT ignored: give the child the default a terminal user has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    asyncio.run(write_log(audit_dir, 1))
    second = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == ""
    ids = [json.loads(line)["id"] for line in (first, second)]
    assert ids == [r["id"] for r in iter_records(audit_dir)]


def test_cmd_audit_does_not_import_textual() -> None:
    code = (
        "import sys, outloop_tui.cmd_audit, broker.audit; "
        "sys.exit(1 if any(m.startswith('textual') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
