"""What sessions cost, side by side in one invocation (DESIGN §10).

    .venv/bin/python bench/sessions.py [--rounds 10] [--calls 200] [--starts 20]

One throw-away home (bench/broker.py's bench_world: a private Secret Service, the
raw upstream, tenant "bench"), the broker restarted with `listen = "127.0.0.1:0"`.
Then, in rounds that alternate so drift hits every figure alike:

- this process, outside any session, in the workspace: direct GETs to the upstream
  and GET /v1/proxy/... on the Unix socket, identified by the folder rule;
- a child started by `outloop run` (so inside a session): direct GETs, the same
  proxy call on the socket (identified by its process tree: the session lookup)
  and over loopback TCP (the peer found once per connection from /proc/net/tcp,
  then the same tree rule), each on its own keep-alive connection;
- and `outloop run -- true` against `true`, started one after the other.

Printed: p50 of each, the milliseconds each adds to a direct call, and ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx2 as httpx
import tomli_w

_spec = importlib.util.spec_from_file_location("bench_broker", Path(__file__).resolve().parent / "broker.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_broker"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)
CRED, OUTLOOP, UPSTREAM_PATH, bench_world = bench.CRED, bench.OUTLOOP, bench.UPSTREAM_PATH, bench.bench_world

PROXY = f"/v1/proxy/{CRED}{UPSTREAM_PATH}"


def timed(call: object, n: int, out: list[float]) -> None:
    for _ in range(n):
        t = time.perf_counter()
        response = call()  # type: ignore[operator]
        out.append((time.perf_counter() - t) * 1000)
        if response.status_code != 200:
            sys.exit(f"HTTP {response.status_code}: {response.text[:200]}")


def child() -> int:
    """Inside `outloop run`: answer each line "N" with N interleaved calls' timings."""
    sock = os.environ["OUTLOOP_SOCKET"]
    token = os.environ["OUTLOOP_SESSION"]
    port, listen = int(sys.argv[2]), sys.argv[3]
    clients = {
        "direct": httpx.Client(trust_env=False, base_url=f"http://127.0.0.1:{port}"),
        "session_uds": httpx.Client(
            transport=httpx.HTTPTransport(uds=sock), base_url="http://outloop", trust_env=False
        ),
        "session_tcp": httpx.Client(base_url=listen, trust_env=False, headers={"Authorization": f"Bearer {token}"}),
    }
    paths = {"direct": UPSTREAM_PATH, "session_uds": PROXY, "session_tcp": PROXY}
    for name, client in clients.items():  # warm-up (the TCP peer lookup happens here, once)
        timed(lambda c=client, p=paths[name]: c.get(p), 30, [])
    for line in sys.stdin:
        n = int(line)
        if n == 0:
            break
        times: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(n):
            for name, client in clients.items():
                timed(lambda c=client, p=paths[name]: c.get(p), 1, times[name])
        print(json.dumps(times), flush=True)
    return 0


def p50(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--starts", type=int, default=20)
    args = parser.parse_args()
    with bench_world("ols-") as world:
        # Restart the broker with a loopback listener on a port the OS picks.
        world.broker.terminate()
        world.broker.wait(10)
        config = world.home / "config.toml"
        doc = tomllib.loads(config.read_text())
        doc.setdefault("broker", {})["listen"] = "127.0.0.1:0"
        config.write_text(tomli_w.dumps(doc))
        # A hand edit that widens access (another listen) is staged until the operator accepts it.
        bench._outloop(world.env, "config", "accept")
        log = open(world.root / "broker2.log", "wb")  # noqa: SIM115 - closed with the folder
        broker = subprocess.Popen([OUTLOOP, "broker"], env=world.env, stdout=log, stderr=log, cwd=world.root)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(world.sock):
                if broker.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the broker did not start: {(world.root / 'broker2.log').read_text()}")
                time.sleep(0.05)
            return measure(world, args)
        finally:
            broker.terminate()
            broker.wait(10)


def measure(world: object, args: argparse.Namespace) -> int:
    os.chdir(world.workspace)  # type: ignore[attr-defined]
    env = dict(world.env, OUTLOOP_SOCKET=world.sock)  # type: ignore[attr-defined]
    health = httpx.Client(transport=httpx.HTTPTransport(uds=world.sock), base_url="http://outloop", trust_env=False)  # type: ignore[attr-defined]
    listen = _listen_url(world)
    kid = subprocess.Popen(
        [OUTLOOP, "run", "--", sys.executable, __file__, "--child", str(world.port), listen],  # type: ignore[attr-defined]
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert kid.stdin is not None and kid.stdout is not None
    direct = httpx.Client(trust_env=False, base_url=f"http://127.0.0.1:{world.port}")  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {
        "direct": [],
        "folder_uds": [],
        "s_direct": [],
        "session_uds": [],
        "session_tcp": [],
    }
    for _name, call in (("direct", lambda: direct.get(UPSTREAM_PATH)), ("folder_uds", lambda: health.get(PROXY))):
        timed(call, 30, [])
    starts: dict[str, list[float]] = {"true": [], "run": []}
    for r in range(args.rounds):
        for _ in range(args.calls):
            timed(lambda: direct.get(UPSTREAM_PATH), 1, times["direct"])
            timed(lambda: health.get(PROXY), 1, times["folder_uds"])
        kid.stdin.write(f"{args.calls}\n")
        kid.stdin.flush()
        got = json.loads(kid.stdout.readline())
        times["s_direct"] += got["direct"]
        times["session_uds"] += got["session_uds"]
        times["session_tcp"] += got["session_tcp"]
        for _ in range(max(1, args.starts // args.rounds)):
            for name, argv in (("true", ["true"]), ("run", [OUTLOOP, "run", "--", "true"])):
                t = time.perf_counter()
                subprocess.run(argv, env=env, check=True)
                starts[name].append((time.perf_counter() - t) * 1000)
        del r
    kid.stdin.write("0\n")
    kid.stdin.close()
    kid.wait(30)
    d, sd = p50(times["direct"]), p50(times["s_direct"])
    folder, s_uds, s_tcp = p50(times["folder_uds"]) - d, p50(times["session_uds"]) - sd, p50(times["session_tcp"]) - sd
    print(f"calls: {len(times['direct'])} per figure, {args.rounds} alternating rounds")
    print(f"  direct                      p50 {d:.3f} ms (in the session: {sd:.3f} ms)")
    print(f"  socket, folder rule         p50 {p50(times['folder_uds']):.3f} ms   added +{folder:.3f} ms")
    print(f"  socket, session (tree)      p50 {p50(times['session_uds']):.3f} ms   added +{s_uds:.3f} ms")
    print(f"  TCP, session (peer + tree)  p50 {p50(times['session_tcp']):.3f} ms   added +{s_tcp:.3f} ms")
    print(f"  session lookup vs folder rule, added: {s_uds - folder:+.3f} ms (ratio {s_uds / folder:.2f})")
    print(f"  TCP vs socket, added:                 {s_tcp - s_uds:+.3f} ms (ratio {s_tcp / s_uds:.2f})")
    t, r = p50(starts["true"]), p50(starts["run"])
    print(f"start-up over {len(starts['true'])} runs each: `true` p50 {t:.1f} ms, `outloop run -- true` p50 {r:.1f} ms")
    print(f"  added {r - t:.1f} ms (ratio {r / t:.1f})")
    return 0


def _listen_url(world: object) -> str:
    """The TCP listener's URL, as a session sees it (the port is the OS's pick)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=world.sock), trust_env=False) as client:  # type: ignore[attr-defined]
        return str(client.get("http://outloop/v1/health").json()["listen"])


if __name__ == "__main__":
    sys.exit(child() if sys.argv[1:2] == ["--child"] else main())
