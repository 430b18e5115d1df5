"""The leak watcher inside a real `outloop broker`, on large trees, in one run.

    python bench/watchbroker.py [--tenants 50] [--repos 10] [--monorepo 40000] [--rounds 3]
                                [--idle 60] [--writes 200] [--keep]

What it builds, in a temporary folder:
- bench/watchtree.py's tenants x repositories (source folders, a `.env`, a
  node_modules of 40 packages, a `.git`, a `.gitignore`'d build/), one workspace each;
- a monorepo of about 40,000 source files: packages/pkgNNN/ with src/, test/, a
  package.json, and a `generated/` folder that each package's own `.gitignore`
  ignores (nested .gitignore files: walked past, never watched);
- a small web app with a package.json of 31 dependencies (550 packages installed),
  `npm install`-ed once before anything is measured, so later installs come from
  npm's cache.

Three homes, each with its own private Secret Service (dbus-daemon +
gnome-keyring-daemon, fresh XDG_DATA_HOME) and config: *empty* (no tenant),
*monorepo* (one tenant, the monorepo), *large* (every repository, the monorepo and
the web app: 502 workspaces). Then:
1. first /v1/health: `outloop broker` started, the socket polled every 5 ms from
   the moment the process is spawned; the time to the first answer, and to
   state "listening" (start() done: watches armed), empty and large alternately,
   `--rounds` each (the empty config's time is the baseline: Python, imports,
   keyring, audit);
2. the initial scan, from spawn to `initial_scan_done` in health: the monorepo
   alone and the large tree, and `outloop scan` (one-shot, one process per core)
   of the monorepo;
3. idle CPU of the large broker over `--idle` seconds once its first scan is done
   (its own /proc/<pid>/stat, children included);
4. write-to-alert while `npm install` churns: a thread removes node_modules and
   runs `npm install` again, in a loop, in the web app's workspace; meanwhile a
   token is written every 200 ms, alternately into the web app's src/ and into one
   of the repositories, and the time until the broker's AlertOpened event reaches
   an attached operator (the operator channel, as the dashboard gets it) is
   measured. Also the broker's CPU while the churn ran.

Bounded everywhere: every wait has a deadline, every loop a count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from watchtree import repo  # noqa: E402

from broker import client as broker_client  # noqa: E402
from broker.events import AlertOpened  # noqa: E402
from broker.leaks import rules as L  # noqa: E402
from broker.paths import Paths  # noqa: E402

# bench/broker.py's private Secret Service and /proc CPU reading (its name is the package's: load by path).
_spec = importlib.util.spec_from_file_location("bench_broker", HERE / "broker.py")
assert _spec is not None and _spec.loader is not None
bench_broker = importlib.util.module_from_spec(_spec)
sys.modules["bench_broker"] = bench_broker  # its dataclasses look their module up
_spec.loader.exec_module(bench_broker)
spawn_secret_service = bench_broker._spawn_secret_service
cpu_seconds = bench_broker.cpu_seconds

VENV_BIN = Path(sys.executable).parent
OUTLOOP = str(VENV_BIN / "outloop")

PACKAGE_JSON = {
    "name": "bench-web",
    "version": "1.0.0",
    "private": True,
    "dependencies": {
        "express": "^4.19.2",
        "lodash": "^4.17.21",
        "react": "^18.3.1",
        "react-dom": "^18.3.1",
        "axios": "^1.7.2",
        "moment": "^2.30.1",
        "chalk": "^4.1.2",
        "commander": "^12.1.0",
        "debug": "^4.3.5",
        "dotenv": "^16.4.5",
        "uuid": "^10.0.0",
        "yargs": "^17.7.2",
        "ws": "^8.17.1",
        "jsonwebtoken": "^9.0.2",
        "bcryptjs": "^2.4.3",
        "cors": "^2.8.5",
        "body-parser": "^1.20.2",
        "morgan": "^1.10.0",
        "pg": "^8.12.0",
        "socket.io": "^4.7.5",
        "zod": "^3.23.8",
        "date-fns": "^3.6.0",
        "rxjs": "^7.8.1",
    },
    "devDependencies": {
        "typescript": "^5.5.3",
        "eslint": "^8.57.0",
        "prettier": "^3.3.2",
        "jest": "^29.7.0",
        "webpack": "^5.92.1",
        "@babel/core": "^7.24.7",
        "babel-loader": "^9.1.3",
        "nodemon": "^3.1.4",
    },
}
NPM = ["npm", "install", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"]


# -- trees -------------------------------------------------------------------------------


def monorepo(root: Path, files: int) -> int:
    """About `files` source files in packages of 200; returns how many were written."""
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".gitignore").write_text("node_modules/\ndist/\ncoverage/\n*.log\n.turbo/\n")
    (root / "package.json").write_text('{"name": "mono", "private": true, "workspaces": ["packages/*"]}\n')
    folders = [f"src/components/{c}" for c in "abcd"] + ["src/lib", "src/utils", "src/api", "test"]
    written = 0
    for p in range(max(1, files // 200)):
        pkg = root / "packages" / f"pkg{p:03}"
        pkg.mkdir(parents=True)
        (pkg / ".gitignore").write_text("generated/\n/tmp/\n")
        (pkg / "package.json").write_text(f'{{"name": "@mono/pkg{p:03}", "version": "1.0.{p}"}}\n')
        for g in range(10):  # ignored by the package's own .gitignore: walked past
            (pkg / "generated" / "api").mkdir(parents=True, exist_ok=True)
            (pkg / "generated" / "api" / f"client{g}.ts").write_text("export const generated = true;\n" * 40)
        for folder in folders:
            (pkg / folder).mkdir(parents=True, exist_ok=True)
            for i in range(25):
                body = "".join(
                    f"export function f{p}_{i}_{n}(x: number): number {{ return x * {n} + {p}; }}\n" for n in range(16)
                )
                (pkg / folder / f"mod{i}.ts").write_text(f"// pkg{p:03} {folder} {i}\n{body}")
                written += 1
    return written


def webapp(root: Path) -> None:
    (root / "src").mkdir(parents=True)
    (root / "package.json").write_text(json.dumps(PACKAGE_JSON, indent=2) + "\n")
    (root / ".gitignore").write_text("node_modules/\n")
    (root / "src" / "index.js").write_text("console.log('hello');\n")
    done = subprocess.run(NPM, cwd=root, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"npm install failed: {done.stderr.strip()[-500:]}")


# -- homes and brokers ---------------------------------------------------------------------

CONFIGURE = """
import json, sys
from broker.config import ConfigEditor
from broker.paths import Paths
tenants = json.loads(sys.stdin.read())
editor = ConfigEditor(Paths.from_env())
for tenant, folders in tenants.items():
    editor.add_tenant(tenant, tenant)
    for folder in folders:
        editor.add_workspace(tenant, folder)
editor.save()
"""


class Home:
    """An OUTLOOP_HOME with its own Secret Service and config."""

    def __init__(self, root: Path, tenants: dict[str, list[str]]) -> None:
        self.root = root
        self.home = root / "home"
        self.env = dict(os.environ, OUTLOOP_HOME=str(self.home))
        for name in ("OUTLOOP_SOCKET", "OUTLOOP_DEBUG", "OUTLOOP_CONFIG"):
            self.env.pop(name, None)
        (root / "keyring").mkdir(parents=True)
        self.procs = spawn_secret_service(root / "keyring", self.env)
        self.home.mkdir(mode=0o700)
        (self.home / "config.toml").write_text("[broker]\n")
        deadline = time.monotonic() + 30
        while True:  # the Secret Service may take a moment to come up
            done = subprocess.run(
                [sys.executable, "-c", CONFIGURE],
                input=json.dumps(tenants),
                capture_output=True,
                text=True,
                env=self.env,
                timeout=120,
                cwd=HERE.parent,
            )
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                sys.exit(f"configuring {root.name} failed: {done.stderr.strip()[-500:]}")
            time.sleep(0.3)

    @property
    def sock(self) -> Path:
        return Paths(self.home / "config.toml", self.home / "state", self.home / "broker.sock").socket

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


class Broker:
    """`outloop broker` on a home, its socket polled from the moment it is spawned."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.log = open(home.root / "broker.log", "ab")  # noqa: SIM115 - closed in stop()
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen([OUTLOOP, "broker"], env=home.env, stdout=self.log, stderr=self.log)
        self.first_health: float | None = None
        self.first_state = ""
        self.listening: float | None = None

    def poll(self, timeout: float = 120) -> dict[str, object]:
        """Health, every 5 ms, until the broker says it is listening; returns that answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the broker exited: {(self.home.root / 'broker.log').read_text()[-2000:]}")
            try:
                h = broker_client.health(self.home.sock, timeout=5)
            except (broker_client.BrokerUnreachable, OSError, ValueError):
                time.sleep(0.005)
                continue
            now = time.perf_counter() - self.spawned
            if self.first_health is None:
                self.first_health, self.first_state = now, str(h.get("state"))
            if h.get("state") == "listening":
                self.listening = now
                return h
            time.sleep(0.005)
        sys.exit("the broker never said it was listening")

    def health(self) -> dict[str, object]:
        return broker_client.health(self.home.sock, timeout=10)

    def wait_scanned(self, timeout: float = 900) -> tuple[float, dict[str, object]]:
        """Seconds from spawn until the first scan is done (health polled every 50 ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            watcher = h.get("watcher")
            if isinstance(watcher, dict) and watcher.get("initial_scan_done"):
                return time.perf_counter() - self.spawned, watcher
            time.sleep(0.05)
        sys.exit("the first scan did not finish")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


# -- write-to-alert under npm install ---------------------------------------------------


def churn(web: Path, stop: threading.Event, installs: list[float]) -> None:
    """npm install, again and again: node_modules removed, then installed from the cache."""
    while not stop.is_set():
        shutil.rmtree(web / "node_modules", ignore_errors=True)
        t = time.perf_counter()
        subprocess.run(NPM, cwd=web, capture_output=True, timeout=900)
        installs.append(time.perf_counter() - t)


async def write_to_alert(
    home: Home, web: Path, repos: list[Path], writes: int, broker: Broker
) -> tuple[list[float], int, list[float], float]:
    from broker.operator.client import RemoteEngine

    os.environ.update({k: v for k, v in home.env.items() if k.startswith(("DBUS", "XDG", "PYTHON_KEYRING"))})
    arrived: dict[str, float] = {}
    operator = RemoteEngine(Paths(home.home / "config.toml", home.home / "state", home.sock))
    operator.subscribe(
        lambda e: arrived.setdefault(e.alert.fingerprint, time.perf_counter()) if isinstance(e, AlertOpened) else None
    )
    await operator.start()
    stop = threading.Event()
    installs: list[float] = []
    churner = threading.Thread(target=churn, args=(web, stop, installs), daemon=True)
    cpu0, wall0 = broker.cpu(), time.perf_counter()
    churner.start()
    await asyncio.sleep(2)  # npm is under way
    samples: list[float] = []
    missed = 0
    # At least `writes`, and on until a whole install (rm -rf node_modules, npm install) has run meanwhile.
    installs_before = len(installs)
    deadline_all = time.monotonic() + 900
    i = 0
    while (i < writes or len(installs) <= installs_before + 1) and time.monotonic() < deadline_all:
        i += 1
        token = "ghp_" + L.fake(L.A62, 36, f"watchbroker-{i}")
        fp = hashlib.sha256(token.encode()).hexdigest()
        folder = web / "src" if i % 2 == 0 else repos[(i * 37) % len(repos)] / "src" / "app"
        t0 = time.perf_counter()
        (folder / f"leak{i}.js").write_text(f"const TOKEN = '{token}';\n")
        deadline = t0 + 5.0
        while fp not in arrived and time.perf_counter() < deadline:
            await asyncio.sleep(0.002)
        if fp in arrived:
            samples.append((arrived[fp] - t0) * 1000)
        else:
            missed += 1
        await asyncio.sleep(max(0.0, 0.2 - (time.perf_counter() - t0)))
    churn_cpu = (broker.cpu() - cpu0) / (time.perf_counter() - wall0)
    stop.set()
    await asyncio.to_thread(churner.join, 900)
    await operator.stop()
    return samples, missed, installs, churn_cpu


# -- the run ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def temp_root(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="olw-"))  # short: socket paths have a limit
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--repos", type=int, default=10)
    parser.add_argument("--monorepo", type=int, default=40_000, help="source files in the monorepo")
    parser.add_argument("--rounds", type=int, default=3, help="broker starts per config, alternating")
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if not shutil.which("npm"):
        sys.exit("this benchmark needs npm (and its registry, once)")

    homes: list[Home] = []
    with temp_root(args.keep) as root:
        try:
            t = time.perf_counter()
            repos: list[Path] = []
            tenants: dict[str, list[str]] = {}
            for ti in range(args.tenants):
                for r in range(args.repos):
                    folder = root / "trees" / f"t{ti}" / f"r{r}"
                    repo(folder, f"{ti}/{r}")
                    repos.append(folder)
                    tenants.setdefault(f"t{ti}", []).append(str(folder))
            mono = root / "trees" / "mono"
            mono_files = monorepo(mono, args.monorepo)
            web = root / "trees" / "web"
            webapp(web)
            folders = sum(1 for _ in os.walk(root / "trees"))
            files = sum(len(f) for _, _, f in os.walk(root / "trees"))
            print(
                f"trees: {len(repos)} repositories, a monorepo of {mono_files:,} source files, a web app with "
                f"node_modules; {folders:,} folders, {files:,} files in all (built in {time.perf_counter() - t:.0f} s)"
            )
            empty = Home(root / "empty", {})
            homes.append(empty)
            only_mono = Home(root / "mono", {"mono": [str(mono)]})
            homes.append(only_mono)
            large = Home(root / "large", {**tenants, "mono": [str(mono)], "web": [str(web)]})
            homes.append(large)

            # 1. first health, alternating empty and large.
            firsts: dict[str, list[tuple[float, float, str]]] = {"empty": [], "large": []}
            scans: list[float] = []
            for _ in range(args.rounds):
                for label, home in (("empty", empty), ("large", large)):
                    b = Broker(home)
                    b.poll()
                    assert b.first_health is not None and b.listening is not None
                    firsts[label].append((b.first_health, b.listening, b.first_state))
                    if label == "large":
                        scans.append(b.wait_scanned()[0])
                    b.stop()
            for label, rows in firsts.items():
                print(
                    f"first /v1/health, {label:5} config: "
                    + "  ".join(f"{f * 1000:5.0f} ms ({s}; listening {li * 1000:5.0f} ms)" for f, li, s in rows)
                    + f"   median {statistics.median(f for f, _, _ in rows) * 1000:.0f} ms"
                )
            base = statistics.median(f for f, _, _ in firsts["empty"])
            big = statistics.median(f for f, _, _ in firsts["large"])
            print(f"first health, large over empty: +{(big - base) * 1000:.0f} ms ({big / base:.2f}x)")

            # 2. the initial scans.
            b = Broker(only_mono)
            b.poll()
            mono_scan, mono_watcher = b.wait_scanned()
            b.stop()
            t = time.perf_counter()
            one_shot = subprocess.run(
                [OUTLOOP, "scan", str(mono)], env=only_mono.env, capture_output=True, text=True, timeout=900
            )
            one_shot_s = time.perf_counter() - t
            print(
                f"monorepo ({mono_files:,} source files): broker's first scan {mono_scan:.1f} s from spawn "
                f"({mono_watcher['files_scanned']:,} files, {mono_watcher['watched_folders']:,} folders watched); "
                f"`outloop scan` {one_shot_s:.1f} s (exit {one_shot.returncode}: "
                f"{(one_shot.stdout.strip().splitlines() or ['?'])[-1]})"
            )
            print("large tree, broker's first scan from spawn: " + "  ".join(f"{s:.1f} s" for s in scans))

            # 3. idle CPU, 4. write-to-alert under npm install, on one large broker.
            b = Broker(large)
            b.poll()
            _, watcher = b.wait_scanned()
            print(
                f"large tree: {watcher['files_scanned']:,} files scanned, {watcher['watched_folders']:,} folders "
                f"watched, {watcher['polled_folders']} polled, warning: {watcher.get('warning')}"
            )
            time.sleep(5)
            cpu0, wall0 = b.cpu(), time.perf_counter()
            time.sleep(args.idle)
            idle = (b.cpu() - cpu0) / (time.perf_counter() - wall0)
            print(f"idle CPU of the broker over {args.idle:.0f} s, large tree armed: {idle:.2%} of a core")
            samples, missed, installs, churn_cpu = asyncio.run(write_to_alert(large, web, repos, args.writes, b))
            b.stop()
            if samples:
                print(
                    f"write-to-alert while npm install churns ({len(installs)} installs, "
                    f"{statistics.median(installs):.0f} s each): {len(samples)} alerts, p50 "
                    f"{statistics.median(samples):.0f} ms  p95 {pct(samples, 0.95):.0f} ms  "
                    f"max {max(samples):.0f} ms  missed {missed}; broker CPU meanwhile {churn_cpu:.0%} of a core"
                )
            else:
                print(f"write-to-alert: every one of {args.writes} writes missed")
            print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores, shared)")
        finally:
            for home in homes:
                home.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
