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


def timed(argv: list[str], stdin: bytes, env: dict[str, str], cwd: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, input=stdin, env=env, cwd=cwd, capture_output=True, check=False)
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    with tempfile.TemporaryDirectory(prefix="ol-bench-") as tmp:
        env = dict(os.environ, OUTLOOP_HOME=str(Path(tmp) / "home"), OUTLOOP_SOCKET=str(Path(tmp) / "b.sock"))
        env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.null.Keyring"  # no keyring daemon in the figure
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
            rows = {
                "python -c pass": timed([sys.executable, "-c", "pass"], b"", env, str(work), n),
                "outloop hook pre": timed([OUTLOOP, "hook", "pre"], pre, env, str(work), n),
                "outloop hook post": timed([OUTLOOP, "hook", "post"], post, env, str(work), n),
                "outloop call": timed([OUTLOOP, "call", "api", "GET", "/x"], b"", env, str(work), n),
            }
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
