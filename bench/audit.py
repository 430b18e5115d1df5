"""Audit log throughput: group commit against one fsync per record, in one invocation.

    /work/venv/bin/python bench/audit.py [--records 20000] [--clients 32] [--dir PATH]

Every variant writes the same broker-like records, chained and hashed the same
way, to a fresh folder on disk (by default a temp folder; pass --dir to measure
another filesystem), and every record is on disk (fdatasync) before its caller
gets it back:

1. naive, sequential: one plain loop, write + fdatasync per record; the fastest a
   one-fsync-per-record design can be, with no asyncio cost at all;
2. naive, N clients: N asyncio tasks sharing a lock, each record written and
   fdatasync'd on its own in a thread (what "just fsync in to_thread" gives);
3. AuditLog, N clients: group commit, one fsync per batch;
4. AuditLog, 1 client: the latency one caller sees (p50/p99 of record()).
5. and 6.: the same two sealed with HMAC-SHA-256 under an audit key (what the
   broker writes), interleaved with the plain SHA-256 runs; and the cost of
   sealing one record alone (canonical JSON + digest), SHA-256 against HMAC.

Ratios are against the naive variants of the same run. The broker writes two
records per call (attempt, outcome), so calls/s it can audit is half of records/s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.audit import GENESIS, AuditKey, AuditLog, canonical_json, format_ts, verify  # noqa: E402
from broker.audit.chain import _seal  # noqa: E402


def fields(n: int) -> dict[str, Any]:
    return {
        "event": "attempt" if n % 2 == 0 else "outcome",
        "tenant": "acme",
        "workspace": "/home/op/clients/acme/web",
        "pid": 4242,
        "exe": "/usr/bin/node",
        "credential": "github",
        "method": "GET",
        "host": "api.github.com",
        "path": f"/repos/acme/web/issues/{n}",
        "decision": "allow",
        "reason": "list open issues for the sprint review",
        "approver": None,
        "status": 200 if n % 2 else None,
        "bytes": 1834 if n % 2 else None,
        "ms": 41 if n % 2 else None,
    }


class NaiveLog:
    """One write and one fdatasync per record, same chain format as AuditLog."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, parents=True)
        self.fd = os.open(folder / "audit-naive.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.head = GENESIS
        self.count = 0

    def record(self, data: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        rec = {"ts": format_ts(_now()), "id": f"{self.count:024x}", **data, "prev": self.head}
        canon = canonical_json(rec)
        rec["hash"] = hashlib.sha256(self.head.encode() + canon).hexdigest()
        os.write(self.fd, canon[:-1] + b',"hash":"' + rec["hash"].encode() + b'"}\n')
        os.fdatasync(self.fd)
        self.head = rec["hash"]
        return rec

    def close(self) -> None:
        os.close(self.fd)


def _now() -> datetime:
    return datetime.now(UTC)


def naive_sequential(folder: Path, total: int) -> float:
    log = NaiveLog(folder)
    start = time.perf_counter()
    for n in range(total):
        log.record(fields(n))
    elapsed = time.perf_counter() - start
    log.close()
    return total / elapsed


async def naive_concurrent(folder: Path, total: int, clients: int) -> float:
    log = NaiveLog(folder)
    lock = asyncio.Lock()
    per_client = total // clients

    async def client(c: int) -> None:
        for i in range(per_client):
            async with lock:
                await asyncio.to_thread(log.record, fields(c * per_client + i))

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - start
    log.close()
    return per_client * clients / elapsed


async def group_commit(
    folder: Path, total: int, clients: int, key: AuditKey | None = None
) -> tuple[float, str, list[float]]:
    per_client = total // clients
    latencies: list[float] = []
    async with AuditLog(folder, key=key) as log:

        async def client(c: int) -> None:
            for i in range(per_client):
                t0 = time.perf_counter()
                await log.record(fields(c * per_client + i))
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
        stats = log.stats
    result = verify(folder, key)
    assert result.ok and result.count == per_client * clients + (key is not None), result
    mean_batch = stats.records / max(1, stats.batches)
    summary = (
        f"{stats.batches} batches, {stats.fsyncs} fsyncs, mean batch {mean_batch:.1f}, largest {stats.largest_batch}"
    )
    return per_client * clients / elapsed, summary, latencies


def seal_cost(key: AuditKey | None, rounds: int = 20000) -> float:
    """Microseconds to seal one broker-like record (canonical JSON and its digest)."""
    prev = GENESIS
    start = time.perf_counter()
    for n in range(rounds):
        rec = {"ts": "2025-01-02T03:04:05.678Z", "id": f"{n:024x}", **fields(n)}
        _seal(rec, prev, n + 1, key)
        prev = rec["hash"]
    return (time.perf_counter() - start) / rounds * 1e6


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--dir", type=Path, default=None, help="folder to write in (default: a temp folder)")
    args = parser.parse_args()
    total, clients = args.records, args.clients
    base = Path(tempfile.mkdtemp(prefix="outloop-bench-audit-", dir=args.dir))
    print(f"writing under {base} ({total} records per variant, {clients} clients)")

    try:
        naive_seq = naive_sequential(base / "naive-seq", total)
        naive_conc = asyncio.run(naive_concurrent(base / "naive-conc", total, clients))
        key = AuditKey.generate()
        grouped, summary, lat = asyncio.run(group_commit(base / "group", total, clients))
        grouped_h, _, lat_h = asyncio.run(group_commit(base / "group-hmac", total, clients, key))
        single, _, lat1 = asyncio.run(group_commit(base / "single", min(total, 3000), 1))
        single_h, _, lat1_h = asyncio.run(group_commit(base / "single-hmac", min(total, 3000), 1, key))
        seal_sha = min(seal_cost(None) for _ in range(3))
        seal_hmac = min(seal_cost(key) for _ in range(3))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = [
        ("naive, sequential, fsync per record", naive_seq),
        (f"naive, {clients} clients, fsync per record", naive_conc),
        (f"AuditLog, {clients} clients, group commit", grouped),
        ("AuditLog, 1 client", single),
        (f"AuditLog HMAC, {clients} clients", grouped_h),
        ("AuditLog HMAC, 1 client", single_h),
    ]
    for label, rate in rows:
        print(f"{label:<42} {rate:9.0f} records/s")
    print(f"  group commit: {summary}")
    print(f"  record() latency, {clients} clients: p50 {pct(lat, 0.5):.2f} ms, p99 {pct(lat, 0.99):.2f} ms")
    print(f"  record() latency, 1 client: p50 {pct(lat1, 0.5):.2f} ms, p99 {pct(lat1, 0.99):.2f} ms")
    print(f"  HMAC record() latency, 1 client: p50 {pct(lat1_h, 0.5):.2f} ms, p99 {pct(lat1_h, 0.99):.2f} ms")
    print(f"  HMAC record() latency, {clients} clients: p50 {pct(lat_h, 0.5):.2f} ms, p99 {pct(lat_h, 0.99):.2f} ms")
    extra = seal_hmac - seal_sha
    print(f"sealing one record: SHA-256 {seal_sha:.2f} us, HMAC-SHA-256 {seal_hmac:.2f} us (+{extra:.2f} us)")
    print(f"HMAC / SHA-256 records/s: {clients} clients {grouped_h / grouped:.2f}x, 1 client {single_h / single:.2f}x")
    print(f"group commit / naive sequential:       {grouped / naive_seq:5.1f}x")
    print(f"group commit / naive {clients} clients:       {grouped / naive_conc:5.1f}x")
    print(f"broker calls/s the audit sustains at {clients} clients (2 records per call): {grouped / 2:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
