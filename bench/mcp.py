"""An MCP tool call against the same call through `outloop call`, in one invocation.

    /work/venv/bin/python bench/mcp.py [--calls 200]

The setup is bench/broker.py's: a throw-away OUTLOOP_HOME, a private Secret
Service, the raw loopback upstream (bench/upstream_fast.py) and `outloop broker`
as its own process; this process chdirs into the tenant's workspace.

Three ways to make the same brokered GET, interleaved call by call so that drift
hits all alike:

- mcp:     `outloop_request` on one long-lived `outloop mcp` stdio subprocess, driven
           by the MCP SDK's client: what Claude Code does for each tool call (the
           server is started once per session; its start is reported apart);
- call:    `outloop call api GET ...` as a new process each time: what an agent's
           Bash tool does;
- socket:  POST /v1/request on the socket from this process (stdlib client): the
           broker's own cost, the floor under both.

Prints p50 and p90 of each and the differences.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Run as a script, this folder comes first on sys.path, where this file would stand in for
# the `mcp` package and bench/broker.py for the `broker` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _bench_broker() -> Any:
    """bench/broker.py (its setup helpers), loaded by path."""
    spec = importlib.util.spec_from_file_location("bench_broker", HERE / "broker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


_bb = _bench_broker()
_pct = _bb._pct

VENV_BIN = Path(sys.executable).parent
OUTLOOP = str(VENV_BIN / "outloop")
CRED = "api"
UPSTREAM_PATH = "/v1/items"


async def measure(env: dict[str, str], sock: Path, workspace: Path, calls: int) -> dict[str, list[float]]:
    from mcp import Client, StdioServerParameters

    from broker.client import call as socket_call

    payload = {"credential": CRED, "method": "GET", "path": UPSTREAM_PATH}
    times: dict[str, list[float]] = {"mcp": [], "call": [], "socket": [], "mcp_start": []}
    t = time.perf_counter()
    params = StdioServerParameters(command=OUTLOOP, args=["mcp"], cwd=str(workspace), env=env)
    async with Client(params) as client:
        times["mcp_start"].append((time.perf_counter() - t) * 1000)

        async def mcp_once() -> None:
            result = await client.call_tool("outloop_request", payload)
            text = result.content[0].text
            if result.is_error or json.loads(text)["status"] != 200:
                sys.exit(f"mcp call failed: {text[:300]}")

        def call_once() -> None:
            done = subprocess.run(
                [OUTLOOP, "call", CRED, "GET", UPSTREAM_PATH],
                cwd=workspace,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if done.returncode != 0:
                sys.exit(f"outloop call failed ({done.returncode}): {done.stderr.strip()}")

        def socket_once() -> None:
            resp = socket_call(sock, payload, timeout=60)
            if resp.status != 200 or resp.json()["status"] != 200:
                sys.exit(f"socket call failed: HTTP {resp.status}")

        for _ in range(5):  # warm-up: connections, caches, the secret lookup
            await mcp_once()
            call_once()
            socket_once()
        for _ in range(calls):
            t = time.perf_counter()
            await mcp_once()
            times["mcp"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            call_once()
            times["call"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            socket_once()
            times["socket"].append((time.perf_counter() - t) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls of each kind")
    args = parser.parse_args()

    with _bb.bench_world("olm-") as world:
        env, sock, workspace = world.env, Path(world.sock), world.workspace
        os.environ.update(env)  # this process talks to the same broker and keyring
        os.chdir(workspace)  # the broker maps this process to tenant "bench" by its cwd

        times = asyncio.run(measure(env, sock, workspace, args.calls))

        p = {k: (_pct(v, 0.5), _pct(v, 0.9)) for k, v in times.items() if k != "mcp_start"}
        print(
            f"outloop MCP bench: {os.cpu_count()} cores, python {sys.version.split()[0]}, "
            f"{args.calls} calls of each kind, interleaved, loopback upstream"
        )
        print(f"{'path':<44}{'p50 ms':>10}{'p90 ms':>10}")
        labels = {
            "mcp": "MCP tool call (outloop mcp over stdio)",
            "call": "outloop call (a new process per call)",
            "socket": "POST /v1/request on the socket (floor)",
        }
        for key in ("mcp", "call", "socket"):
            print(f"{labels[key]:<44}{p[key][0]:>10.2f}{p[key][1]:>10.2f}")
        mcp50, call50, sock50 = p["mcp"][0], p["call"][0], p["socket"][0]
        print(
            f"MCP over the socket floor: +{mcp50 - sock50:.2f} ms p50; "
            f"outloop call over the floor: +{call50 - sock50:.2f} ms p50"
        )
        print(f"outloop call / MCP tool call (p50): {call50 / mcp50:.1f}x")
        print(f"starting `outloop mcp` (once per Claude Code session): {times['mcp_start'][0]:.0f} ms")
        return 0


if __name__ == "__main__":
    sys.exit(main())
