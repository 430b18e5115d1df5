"""A server-sent-event stream through the broker against the same stream direct, side by side.

    .venv/bin/python bench/stream.py [--seconds 30] [--interval-ms 100] [--streams 50]

One throw-away home (bench/broker.py's bench_world: a private Secret Service,
tenant "bench", `outloop broker`), plus an SSE upstream in its own process
(this file with --upstream): GET /sse?n=N&ms=M sends N events M ms apart, each
carrying the upstream's CLOCK_MONOTONIC time at sending (one clock for every
process on the machine).

1. One stream direct and one through /v1/proxy, at the same time: time to first
   byte of each, and for every event the delay from the upstream's send to its
   arrival, direct and brokered (p50, p99, max), and the differences.
2. Memory: the broker's RSS with `--streams` streams open at once (each in the
   middle of its answer) against its RSS before, per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psutil

_spec = importlib.util.spec_from_file_location("bench_broker", Path(__file__).resolve().parent / "broker.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_broker"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)

SSE_SECRET = "sk-bench-sse-0123456789abcdefghijklmnop"
DUMMY = {"Authorization": "Bearer dummy"}  # what an SDK sends; the broker puts the key on


# -- the upstream ---------------------------------------------------------------------


async def _serve_sse() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                query = dict(p.split("=", 1) for p in target.partition("?")[2].split("&") if "=" in p)
                n, ms = int(query.get("n", "10")), float(query.get("ms", "100"))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                for i in range(n):
                    event = json.dumps({"i": i, "sent": time.monotonic(), "text": "token " * 8})
                    data = f"data: {event}\n\n".encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                    await asyncio.sleep(ms / 1000)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


# -- the clients ----------------------------------------------------------------------


def read_stream(client: httpx.Client, url: str, out: dict[str, Any]) -> None:
    """Read one SSE stream; record time to first byte and each event's delay (ms)."""
    start = time.monotonic()
    delays: list[float] = []
    buf = b""
    with client.stream("GET", url, headers=DUMMY) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for piece in r.iter_raw():
            now = time.monotonic()
            out.setdefault("ttfb", (now - start) * 1000)
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"data: "):
                    delays.append((now - json.loads(event[6:])["sent"]) * 1000)
    out["delays"] = delays


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval-ms", type=float, default=100.0)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        asyncio.run(_serve_sse())
        return 0
    sse = subprocess.Popen([sys.executable, __file__, "--upstream"], stdout=subprocess.PIPE)
    try:
        assert sse.stdout is not None
        port = int(sse.stdout.readline())
        with bench.bench_world("olst-") as world:
            bench._outloop(
                world.env,
                *("credential", "add", "bench", "sse", "--base-url", f"http://127.0.0.1:{port}"),
                *("--allow", "GET /**"),
                stdin=SSE_SECRET + "\n",
            )
            return measure(world, port, args)
    finally:
        sse.terminate()
        sse.wait(10)


def measure(world: Any, port: int, args: argparse.Namespace) -> int:
    """`world`: bench/broker.py's BenchWorld (that module is loaded by path)."""
    os.chdir(world.workspace)  # the broker maps the caller by its folder
    sock: str = world.sock
    brokered = httpx.Client(
        transport=httpx.HTTPTransport(uds=sock),
        base_url="http://outloop",
        trust_env=False,
        timeout=120,
    )
    direct = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=120)
    deadline = time.monotonic() + 20
    while brokered.get("/v1/proxy/sse/sse?n=1&ms=0").status_code != 200:  # the broker reads the new config
        if time.monotonic() > deadline:
            raise SystemExit("the broker never served the sse credential")
        time.sleep(0.2)
    n = int(args.seconds * 1000 / args.interval_ms)
    query = f"/sse?n={n}&ms={args.interval_ms:g}"
    results: dict[str, dict[str, Any]] = {"direct": {}, "broker": {}}
    threads = [
        threading.Thread(target=read_stream, args=(direct, query, results["direct"])),
        threading.Thread(target=read_stream, args=(brokered, f"/v1/proxy/sse{query}", results["broker"])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    d_ttfb, b_ttfb = float(results["direct"]["ttfb"]), float(results["broker"]["ttfb"])
    dd: list[float] = results["direct"]["delays"]
    bd: list[float] = results["broker"]["delays"]
    assert len(dd) == len(bd) == n
    added = [x - y for x, y in zip(bd, dd, strict=True)]
    print(f"outloop stream bench: {n} events {args.interval_ms:g} ms apart, direct and brokered at once")
    print("                       direct    broker     added")
    print(f"  first byte ms       {d_ttfb:8.2f}  {b_ttfb:8.2f}  {b_ttfb - d_ttfb:+8.2f}")
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        print(f"  event delay {name} ms {pct(dd, q):8.2f}  {pct(bd, q):8.2f}  {pct(bd, q) - pct(dd, q):+8.2f}")
    print(f"  event delay max ms  {max(dd):8.2f}  {max(bd):8.2f}  {max(bd) - max(dd):+8.2f}")
    print(f"  per event, broker minus direct: median {statistics.median(added):+.2f} ms, worst {max(added):+.2f} ms")
    met = max(added) <= 10 and b_ttfb - d_ttfb <= 10
    print(f"  goal: first byte and every event within 10 ms of direct: {'met' if met else 'NOT met'}")

    # 2. memory per concurrent stream
    proc = psutil.Process(world.broker.pid)
    before = proc.memory_info().rss
    with contextlib.ExitStack() as open_streams:
        for _ in range(args.streams):
            client = open_streams.enter_context(
                httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://outloop", trust_env=False)
            )
            r = open_streams.enter_context(client.stream("GET", "/v1/proxy/sse/sse?n=100000&ms=200", headers=DUMMY))
            next(r.iter_raw())  # the stream is under way
        time.sleep(1.0)
        during = proc.memory_info().rss
    per = (during - before) / args.streams / 1024
    print(f"  broker RSS {before / 2**20:.1f} MiB idle, {during / 2**20:.1f} MiB with {args.streams} streams open")
    print(f"  memory per concurrent stream: {per:.1f} KiB (goal: holdback <= 64 KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
