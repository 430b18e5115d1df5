"""This tree's broker against another git revision's, both running side by side.

    python bench/compare.py REV [--seq 2000] [--rounds 4] [--seconds 4]

Machine speed drifts here by tens of percent within minutes, so comparing two
runs of bench/broker.py made minutes apart says little. This runs both brokers
at once, on one upstream and one keyring:
- "this" is `outloop broker` from the working tree;
- "base" is the broker from a temporary git worktree of REV, with its own home.
Then:
1. sequential p50: calls alternate direct, this, base (the order flips every
   round), so drift hits all three alike;
2. throughput: bench/loadgen.py with 32 clients against each broker in turn,
   alternating for `--rounds` rounds. It prints calls/s and CPU per call
   (broker plus its forwarding workers).

Each figure is printed with its ratio to base. The worktree is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# bench/broker.py's world and helpers (its name is the package's, so load it by path).
_spec = importlib.util.spec_from_file_location("bench_broker", HERE / "broker.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_broker"] = bench
_spec.loader.exec_module(bench)
CRED, UPSTREAM_PATH = bench.CRED, bench.UPSTREAM_PATH


@contextlib.contextmanager
def base_broker(world: bench.BenchWorld, rev: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """REV's broker on a copy of the world's config, from a temporary worktree."""
    tree = Path(tempfile.mkdtemp(prefix="olcmp-tree-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree), rev], check=True, capture_output=True
    )
    home = world.root / "base-home"
    home.mkdir(mode=0o700)
    shutil.copy(world.home / "config.toml", home / "config.toml")
    # The package is imported from the worktree, never from this tree (checked).
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); import broker; "
        f"assert broker.__file__.startswith({str(tree)!r}), broker.__file__; "
        "from outloop_tui.cli import main; sys.exit(main())"
    )
    log = open(world.root / "base-broker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "broker"],
        cwd=world.root,
        # PYTHONPATH too: its forwarding workers are processes of their own, and must run
        # REV's code (this tree's speak another protocol, and calls would hang).
        env=dict(world.env, OUTLOOP_HOME=str(home), PYTHONPATH=str(tree)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sock = str(home / "broker.sock")
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{rev}'s broker did not start: {(world.root / 'base-broker.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield proc, sock
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)


def sequential(calls: dict[str, Callable[[], httpx.Response]], count: int) -> dict[str, float]:
    """p50 ms of each kind of call, interleaved, the order reversed every other round."""
    names = list(calls)
    for _ in range(100):  # warm-up
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(count):
        order = names if i % 2 == 0 else [names[0], *reversed(names[1:])]
        for name in order:
            start = time.perf_counter()
            response = calls[name]()
            times[name].append((time.perf_counter() - start) * 1000)
            if response.status_code != 200:
                sys.exit(f"{name}: HTTP {response.status_code}: {response.text[:300]}")
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the git revision to compare with (e.g. HEAD~3)")
    parser.add_argument("--seq", type=int, default=2000, help="sequential calls of each kind")
    parser.add_argument("--rounds", type=int, default=4, help="throughput runs per broker")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per throughput run")
    args = parser.parse_args()
    payload = json.dumps({"credential": CRED, "method": "GET", "path": UPSTREAM_PATH}).encode()

    with bench.bench_world("olcmp-") as world, base_broker(world, args.rev) as (base, base_sock):
        os.chdir(world.workspace)  # maps this process to the tenant, for both brokers
        socks = {"this": world.sock, "base": base_sock}
        pids = {"this": world.broker.pid, "base": base.pid}
        url = f"http://127.0.0.1:{world.port}{UPSTREAM_PATH}"
        with contextlib.ExitStack() as stack:
            direct = stack.enter_context(httpx.Client(trust_env=False))
            clients = {
                name: stack.enter_context(
                    httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://outloop", trust_env=False)
                )
                for name, sock in socks.items()
            }
            calls: dict[str, Callable[[], httpx.Response]] = {"direct": lambda: direct.get(url)}
            for name, client in clients.items():
                calls[name] = lambda c=client: c.post("/v1/request", content=payload)
            p50 = sequential(calls, args.seq)

        request = world.root / "request.http"
        request.write_bytes(
            b"POST /v1/request HTTP/1.1\r\nHost: outloop\r\nContent-Type: "
            b"application/json\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        rates: dict[str, list[float]] = {"this": [], "base": []}
        cpu: dict[str, list[float]] = {"this": [], "base": []}
        for r in range(args.rounds):
            for name in ("this", "base") if r % 2 == 0 else ("base", "this"):
                command = [
                    sys.executable,
                    str(HERE / "loadgen.py"),
                    "--unix",
                    socks[name],
                    "--request",
                    str(request),
                    "--clients",
                    "32",
                ]
                if r == 0:
                    bench._loadgen(command, 1, world.workspace)  # warm-up
                before = bench.cpu_seconds(pids[name]) + bench.workers_cpu_seconds(pids[name])
                result = bench._loadgen(command, args.seconds, world.workspace)
                used = bench.cpu_seconds(pids[name]) + bench.workers_cpu_seconds(pids[name]) - before
                rates[name].append(result["per_second"])
                cpu[name].append(used * 1000 / max(result["calls"], 1))

    print(f"this tree against {args.rev}, side by side ({os.cpu_count()} cores)")
    print(f"1. sequential p50, {args.seq} calls each, interleaved with direct calls")
    for name in ("direct", "this", "base"):
        print(f"   {name:<7}{p50[name]:8.3f} ms   added {p50[name] - p50['direct']:+.3f} ms")
    print(f"   added, this / base: {(p50['this'] - p50['direct']) / (p50['base'] - p50['direct']):.2f}x")
    print(f"2. loadgen x32, {args.rounds} alternating runs of {args.seconds:g} s each")
    for name in ("this", "base"):
        runs = " ".join(f"{x:.0f}" for x in rates[name])
        print(
            f"   {name:<7}{statistics.fmean(rates[name]):8.0f} calls/s ({runs})   "
            f"CPU/call {statistics.fmean(cpu[name]):.3f} ms (broker + workers)"
        )
    print(f"   calls/s, this / base: {statistics.fmean(rates['this']) / statistics.fmean(rates['base']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
