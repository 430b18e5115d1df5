"""`outloop import` of a workspace with 200 .env files against `outloop scan` of the same tree.

    python bench/import.py [--files 200] [--rounds 3]

Each round builds a fresh tree (200 service folders, each with a `.env` holding
the team's shared OpenAI key, its own Stripe key and a few plain settings, and
10 source files), then times, alternating which runs first: `outloop scan ROOT`,
`outloop import ROOT --dry-run` (the plan: read, detect, keyring look-ups) and
`outloop import ROOT --yes` (the plan, then 201 credentials into the keyring and
config.toml and 200 atomic rewrites). The keyring is a private Secret Service
(dbus-daemon + gnome-keyring-daemon under a temp folder), as in bench/broker.py.
Prints the median of each and the ratios to the scan.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker import __version__  # noqa: E402
from broker.leaks.rules import ALPHA, DIGITS, RULES_BY_ID, fake, find_secrets  # noqa: E402

OUTLOOP = str(Path(sys.executable).parent / "outloop")


def _openai_key() -> str:
    text = RULES_BY_ID["openai-project-key"].true_positives[0]
    return next(m.value(text) for m in find_secrets(text, env_like=True))


def build(root: Path, files: int) -> None:
    shared = _openai_key()
    for i in range(files):
        folder = root / f"svc-{i:03d}"
        (folder / "src").mkdir(parents=True)
        stripe = "sk_live_" + fake(ALPHA + DIGITS, 40, seed=f"bench-{i}")
        (folder / ".env").write_text(
            f"# service {i}\nNODE_ENV=production\nPORT={3000 + i}\n"
            f"OPENAI_API_KEY={shared}\nSTRIPE_SECRET_KEY={stripe}\nLOG_LEVEL=info\n"
        )
        for j in range(10):
            (folder / "src" / f"mod{j}.py").write_text(
                f'"""Module {j} of service {i}."""\n\n'
                + "".join(f"def f{k}(x):\n    return x + {k}\n\n" for k in range(40))
            )


def spawn_secret_service(root: Path, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """A private dbus-daemon and gnome-keyring-daemon under `root` (the user's keyring is never opened)."""
    if not (shutil.which("dbus-daemon") and shutil.which("gnome-keyring-daemon")):
        sys.exit("this benchmark needs dbus-daemon and gnome-keyring-daemon (apt-get install dbus gnome-keyring)")
    for sub in ("data", "runtime", "config"):
        (root / sub).mkdir(parents=True, mode=0o700)
    env.update(
        XDG_DATA_HOME=str(root / "data"),
        XDG_RUNTIME_DIR=str(root / "runtime"),
        XDG_CONFIG_HOME=str(root / "config"),
        PYTHON_KEYRING_BACKEND="keyring.backends.SecretService.Keyring",
    )
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert bus.stdout is not None
    env["DBUS_SESSION_BUS_ADDRESS"] = bus.stdout.readline().decode().strip()
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
    probe = [sys.executable, "-c", "import keyring; keyring.set_password('outloop-bench', 'p', 'x')"]
    deadline = time.monotonic() + 20
    while subprocess.run(probe, env=env, capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            sys.exit("the private Secret Service did not come up")
        time.sleep(0.2)
    return [daemon, bus]


def timed(argv: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - t0
    if done.returncode not in ok:
        sys.exit(f"{' '.join(argv[1:3])} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="outloop-bench-import-"))
    env = dict(os.environ)
    procs = spawn_secret_service(base / "keyring", env)
    figures: dict[str, list[float]] = {"scan": [], "plan": [], "import": []}
    try:
        for r in range(args.rounds):
            home, root = base / f"home-{r}", base / f"tree-{r}"
            env.update(OUTLOOP_HOME=str(home), OUTLOOP_SOCKET=str(base / f"b{r}.sock"))
            build(root, args.files)
            for argv in (["tenant", "add", f"t{r}"], ["workspace", "add", f"t{r}", str(root)]):
                timed([OUTLOOP, *argv], env)
            order = ["scan", "plan", "import"] if r % 2 == 0 else ["plan", "scan", "import"]
            for what in order:
                if what == "scan":
                    figures["scan"].append(timed([OUTLOOP, "scan", str(root)], env, ok=(1,)))
                elif what == "plan":
                    figures["plan"].append(timed([OUTLOOP, "import", str(root), "--dry-run"], env))
                else:
                    figures["import"].append(timed([OUTLOOP, "import", str(root), "--yes"], env))
            left = subprocess.run([OUTLOOP, "scan", str(root)], env=env, capture_output=True, text=True)
            if "OPENAI_API_KEY" in left.stdout or left.returncode not in (0, 1):
                sys.exit("the import left a key behind")
            shutil.rmtree(root)
    finally:
        for proc in procs:
            proc.terminate()
        shutil.rmtree(base, ignore_errors=True)
    scan = statistics.median(figures["scan"])
    print(f"outloop {__version__}: {args.files} .env files (+{args.files * 10} source files), {args.rounds} rounds")
    print(f"  outloop scan ROOT            median {scan:6.2f} s")
    for what, label in (("plan", "outloop import --dry-run"), ("import", "outloop import --yes")):
        value = statistics.median(figures[what])
        print(f"  {label:<28} median {value:6.2f} s  ({value / scan:.2f}x the scan)")
    keys = args.files + 1
    print(
        f"  per credential stored (import - plan) / {keys}: "
        f"{(statistics.median(figures['import']) - statistics.median(figures['plan'])) / keys * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
