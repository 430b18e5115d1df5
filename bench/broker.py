"""Broker overhead against direct calls to the same upstream, in one invocation.

    /work/venv/bin/python bench/broker.py [--seq 2000] [--seconds 5] [--clients 32]

What runs, each in its own process so no one borrows another's core time unseen:
- the upstream: bench/upstream_fast.py, a raw asyncio HTTP/1.1 server on loopback
  answering a fixed 71-byte JSON (uvicorn is not installed, and a raw protocol
  costs less per call than h11 would, so the figures are the client's and the
  broker's);
- the broker: `outloop broker`, the real deployment shape, on a throw-away
  OUTLOOP_HOME under a temp folder (on disk: ext4 here, so fsync is real), its
  log on stderr going to a file there;
- the keyring: a private Secret Service, dbus-daemon + `gnome-keyring-daemon
  --unlock --components=secrets` with a fresh XDG_DATA_HOME under the temp folder,
  so the user's own keyring is never opened (the broker caches the secret after
  its first lookup, so the keyring is off the measured path);
- this process: the clients. It chdirs into the tenant's workspace, which is how
  the broker maps it to the tenant.

Figures, all against the direct baseline measured in the same run:
1. sequential latency, one keep-alive connection, calls interleaved (direct,
   broker, direct, broker, ...) so drift hits both alike: p50 and p99 of a
   direct httpx2 GET, of POST /v1/request and of GET /v1/proxy/<cred>/... through
   the socket, and the added milliseconds;
2. throughput with N concurrent clients (asyncio tasks, each its own
   httpx2.AsyncClient and connection) for a fixed time: calls/s direct, through
   /v1/request and through /v1/proxy (the path an SDK takes), and the ratios.
Then the audit is checked: it holds an attempt and an outcome for every
brokered call, `outloop audit verify` passes, and the broker's health reports
the fsyncs its group commit did (so the audit was on and fsync'd).

Loopback only; every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import psutil
import tomli_w

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
OUTLOOP = str(VENV_BIN / "outloop")
SECRET = "sk-bench-0123456789abcdefghijklmnopqrstuvwxyz"
CRED = "api"
UPSTREAM_PATH = "/v1/items"


def _spawn_secret_service(root: Path, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    for sub in ("data", "runtime", "config"):
        (root / sub).mkdir(mode=0o700)
    env.update(
        XDG_DATA_HOME=str(root / "data"),
        XDG_RUNTIME_DIR=str(root / "runtime"),
        XDG_CONFIG_HOME=str(root / "config"),
        PYTHON_KEYRING_BACKEND="keyring.backends.SecretService.Keyring",
    )
    if not (shutil.which("dbus-daemon") and shutil.which("gnome-keyring-daemon")):
        sys.exit("this benchmark needs dbus-daemon and gnome-keyring-daemon (apt-get install dbus gnome-keyring)")
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert bus.stdout is not None
    address = bus.stdout.readline().decode().strip()
    if not address:
        bus.kill()
        sys.exit("dbus-daemon printed no address")
    env["DBUS_SESSION_BUS_ADDRESS"] = address
    daemon = subprocess.Popen(
        ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert daemon.stdin is not None
    daemon.stdin.write(b"bench-session-password")
    daemon.stdin.close()
    return [daemon, bus]


def _outloop(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    deadline = time.monotonic() + 20
    while True:  # the Secret Service may take a moment to come up
        done = subprocess.run([OUTLOOP, *args], input=stdin, capture_output=True, text=True, env=env, timeout=30)
        if done.returncode == 0:
            return done.stdout
        if time.monotonic() > deadline:
            sys.exit(f"outloop {' '.join(args)} failed: {done.stderr.strip()}")
        time.sleep(0.2)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sequential(port: int, sock: str, count: int, seconds: float) -> dict[str, list[float]]:
    url = f"http://127.0.0.1:{port}{UPSTREAM_PATH}"
    payload = json.dumps({"credential": CRED, "method": "GET", "path": UPSTREAM_PATH}).encode()
    times: dict[str, list[float]] = {"direct": [], "request": [], "proxy": []}
    with (
        httpx.Client(trust_env=False) as direct,
        httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://outloop", trust_env=False) as brokered,
    ):
        calls = {
            "direct": lambda: direct.get(url, headers={"Authorization": "Bearer dummy"}),
            "request": lambda: brokered.post(
                "/v1/request", content=payload, headers={"Content-Type": "application/json"}
            ),
            "proxy": lambda: brokered.get(
                f"/v1/proxy/{CRED}{UPSTREAM_PATH}", headers={"Authorization": "Bearer dummy"}
            ),
        }
        for name, call in calls.items():  # warm-up: connections, caches
            for _ in range(50):
                _check(name, call())
        deadline = time.monotonic() + seconds
        for _ in range(count):
            for name, call in calls.items():
                t = time.perf_counter()
                response = call()
                times[name].append((time.perf_counter() - t) * 1000)
                _check(name, response)
            if time.monotonic() > deadline:
                break
    return times


def _check(name: str, response: httpx.Response) -> None:
    if response.status_code != 200:
        sys.exit(f"{name}: HTTP {response.status_code}: {response.text[:300]}")
    if name == "request" and response.json().get("status") != 200:
        sys.exit(f"{name}: upstream status {response.json().get('status')}")


async def _load(
    make_client: object, request: object, clients: int, seconds: float, max_calls: int
) -> tuple[int, float]:
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        async with make_client() as client:  # type: ignore[operator]
            while time.monotonic() < stop and done < max_calls:
                response = await request(client)  # type: ignore[operator]
                if response.status_code != 200:
                    raise SystemExit(f"HTTP {response.status_code}: {response.text[:300]}")
                done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done, time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workers_cpu_seconds(pid: int) -> float:
    """CPU time of the broker's child processes (its forwarding workers)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return 0.0
    return sum(cpu_seconds(c.pid) for c in children)


def throughput(
    port: int,
    sock: str,
    clients: int,
    seconds: float,
    broker_pid: int,
    profile: str | None = None,
    profile_run: str = "broker",
) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}{UPSTREAM_PATH}"
    payload = json.dumps({"credential": CRED, "method": "GET", "path": UPSTREAM_PATH}).encode()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    cap = 1_000_000

    def direct_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(limits=limits, trust_env=False)

    def broker_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=sock, limits=limits), base_url="http://outloop", trust_env=False
        )

    async def direct_call(c: httpx.AsyncClient) -> httpx.Response:
        return await c.get(url, headers={"Authorization": "Bearer dummy"})

    async def broker_call(c: httpx.AsyncClient) -> httpx.Response:
        return await c.post("/v1/request", content=payload, headers={"Content-Type": "application/json"})

    async def proxy_call(c: httpx.AsyncClient) -> httpx.Response:
        return await c.get(f"/v1/proxy/{CRED}{UPSTREAM_PATH}")

    out: dict[str, float] = {}
    for name, make, call in (
        ("direct", direct_client, direct_call),
        ("broker", broker_client, broker_call),
        ("proxy", broker_client, proxy_call),
    ):
        asyncio.run(_load(make, call, clients, min(1.0, seconds), cap))  # warm-up
        spy = None
        if profile is not None and name == profile_run:
            # Sampled without pausing the broker, over the measured run only.
            spy = subprocess.Popen(
                [
                    str(VENV_BIN / "py-spy"),
                    "record",
                    "--nonblocking",
                    "-p",
                    str(broker_pid),
                    "-r",
                    "250",
                    "-d",
                    f"{seconds:g}",
                    "-f",
                    "raw",
                    "-o",
                    profile,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        cpu, workers = cpu_seconds(broker_pid), workers_cpu_seconds(broker_pid)
        n, elapsed = asyncio.run(_load(make, call, clients, seconds, cap))
        if name != "direct":
            out[name + "_cpu_ms"] = (cpu_seconds(broker_pid) - cpu) * 1000 / max(n, 1)
            out[name + "_workers_cpu_ms"] = (workers_cpu_seconds(broker_pid) - workers) * 1000 / max(n, 1)
        if spy is not None:
            spy.wait(30)
        out[name] = n / elapsed
        out[name + "_calls"] = n
    return out


def lean_throughput(world: BenchWorld, clients: int, seconds: float) -> dict[str, float]:
    """Calls/s with bench/loadgen.py (its own process, a few tens of µs per call) as the
    client, direct to the upstream and through the broker, plus the broker's CPU per call.

    With httpx2 clients the client process saturates its core at about the direct
    rate, so it cannot show what the broker itself sustains; this can.
    """
    payload = json.dumps({"credential": CRED, "method": "GET", "path": UPSTREAM_PATH}).encode()
    requests = {
        "direct": b"GET " + UPSTREAM_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer dummy\r\n\r\n",
        "broker": b"POST /v1/request HTTP/1.1\r\nHost: outloop\r\nContent-Type: application/json"
        b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload,
    }
    targets = {"direct": ["--tcp", f"127.0.0.1:{world.port}"], "broker": ["--unix", world.sock]}
    out: dict[str, float] = {}
    for name in ("direct", "broker"):
        request_file = world.root / f"{name}.http"
        request_file.write_bytes(requests[name])
        command = [
            sys.executable,
            str(HERE / "loadgen.py"),
            *targets[name],
            "--request",
            str(request_file),
            "--clients",
            str(clients),
        ]
        _loadgen(command, min(1.0, seconds), world.workspace)  # warm-up
        pid = world.broker.pid
        cpu, workers = cpu_seconds(pid), workers_cpu_seconds(pid)
        result = _loadgen(command, seconds, world.workspace)
        out[name] = result["per_second"]
        out[name + "_calls"] = result["calls"]
        calls = max(result["calls"], 1)
        if name == "broker":
            out["broker_cpu_ms"] = (cpu_seconds(pid) - cpu) * 1000 / calls
            out["workers_cpu_ms"] = (workers_cpu_seconds(pid) - workers) * 1000 / calls
    return out


def _loadgen(command: list[str], seconds: float, cwd: Path) -> dict[str, float]:
    done = subprocess.run(
        [*command, "--seconds", f"{seconds:g}"], capture_output=True, text=True, timeout=seconds + 60, cwd=cwd
    )
    if done.returncode != 0:
        sys.exit(f"loadgen failed: {done.stderr.strip()[-500:]}")
    result: dict[str, float] = json.loads(done.stdout)
    if result["not_ok"]:
        sys.exit(f"loadgen: {result['not_ok']:.0f} answers were not 200")
    return result


def _audit_records(home: Path) -> int:
    return sum(sum(1 for _ in p.open("rb")) for p in (home / "state" / "audit").glob("*.jsonl"))


@dataclass
class BenchWorld:
    """A throw-away Outloop home with one tenant, a running `outloop broker` and upstream."""

    root: Path
    home: Path
    workspace: Path
    env: dict[str, str]
    port: int
    broker: subprocess.Popen[bytes]

    @property
    def sock(self) -> str:
        return str(self.home / "broker.sock")


@contextlib.contextmanager
def bench_world(prefix: str, keep: bool = False, workers: int | None = None) -> Iterator[BenchWorld]:
    """Private Secret Service, fast upstream, tenant "bench" with credential CRED, and
    `outloop broker` (with `workers` forwarding workers if given, else its default), all
    in a temp folder; everything stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))  # short: the socket path has a limit
    home, workspace = root / "home", root / "ws"
    workspace.mkdir()
    env = dict(os.environ, OUTLOOP_HOME=str(home))
    env.pop("OUTLOOP_SOCKET", None)
    env.pop("OUTLOOP_DEBUG", None)
    procs: list[subprocess.Popen[bytes]] = []
    broker: subprocess.Popen[bytes] | None = None
    try:
        procs += _spawn_secret_service(root, env)
        upstream = subprocess.Popen([sys.executable, str(HERE / "upstream_fast.py")], stdout=subprocess.PIPE, env=env)
        procs.append(upstream)
        assert upstream.stdout is not None
        port = int(upstream.stdout.readline())

        _outloop(env, "tenant", "add", "bench")
        _outloop(env, "workspace", "add", "bench", str(workspace))
        _outloop(
            env,
            "credential",
            "add",
            "bench",
            CRED,
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--allow",
            "GET /**",
            stdin=SECRET + "\n",
        )
        if workers is not None:
            config = home / "config.toml"
            doc = tomllib.loads(config.read_text())
            doc.setdefault("broker", {})["forward_workers"] = workers
            config.write_text(tomli_w.dumps(doc))

        log = open(root / "broker.log", "wb")  # noqa: SIM115 - closed with the temp folder
        broker = subprocess.Popen([OUTLOOP, "broker"], env=env, stdout=log, stderr=log, cwd=root)
        world = BenchWorld(root, home, workspace, env, port, broker)
        deadline = time.monotonic() + 20
        while not os.path.exists(world.sock):
            if broker.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the broker did not start: {(root / 'broker.log').read_text()}")
            time.sleep(0.05)
        yield world
    finally:
        if broker is not None:
            broker.terminate()
            try:
                broker.wait(10)
            except subprocess.TimeoutExpired:
                broker.kill()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=2000, help="sequential calls of each kind")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per throughput run")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder, print it")
    parser.add_argument("--workers", type=int, help="[broker] forward_workers (default: the broker's own)")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy the broker during a brokered throughput run (raw collapsed stacks to FILE; needs py-spy)",
    )
    parser.add_argument(
        "--profile-path",
        choices=("request", "proxy"),
        default="request",
        help="which run --profile samples: /v1/request or /v1/proxy",
    )
    args = parser.parse_args()
    profile_file = os.path.abspath(args.profile) if args.profile else None

    with bench_world("olb-", keep=args.keep, workers=args.workers) as world:
        env, home, broker, port, sock = world.env, world.home, world.broker, world.port, world.sock
        os.chdir(world.workspace)  # the broker maps this process to tenant "bench" by its cwd

        records_before = _audit_records(home)
        load = os.getloadavg()
        cpu = cpu_seconds(broker.pid)
        seq = sequential(port, sock, args.seq, seconds=60)
        seq_cpu = (cpu_seconds(broker.pid) - cpu) * 1000 / (len(seq["request"]) * 2 + 100)
        profile_run = "broker" if args.profile_path == "request" else "proxy"
        tput = throughput(port, sock, args.clients, args.seconds, broker.pid, profile_file, profile_run)
        lean = lean_throughput(world, args.clients, args.seconds)

        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), trust_env=False) as c:
            health = c.get("http://outloop/v1/health").json()
        # A lower bound: the throughput warm-up is not counted.
        brokered = (
            len(seq["request"])
            + len(seq["proxy"])
            + 100
            + tput["broker_calls"]
            + tput["proxy_calls"]
            + lean["broker_calls"]
        )
        records = _audit_records(home) - records_before
        verify = subprocess.run([OUTLOOP, "audit", "verify"], env=env, capture_output=True, text=True, timeout=120)

        d50, d99 = _pct(seq["direct"], 0.5), _pct(seq["direct"], 0.99)
        print(
            f"outloop broker bench: {os.cpu_count()} cores, python "
            f"{sys.version.split()[0]}, upstream bench/upstream_fast.py (raw asyncio), "
            f"keyring: private Secret Service; load average before "
            f"{load[0]:.2f} (other work on the machine skews calls/s; CPU per call less so)"
        )
        print(f"\n1. sequential latency, {len(seq['direct'])} calls each, one keep-alive connection, interleaved")
        print(f"   {'':<22}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'p50 +ms':>9}{'p99 +ms':>9}{'p50 x':>7}")
        for name, label in (
            ("direct", "direct httpx2"),
            ("request", "broker /v1/request"),
            ("proxy", "broker /v1/proxy"),
        ):
            p50, p99 = _pct(seq[name], 0.5), _pct(seq[name], 0.99)
            print(
                f"   {label:<22}{p50:9.3f}{p99:9.3f}{statistics.fmean(seq[name]):9.3f}"
                f"{p50 - d50:9.3f}{p99 - d99:9.3f}{p50 / d50:7.2f}"
            )
        added = max(_pct(seq["request"], 0.5), _pct(seq["proxy"], 0.5)) - d50
        print(f"   broker CPU per call (user+sys, all threads): {seq_cpu:.3f} ms")
        print(f"   goal p50 added <= 1.5 ms on both paths: {'met' if added <= 1.5 else 'NOT met'} ({added:.3f} ms)")
        ratio = tput["broker"] / tput["direct"]
        print(f"\n2. throughput, {args.clients} concurrent clients, {args.seconds:g} s each")
        print("   a. httpx2 clients (asyncio tasks in this process), as an agent's SDK would call")
        print(f"   direct httpx2        {tput['direct']:8.0f} calls/s")
        proxy_ratio = tput["proxy"] / tput["direct"]
        print(f"   broker /v1/request   {tput['broker']:8.0f} calls/s   {ratio:.2f} x direct")
        print(
            f"     CPU per call (user+sys): broker {tput['broker_cpu_ms']:.3f} ms, "
            f"its forwarding workers {tput['broker_workers_cpu_ms']:.3f} ms"
        )
        print(f"   broker /v1/proxy     {tput['proxy']:8.0f} calls/s   {proxy_ratio:.2f} x direct")
        print(f"     CPU per call (user+sys): broker {tput['proxy_cpu_ms']:.3f} ms")
        print("   b. bench/loadgen.py (own process, raw HTTP/1.1): what the broker sustains")
        print(f"   direct loadgen       {lean['direct']:8.0f} calls/s")
        print(f"   broker /v1/request   {lean['broker']:8.0f} calls/s   {lean['broker'] / lean['direct']:.2f} x direct")
        print(
            f"   CPU per call (user+sys): broker {lean['broker_cpu_ms']:.3f} ms, "
            f"its forwarding workers {lean['workers_cpu_ms']:.3f} ms"
        )
        met = min(ratio, proxy_ratio) >= 0.5 and lean["broker"] >= 1500
        print(f"   goal >= 0.50 x direct (a, both) and >= 1500 calls/s (b): {'met' if met else 'NOT met'}")
        audit = health.get("audit") or {}
        print(
            f"\n3. audit: {records} records written for >= {brokered:.0f} brokered calls "
            f"({records / brokered:.2f} per call); verify: "
            f"{'ok' if verify.returncode == 0 else 'FAILED'} ({verify.stdout.strip()[:120]})"
        )
        if audit:
            print(
                f"   group commit: {audit.get('records')} records in {audit.get('batches')} "
                f"batches, {audit.get('fsyncs')} fsyncs, largest batch "
                f"{audit.get('largest_batch')}"
            )
        ok = verify.returncode == 0 and records >= 2 * brokered
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
