"""Redaction cost per response against the number of managed secrets, in one invocation.

    python bench/redact.py [--sizes 1,10,50,100,300] [--repeat 50]

The broker redacts every managed secret (of every tenant) from every response.
The baseline is one regex holding every secret's pattern (what `Redactor` does
with at most `DIRECT_MAX` secrets); Outloop's path with more secrets first picks,
with a literal-piece prefilter, the secrets a body may hold. Both run on the
same 13 KB JSON body, once clean and once holding one of the secrets (which
must come out redacted). Leak-rule redaction, which runs on every response
as well, is timed on its own for scale.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import redact  # noqa: E402
from broker.leakrules import iter_provider_key_spans  # noqa: E402
from broker.redact import Redactor  # noqa: E402

BODY = json.dumps({"items": [
    {"id": i, "name": f"item {i}", "description": "lorem ipsum dolor sit amet " * 3,
     "url": f"https://example.com/a/{i}?x=1", "sha": secrets.token_hex(20)}
    for i in range(70)]})


def _per_call(redactor: Redactor, body: bytes, repeat: int) -> float:
    redactor.bytes(body)  # compiles what this body needs
    start = time.perf_counter()
    for _ in range(repeat):
        redactor.bytes(body)
    return (time.perf_counter() - start) / repeat * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,50,100,300")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    clean = BODY.encode()
    print(f"body {len(clean) / 1024:.1f} KB JSON; ms per response (lower is better)")
    print(f"{'secrets':>8} {'one regex':>10} {'prefilter':>10} {'ratio':>7} "
          f"{'one regex, hit':>15} {'prefilter, hit':>15}")
    default_max = redact.DIRECT_MAX
    for n in (int(x) for x in args.sizes.split(",")):
        pairs = [(f"cred{i}", "sk-" + secrets.token_urlsafe(30)) for i in range(n)]
        hit = clean.replace(b"item 7", pairs[-1][1].encode())
        redact.DIRECT_MAX = 10**9
        baseline = Redactor(pairs)
        redact.DIRECT_MAX = default_max
        ours = Redactor(pairs)
        for r in (baseline, ours):
            out = r.bytes(hit)
            if pairs[-1][1].encode() in out or b"[REDACTED:" not in out:
                sys.exit("a secret was not redacted")
        repeat = max(3, args.repeat // max(1, n // 10))
        b_clean, o_clean = _per_call(baseline, clean, repeat), _per_call(ours, clean, args.repeat)
        b_hit, o_hit = _per_call(baseline, hit, repeat), _per_call(ours, hit, args.repeat)
        print(f"{n:>8} {b_clean:>10.3f} {o_clean:>10.3f} {b_clean / o_clean:>6.1f}x "
              f"{b_hit:>15.3f} {o_hit:>15.3f}")
    rules = Redactor([], iter_provider_key_spans)
    print(f"leak-rule redaction of the same body (any number of secrets): "
          f"{_per_call(rules, clean, args.repeat):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
