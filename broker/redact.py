"""Redaction of managed secrets from everything the agent gets back.

Each secret is searched for in every form a server might echo it in: plain,
base64 (standard and URL-safe, at each of the three byte alignments, so a key
inside `base64("Bearer " + key)` is found), percent-encoded and JSON-escaped.
Matches become `[REDACTED:<credential>]`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import quote, quote_plus

# A base64 fragment shorter than this is too likely to occur by chance.
MIN_FRAGMENT = 8

SpanFinder = Callable[[str], Iterable[tuple[int, int, str]]]


def _b64_fragments(raw: bytes) -> set[str]:
    """Base64 text that encodes `raw` wherever it sits in a larger byte string.

    For each of the three alignments, keep only the characters whose 6 bits come
    entirely from `raw`: the first ceil(8k/6) characters mix in preceding bytes,
    the tail mixes in following ones.
    """
    found: set[str] = set()
    n = len(raw)
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + raw).decode("ascii")
        start = -(-8 * k // 6)
        end = 8 * (k + n) // 6
        frag = enc[start:end]
        if len(frag) >= MIN_FRAGMENT:
            found.add(frag)
            found.add(frag.translate(str.maketrans("+/", "-_")))
    return found


def encodings(secret: str) -> set[str]:
    """Every textual form of `secret` that redaction looks for."""
    raw = secret.encode("utf-8")
    forms = {secret, quote(secret, safe=""), quote_plus(secret, safe=""),
             json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    forms |= {f.replace("/", "\\/") for f in list(forms)}  # JSON's optional escaped slash
    for f in list(forms):
        if "%" in f:
            forms.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), f))
    forms |= _b64_fragments(raw)
    return {f for f in forms if f}


class Redactor:
    """Replaces managed secrets (and, optionally, leak-rule matches) in text and bytes."""

    def __init__(self, secrets: Mapping[str, str] | Iterable[tuple[str, str]],
                 extra: SpanFinder | None = None) -> None:
        """`secrets` maps a label (the credential name) to its secret value, or lists
        (label, secret) pairs: tenants may each have a credential of the same name."""
        pairs = secrets.items() if isinstance(secrets, Mapping) else secrets
        self._label_of: dict[str, str] = {}
        self._count = 0
        for label, secret in pairs:
            self._count += 1
            for form in encodings(secret):
                self._label_of.setdefault(form, label)
        # Longest first, so a secret is not half-replaced by a shorter overlapping form.
        forms = sorted(self._label_of, key=len, reverse=True)
        self._text_re = re.compile("|".join(map(re.escape, forms))) if forms else None
        self._bytes_re = (
            re.compile(b"|".join(re.escape(f.encode("utf-8")) for f in forms)) if forms else None
        )
        self._extra = extra

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def text(self, value: str) -> str:
        """`value` with every managed secret and leak-rule match replaced."""
        if self._text_re is not None:
            value = self._text_re.sub(lambda m: f"[REDACTED:{self._label_of[m.group(0)]}]", value)
        if self._extra is not None:
            spans = sorted(self._extra(value), reverse=True)
            for start, end, rule in spans:
                value = value[:start] + f"[REDACTED:{rule}]" + value[end:]
        return value

    def bytes(self, value: bytes) -> bytes:
        """Like text(), for bodies that may not be UTF-8."""
        try:
            return self.text(value.decode("utf-8")).encode("utf-8")
        except UnicodeDecodeError:
            pass
        if self._bytes_re is None:
            return value  # leak rules are text rules
        return self._bytes_re.sub(
            lambda m: f"[REDACTED:{self._label_of[m.group(0).decode('utf-8')]}]".encode(), value
        )

    def headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(k, self.text(v)) for k, v in headers]
