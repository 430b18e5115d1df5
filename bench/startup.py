"""Start-up of the agent-facing commands: `outloop hook pre`, `outloop hook post`, `outloop call`.

Each runs once per tool call of a coding agent, so its cost is mostly Python's start
and imports. Measured as wall time of a fresh process, p50 and p90 over N runs,
against `python -c pass` in the same run (the floor no Python command gets under).
`outloop call` runs against a real broker (`outloop broker`) on a throw-away home,
from an unmapped folder, so it is refused (exit 2) without an upstream: the figure is
the client's start-up plus one round trip on the socket.

    .venv/bin/python bench/startup.py [N]

Targets (issue 16): hook pre <= 40 ms, post <= 80 ms, call <= 40 ms p50.
`python -X importtime -m outloop_tui.cli hook pre < event.json` shows what dominates.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
OUTLOOP = str(BIN / "outloop")


def once(argv: list[str], stdin: bytes, env: dict[str, str], cwd: str) -> float:
    t = time.perf_counter()
    subprocess.run(argv, input=stdin, env=env, cwd=cwd, capture_output=True, check=False)
    return (time.perf_counter() - t) * 1000


def timed(
    commands: dict[str, tuple[list[str], bytes]], env: dict[str, str], cwd: str, n: int
) -> dict[str, list[float]]:
    """Each command n times, in alternating rounds (a load spike hits every figure alike),
    after one warm-up run each (bytecode written, files in the page cache)."""
    rows: dict[str, list[float]] = {name: [] for name in commands}
    for argv, stdin in commands.values():
        once(argv, stdin, env, cwd)
    for _ in range(n):
        for name, (argv, stdin) in commands.items():
            rows[name].append(once(argv, stdin, env, cwd))
    return rows


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    with tempfile.TemporaryDirectory(prefix="ol-bench-") as tmp:
        env = dict(os.environ, OUTLOOP_HOME=str(Path(tmp) / "home"), OUTLOOP_SOCKET=str(Path(tmp) / "b.sock"))
        env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.null.Keyring"  # no keyring daemon in the figure
        # An installed outloop runs from bytecode; without it every run would compile the sources.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        work = Path(tmp) / "work"
        work.mkdir()
        pre = json.dumps({"tool_name": "Bash", "tool_input": {"command": "ls -la"}, "cwd": str(work)}).encode()
        post = json.dumps(
            {
                "tool_name": "Bash",
                "tool_input": {"command": "ls"},
                "tool_response": {"stdout": "a.txt\nb.txt\n" * 200, "stderr": ""},
                "cwd": str(work),
            }
        ).encode()
        broker = subprocess.Popen([OUTLOOP, "broker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not Path(env["OUTLOOP_SOCKET"]).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            commands = {
                "python -c pass": ([sys.executable, "-c", "pass"], b""),
                "outloop hook pre": ([OUTLOOP, "hook", "pre"], pre),
                "outloop hook post": ([OUTLOOP, "hook", "post"], post),
                "outloop call": ([OUTLOOP, "call", "api", "GET", "/x"], b""),
            }
            rows = timed(commands, env, str(work), n)
        finally:
            broker.terminate()
            broker.wait(10)
    base = statistics.median(rows["python -c pass"])
    print(f"{'command':<20} {'p50 ms':>8} {'p90 ms':>8} {'x python':>9}   (n={n})")
    for name, values in rows.items():
        p50 = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{name:<20} {p50:8.1f} {p90:8.1f} {p50 / base:9.1f}")


if __name__ == "__main__":
    main()
