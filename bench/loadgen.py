"""A lean HTTP/1.1 load generator: N keep-alive connections, one fixed request each.

    python bench/loadgen.py (--unix PATH | --tcp HOST:PORT) --request FILE
                            [--clients 32] [--seconds 5]

Run as its own process. Each connection sends the same pre-built request bytes
(read from FILE, a whole HTTP/1.1 request) and reads the answer, framed by
Content-Length only, then sends the next: a closed loop, one call in flight per
connection. It prints one JSON line: calls, seconds, calls/s, and the number of
answers that were not `200`. The client's own cost per call is a few tens of
microseconds, so what a run measures is the server, not the client (an httpx2
client costs ~0.5 ms of CPU per call, as much as the broker it would measure).
Bench use only: it trusts the server to send Content-Length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


async def _client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, stop: float, counts: dict[str, int]
) -> None:
    while time.monotonic() < stop:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        counts["calls"] += 1
        if not head.startswith(b"HTTP/1.1 200 "):
            counts["not_ok"] += 1
    writer.close()


async def run(target: str, unix: bool, request: bytes, clients: int, seconds: float) -> dict[str, float]:
    conns = []
    for _ in range(clients):
        if unix:
            conns.append(await asyncio.open_unix_connection(target))
        else:
            host, _, port = target.rpartition(":")
            conns.append(await asyncio.open_connection(host, int(port)))
    counts = {"calls": 0, "not_ok": 0}
    start = time.perf_counter()
    stop = time.monotonic() + seconds
    await asyncio.gather(*(_client(r, w, request, stop, counts) for r, w in conns))
    elapsed = time.perf_counter() - start
    return {
        "calls": counts["calls"],
        "seconds": elapsed,
        "per_second": counts["calls"] / elapsed,
        "not_ok": counts["not_ok"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="PATH")
    where.add_argument("--tcp", metavar="HOST:PORT")
    parser.add_argument("--request", required=True, metavar="FILE")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with open(args.request, "rb") as f:
        request = f.read()
    result = asyncio.run(run(args.unix or args.tcp, bool(args.unix), request, args.clients, args.seconds))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
