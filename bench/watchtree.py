"""Leak watcher figures on workspace-shaped trees, in one run.

    python bench/watchtree.py [--tenants 50] [--repos 10] [--writes 100] [--idle 20]

Builds, in a temporary folder, T tenants x R repositories, each with source
folders, a `.env`, a node_modules tree (40 packages, 3 levels), a `.git` with
object folders and a `.gitignore`'d `build/` folder; and one workspace holding
the same files (every repository a subfolder of it). Then, for both:
* start-to-ready (the initial scan) and the longest event-loop stall while it ran
  (a ticker every 10 ms; the broker answers /v1/health on that loop);
* inotify watches held against the folders the scanner reads;
then, on the many-workspace world: CPU used while idle, and write-to-alert
latency for writes in the repositories while another thread churns files and
folders in their node_modules (an `npm install` stand-in).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.events import AlertOpened  # noqa: E402
from broker.leaks import rules as L  # noqa: E402
from broker.leaks.alerts import AlertStore  # noqa: E402
from broker.leaks.scan import FolderIgnore, walk  # noqa: E402
from broker.leaks.watcher import LeakWatcher  # noqa: E402


def repo(root: Path, seed: str) -> None:
    for d in ("src/app", "src/lib", "tests", "docs"):
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(5):
            (root / d / f"m{i}.py").write_text(f'"""{seed} {d} {i}"""\nVALUE = {i}\n' * 20)
    (root / ".env").write_text("DEBUG=1\nAPI_URL=https://api.acme.dev\n")
    (root / ".gitignore").write_text("build/\n*.log\n")
    for p in range(40):
        for sub in ("lib", "lib/esm", "dist"):
            (root / "node_modules" / f"pkg{p}" / sub).mkdir(parents=True, exist_ok=True)
        (root / "node_modules" / f"pkg{p}" / "index.js").write_text("module.exports = 1;\n")
    for o in range(30):
        (root / ".git" / "objects" / f"{o:02x}").mkdir(parents=True, exist_ok=True)
    (root / "build" / "out").mkdir(parents=True, exist_ok=True)


def inotify_watches() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def start_and_scan(
    workspaces: list[tuple[str, Path]], store: AlertStore
) -> tuple[LeakWatcher, float, float, float]:
    watcher = LeakWatcher(workspaces, lambda: {}, store)
    stall = 0.0
    done = False

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            stall = max(stall, now - last - 0.01)
            last = now

    tick = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    await watcher.start()
    armed = time.perf_counter() - t0
    await watcher.wait_ready()
    ready = time.perf_counter() - t0
    done = True
    await tick
    return watcher, armed, ready, stall


async def latency(store: AlertStore, repos: list[Path], writes: int) -> tuple[list[float], int]:
    arrived: dict[str, float] = {}
    got = asyncio.Event()

    def on_event(event: object) -> None:
        if isinstance(event, AlertOpened):
            arrived.setdefault(event.alert.fingerprint, time.perf_counter())
            got.set()

    store.subscribe(on_event)
    stop = threading.Event()

    def churn() -> None:  # npm install: folders and files appear and vanish in node_modules
        n = 0
        while not stop.is_set():
            base = repos[n % len(repos)] / "node_modules" / f"tmp{n}"
            (base / "lib").mkdir(parents=True, exist_ok=True)
            for i in range(20):
                (base / "lib" / f"f{i}.js").write_text("x" * 200)
            shutil.rmtree(base, ignore_errors=True)
            n += 1

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    samples: list[float] = []
    missed = 0
    for i in range(writes):
        token = "ghp_" + L.fake(L.A62, 36, f"watchtree-{i}")
        fp = hashlib.sha256(token.encode()).hexdigest()
        target = repos[(i * 37) % len(repos)] / "src" / "app" / f"leak{i}.py"
        t0 = time.perf_counter()
        target.write_text(f"TOKEN = '{token}'\n")
        deadline = t0 + 5.0
        while fp not in arrived and time.perf_counter() < deadline:
            got.clear()
            try:
                await asyncio.wait_for(got.wait(), deadline - time.perf_counter())
            except TimeoutError:
                break
        if fp in arrived:
            samples.append((arrived[fp] - t0) * 1000)
        else:
            missed += 1
    stop.set()
    churner.join()
    return samples, missed


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        many: list[tuple[str, Path]] = []
        repos: list[Path] = []
        for t in range(args.tenants):
            for r in range(args.repos):
                root = tmp / "many" / f"t{t}" / f"r{r}"
                repo(root, f"{t}/{r}")
                many.append((f"t{t}", root))
                repos.append(root)
        one_root = tmp / "one"
        shutil.copytree(tmp / "many", one_root, symlinks=True)
        scanned_folders = sum(len(walk(ws, FolderIgnore.for_workspace(ws))[1]) for _, ws in many)
        all_folders = sum(1 for _ in os.walk(tmp / "many"))
        print(
            f"{len(many)} workspaces ({args.tenants} tenants x {args.repos}): {all_folders} folders, "
            f"{scanned_folders} read by the scanner (node_modules, .git and .gitignore'd build/ skipped)"
        )
        results = {}
        for label, spaces in (("one workspace", [("solo", one_root)]), (f"{len(many)} workspaces", many)):
            before = inotify_watches()
            store = AlertStore(tmp / f"state-{len(spaces)}" / "alerts.jsonl")
            watcher, armed, ready, stall = await start_and_scan(spaces, store)
            health = watcher.health()
            watches = inotify_watches() - before
            results[label] = ready
            print(
                f"{label:16} armed {armed * 1000:6.0f} ms  scanned {health.files_scanned} files in {ready:5.2f} s  "
                f"longest loop stall {stall * 1000:4.0f} ms  inotify watches {watches} "
                f"(folders read {health.watched_folders}, polled {health.polled_folders})"
            )
            if len(spaces) > 1:
                c0, w0 = cpu(), time.perf_counter()
                await asyncio.sleep(args.idle)
                print(f"idle CPU over {args.idle} s: {(cpu() - c0) / (time.perf_counter() - w0):.2%} of a core")
                samples, missed = await latency(store, repos, args.writes)
                if samples:
                    q = statistics.quantiles(samples, n=100) if len(samples) > 1 else [samples[0]] * 99
                    print(
                        f"write-to-alert under node_modules churn, {args.writes} writes: "
                        f"p50 {statistics.median(samples):.0f} ms  p95 {q[94]:.0f} ms  "
                        f"max {max(samples):.0f} ms  missed {missed}"
                    )
            await watcher.stop()
            await asyncio.sleep(1)  # the native watcher threads close their inotify instances
        a, b = results["one workspace"], results[f"{len(many)} workspaces"]
        print(f"initial scan, many workspaces / one: {b / a:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--repos", type=int, default=10)
    parser.add_argument("--writes", type=int, default=100)
    parser.add_argument("--idle", type=float, default=20.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
