"""Redaction cost per response against the number of managed secrets, in one invocation.

    python bench/redact.py [--sizes 1,10,50,100,300] [--repeat 50]

The broker redacts every managed secret (of every tenant) from every response.
The baseline is one regex holding every secret's pattern (what `Redactor` does
with at most `DIRECT_MAX` secrets); Outloop's path with more secrets first picks,
with a literal-piece prefilter, the secrets a body may hold. Both run on the
same 13 KB JSON body, once clean and once holding one of the secrets (which
must come out redacted). Leak-rule redaction, which runs on every response
as well, is timed on its own for scale, and its keyword pass against a regex
of the same keywords shaped as a trie (what it did before, the baseline).
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.leaks import redact  # noqa: E402
from broker.leaks import rules as leakrules  # noqa: E402
from broker.leaks.redact import Redactor  # noqa: E402
from broker.leaks.rules import iter_provider_key_spans  # noqa: E402

BODY = json.dumps(
    {
        "items": [
            {
                "id": i,
                "name": f"item {i}",
                "description": "lorem ipsum dolor sit amet " * 3,
                "url": f"https://example.com/a/{i}?x=1",
                "sha": secrets.token_hex(20),
            }
            for i in range(70)
        ]
    }
)


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
    print(
        f"{'secrets':>8} {'one regex':>10} {'prefilter':>10} {'ratio':>7} {'one regex, hit':>15} {'prefilter, hit':>15}"
    )
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
        print(f"{n:>8} {b_clean:>10.3f} {o_clean:>10.3f} {b_clean / o_clean:>6.1f}x {b_hit:>15.3f} {o_hit:>15.3f}")
    rules = Redactor([], iter_provider_key_spans)
    print(
        f"leak-rule redaction of the same body (any number of secrets): {_per_call(rules, clean, args.repeat):.3f} ms"
    )
    # The rules' keyword pass, which picks the rules a body may match: the trie-shaped
    # regex Outloop used before against the Aho-Corasick pass it uses now (which also
    # notes where each word is, and lowercases the body itself).
    text = clean.decode()
    lowered = text.lower()
    keywords = {kw for rule in leakrules.RULES for kw in rule.keywords}
    alternation = re.compile(trie_regex(keywords))
    found = {rule.id for rule in leakrules.Prepared(text).candidate_rules() if leakrules._gated(rule)}
    base, ours_kw = (
        _timed(lambda: alternation.findall(lowered), args.repeat),
        _timed(lambda: leakrules.Prepared(text).candidate_rules(), args.repeat),
    )
    print(
        f"keyword pass ({len(keywords)} keywords, {len(found)} rules hit): trie regex "
        f"{base:.3f} ms, Aho-Corasick {ours_kw:.3f} ms, {base / ours_kw:.1f}x"
    )
    return 0


def trie_regex(words: Iterable[str]) -> str:
    """A regex matching any of `words`, shaped as a trie so the engine does not retry
    every alternative at every position."""
    root: dict[str, dict] = {}  # type: ignore[type-arg]
    for w in words:
        node = root
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict[str, dict]) -> str:  # type: ignore[type-arg]
        alts = [re.escape(ch) + build(sub) for ch, sub in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(root)


def _timed(fn: Callable[[], object], repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000


if __name__ == "__main__":
    sys.exit(main())
