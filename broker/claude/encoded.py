"""Keys hidden in hex or base64: what `cat .env | base64` or `xxd -p` prints.

The leak rules look at text as it is. An agent's tool output can carry a key
encoded: base64 of a whole `.env` file, hex of a token. This module finds runs
of base64 or hex in a text, decodes those that decode to text, and lets the
caller scan the decoded text with the same rules. A finding inside a run is
reported at the run, and redaction replaces the whole run.

Plain functions; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Shorter runs cannot hold a key worth the name (an 20-character key is 28 in base64).
MIN_B64 = 24
MIN_HEX = 32
_B64_RUN = re.compile(rf"[A-Za-z0-9+/_-]{{{MIN_B64},}}={{0,2}}")
_HEX_RUN = re.compile(rf"\b(?:[0-9a-fA-F]{{2}}){{{MIN_HEX // 2},}}\b")
# `xxd -p` and `od` wrap their output; base64 wraps at 76. A wrapped run is joined first.
# It starts only where a run starts and its runs never give back characters: tried from
# every position of a long line with no newline (`base64 -w0` of a big file), the plain
# pattern took time quadratic in the line (hours for a megabyte).
_WRAPPED = re.compile(r"(?<![A-Za-z0-9+/=])(?:[A-Za-z0-9+/=]{40,}+\r?\n)+[A-Za-z0-9+/=]{4,}+")


@dataclass(frozen=True)
class Run:
    """A span of `text` that decodes to `decoded`."""

    start: int
    end: int
    decoded: str
    encoding: str  # "base64" | "hex"


def _printable(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    good = sum(1 for c in text if c.isprintable() or c in "\n\r\t")
    return text if good / len(text) > 0.9 else None


def _b64(raw: str) -> bytes | None:
    text = raw.rstrip("=")
    alt = "-_" if ("-" in text or "_" in text) else None
    padded = text + "=" * (-len(text) % 4)
    try:
        if alt:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None


def runs(text: str) -> Iterator[Run]:
    """Every hex or base64 run in `text` that decodes to readable text."""
    seen: set[tuple[int, int]] = set()
    for m in _WRAPPED.finditer(text):
        joined = re.sub(r"\s", "", m.group(0))
        data = _b64(joined)
        decoded = _printable(data) if data else None
        if decoded:
            seen.add((m.start(), m.end()))
            yield Run(m.start(), m.end(), decoded, "base64")
    for m in _HEX_RUN.finditer(text):
        if any(s <= m.start() < e for s, e in seen):
            continue
        decoded = _printable(bytes.fromhex(m.group(0)))
        if decoded:
            seen.add((m.start(), m.end()))
            yield Run(m.start(), m.end(), decoded, "hex")
    for m in _B64_RUN.finditer(text):
        if any(s <= m.start() < e for s, e in seen):
            continue
        data = _b64(m.group(0))
        decoded = _printable(data) if data else None
        if decoded:
            yield Run(m.start(), m.end(), decoded, "base64")


def redact_runs(text: str, has_secret: Callable[[str], bool]) -> tuple[str, int]:
    """`text` with every run whose decoded text holds a secret replaced; and how many."""
    hits = [r for r in runs(text) if has_secret(r.decoded)]
    if not hits:
        return text, 0
    out: list[str] = []
    at = 0
    for r in sorted(hits, key=lambda r: r.start):
        if r.start < at:
            continue
        out.append(text[at : r.start])
        out.append(f"[REDACTED:{r.encoding}]")
        at = r.end
    out.append(text[at:])
    return "".join(out), len(hits)
