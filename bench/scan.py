"""Leak scanner figures: Outloop against detect-secrets 1.5.0 on the same corpus, in
one run; then write-to-alert latency of the live watcher.

    /work/venv/bin/pip install detect-secrets==1.5.0   # the peer
    python bench/scan.py [--files 3000] [--writes 200] [--ds-procs 2]

Prints recall on planted keys, false positives per MB of clean files, MB/s and
files/s for both scanners, the throughput ratio, and the watcher's p50 / p95
latency from a file write to the alert event over writes that include brand-new
nested folders, saves by rename and appends.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import Corpus, generate  # noqa: E402

from broker.events import AlertOpened  # noqa: E402
from broker.leaks import rules as L  # noqa: E402
from broker.leaks.alerts import AlertStore  # noqa: E402
from broker.leaks.scan import scan_tree  # noqa: E402

Hits = dict[Path, set[int]]


def score(corpus: Corpus, recall_hits: Hits, all_hits: Hits) -> tuple[float, int, float]:
    """Recall over planted keys, false positives in clean files, and per MB of them."""
    found = sum(1 for p in corpus.plants if p.line in recall_hits.get(p.path, set()))
    clean = corpus.clean_files()
    fps = sum(len(all_hits.get(path, ())) for path in clean)
    clean_mb = sum(f.stat().st_size for f in clean) / 1e6
    return found / len(corpus.plants), fps, fps / clean_mb


def run_outloop(corpus: Corpus) -> tuple[Hits, Hits, float, int, int]:
    t0 = time.perf_counter()
    report = scan_tree(corpus.root)
    elapsed = time.perf_counter() - t0
    provider: Hits = defaultdict(set)
    everything: Hits = defaultdict(set)
    for f in report.findings:
        everything[f.path].add(f.line)
        if f.rule != L.GENERIC_RULE_ID:  # recall counts provider rules, not the catch-all
            provider[f.path].add(f.line)
    return provider, everything, elapsed, report.bytes_scanned, report.files_scanned


def run_detect_secrets(corpus: Corpus, procs: int) -> tuple[Hits, float]:
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    files = [str(p) for p in corpus.files]
    t0 = time.perf_counter()
    with default_settings():
        secrets = SecretsCollection()
        secrets.scan_files(*files, num_processors=procs)
    elapsed = time.perf_counter() - t0
    hits: Hits = defaultdict(set)
    for filename, secret in secrets:
        hits[Path(os.path.abspath(filename))].add(secret.line_number)
    return hits, elapsed


async def latency(writes: int) -> tuple[list[float], int]:
    from broker.leaks.watcher import LeakWatcher

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        (ws / "src").mkdir(parents=True)
        (ws / "logs").mkdir()
        (ws / "logs" / "app.log").write_text("boot\n")
        store = AlertStore(Path(tmp) / "state" / "alerts.jsonl")
        arrived: dict[str, float] = {}
        events: asyncio.Queue[None] = asyncio.Queue()

        def on_event(event: object) -> None:
            if isinstance(event, AlertOpened):
                arrived.setdefault(event.alert.fingerprint, time.perf_counter())
                events.put_nowait(None)

        store.subscribe(on_event)
        watcher = LeakWatcher([("bench", ws)], lambda: {}, store)
        await watcher.start()
        await watcher.wait_ready()
        samples: list[float] = []
        missed = 0

        for i in range(writes):
            token = "ghp_" + L.fake(L.A62, 36, f"bench-latency-{i}")
            fp = hashlib.sha256(token.encode()).hexdigest()
            kind = i % 4
            t0 = time.perf_counter()
            if kind == 0:  # a brand-new nested folder
                d = ws / f"feature{i}" / "deep" / "er"
                d.mkdir(parents=True)
                (d / ".env").write_text(f"GITHUB_TOKEN={token}\n")
            elif kind == 1:  # save by rename
                tmpf = ws / "src" / f".settings{i}.py.swp~"
                tmpf.write_text(f"TOKEN = '{token}'\n")
                os.replace(tmpf, ws / "src" / f"settings{i % 7}.py")
            elif kind == 2:  # an append
                with (ws / "logs" / "app.log").open("a") as f:
                    f.write(f"auth with {token}\n")
            else:  # a plain write
                (ws / "src" / f"config{i}.js").write_text(f"export const k = '{token}';\n")
            deadline = t0 + 5.0
            while fp not in arrived and time.perf_counter() < deadline:
                try:
                    await asyncio.wait_for(events.get(), deadline - time.perf_counter())
                except TimeoutError:
                    break
            if fp in arrived:
                samples.append((arrived[fp] - t0) * 1000)
            else:
                missed += 1
        await watcher.stop()
        return samples, missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--ds-procs", type=int, default=2)
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        corpus = generate(Path(tmp) / "corpus", args.files)
        total = sum(f.stat().st_size for f in corpus.files)
        print(
            f"corpus: {len(corpus.files)} files, {total / 1e6:.1f} MB, "
            f"{len(corpus.plants)} planted keys ({len(L.RULES)} rules), "
            f"{len(corpus.clean_files())} clean files"
        )
        provider, everything, secs, nbytes, nfiles = run_outloop(corpus)
        recall, fps, fp_mb = score(corpus, provider, everything)
        ours = nbytes / 1e6 / secs
        print(
            f"outloop        recall {recall:6.1%}  FP {fps:5d} ({fp_mb:7.2f}/MB clean)  "
            f"{ours:6.2f} MB/s  {nfiles / secs:7.0f} files/s  (1 process)"
        )
        if not args.skip_peer:
            ds_hits, ds_secs = run_detect_secrets(corpus, args.ds_procs)
            ds_recall, ds_fps, ds_fp_mb = score(corpus, ds_hits, ds_hits)
            theirs = total / 1e6 / ds_secs
            print(
                f"detect-secrets recall {ds_recall:6.1%}  FP {ds_fps:5d} ({ds_fp_mb:7.2f}/MB "
                f"clean)  {theirs:6.2f} MB/s  {len(corpus.files) / ds_secs:7.0f} files/s  "
                f"({args.ds_procs} processes)"
            )
            print(f"throughput ratio outloop / detect-secrets: {ours / theirs:.1f}x")
    samples, missed = asyncio.run(latency(args.writes))
    if samples:
        q = statistics.quantiles(samples, n=100)
        print(
            f"write-to-alert over {args.writes} writes (new folders, renames, appends, "
            f"writes): p50 {statistics.median(samples):.0f} ms  p95 {q[94]:.0f} ms  "
            f"max {max(samples):.0f} ms  missed {missed}"
        )
    else:
        print(f"write-to-alert: every one of {args.writes} writes missed")


if __name__ == "__main__":
    main()
