"""Key-to-screen latency with the dashboard attached over the operator channel, against embedded.

    python bench/attach.py [--seconds S] [--rate N]

Both runs get the same load: N audit records a second (default 1,000) written
through the broker's real audit log, so each reaches the dashboard the way a
call's records do. Embedded, the broker runs on the dashboard's own loop;
attached, it runs in another thread with its own loop (as `outloop broker` runs
in another process) and the dashboard is a RemoteEngine on the operator socket.
A key (`tab`) is posted as the terminal driver posts it and timed until a frame
is drawn with the focus moved (bench/tui.py's method). Printed: p50 and max key
latency for each, the ratio attached/embedded, and how many records reached the
audit pane.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # bench/broker.py shadows broker

import keyring  # noqa: E402

from broker.engine import Engine  # noqa: E402
from broker.operator.client import RemoteEngine  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_tui", HERE / "tui.py")
assert _spec is not None and _spec.loader is not None
tui = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tui)


def audit_fields(i: int) -> dict[str, Any]:
    fields = tui.record(i)
    for reserved in ("ts", "id"):
        fields.pop(reserved)
    return fields


async def feed(engine: Engine, rate: int, seconds: float) -> int:
    """Write `rate` records a second through the engine's audit log for `seconds`."""
    loop = asyncio.get_running_loop()
    start, sent = loop.time(), 0
    while (now := loop.time() - start) < seconds:
        for i in range(sent, int(rate * now)):
            await engine.audit.record(audit_fields(i), durable=False)
            sent += 1
        await asyncio.sleep(0.01)
    return sent


async def measure(app: Any, feeding: asyncio.Future[int] | Any) -> list[float]:
    latencies: list[float] = []
    await asyncio.sleep(0.3)
    while not feeding.done():
        latencies.append(await tui.key_latency(app))
        await asyncio.sleep(0.15)
    return latencies


async def embedded(paths: Any, rate: int, seconds: float) -> tuple[list[float], int, int]:
    engine = Engine(paths)
    app = tui.RenderingApp(engine, watch=False)
    async with app.run_test(size=tui.SIZE):
        await app.ready.wait()
        feeding = asyncio.ensure_future(feed(engine, rate, seconds))
        latencies = await measure(app, feeding)
        sent = await feeding
        await asyncio.sleep(0.5)
        return latencies, sent, app.bridge.audit_seen


async def attached(paths: Any, rate: int, seconds: float) -> tuple[list[float], int, int]:
    loop = asyncio.new_event_loop()
    engine = Engine(paths)
    ready = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(engine.start(serve=True, watch=False))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    ready.wait(30)
    try:
        app = tui.RenderingApp(RemoteEngine(paths), watch=False)
        async with app.run_test(size=tui.SIZE):
            await app.ready.wait()
            feeding = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(feed(engine, rate, seconds), loop))
            latencies = await measure(app, feeding)
            sent = await feeding
            await asyncio.sleep(1.0)
            return latencies, sent, app.bridge.audit_seen
    finally:
        asyncio.run_coroutine_threadsafe(engine.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def summary(name: str, latencies: list[float], sent: int, seen: int) -> float:
    p50 = statistics.median(latencies) * 1000
    print(
        f"{name:<9} key p50 {p50:6.1f} ms  max {max(latencies) * 1000:6.1f} ms  ({len(latencies)} keys)  "
        f"records {seen:,}/{sent:,} on screen"
    )
    return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=1000)
    args = parser.parse_args()
    from outloop_tui.demo import MemoryKeyring

    keyring.set_keyring(MemoryKeyring())
    with tempfile.TemporaryDirectory(prefix="outloop-bench-attach-") as root:
        print(f"{args.rate:,} audit records/s for {args.seconds:g} s, each way")
        base = summary("embedded", *asyncio.run(embedded(tui.world(Path(root) / "e"), args.rate, args.seconds)))
        remote = summary("attached", *asyncio.run(attached(tui.world(Path(root) / "a"), args.rate, args.seconds)))
        print(f"attached / embedded key p50: {remote / base:.2f}x")


if __name__ == "__main__":
    main()
