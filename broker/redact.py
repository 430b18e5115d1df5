"""Redaction of managed secrets from everything the agent gets back.

Each secret is searched for in every form a server might echo it in: plain,
base64 (standard and URL-safe, at each of the three byte alignments, so a key
inside `base64("Bearer " + key)` is found), percent-encoded and JSON-escaped.
Matches become `[REDACTED:<credential>]`.

Encoders differ in which characters they escape (`quote()` keeps "/", JavaScript's
encodeURIComponent keeps "!*'()", Gson writes "=" as \u003d), so each character
that is not unreserved may appear raw, percent-encoded (either hex case) or
JSON-escaped, independently of the others.
"""

from __future__ import annotations

import base64
import json
import re
import string
from collections.abc import Callable, Iterable, Mapping
from typing import Any
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


# Characters every encoder leaves as they are.
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def _any_case(escape: str) -> str:
    """A regex for an ASCII escape sequence whose hex digits may be in either case."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c in "abcdefABCDEF" else re.escape(c)
                   for c in escape)


def _char_pattern(c: str) -> str:
    """A regex for one character of a secret: raw, percent-encoded or JSON-escaped.

    Escapes may be repeated (JSON inside a JSON string: `\\\"`; a URL inside a URL:
    `%252F`), so any run of backslashes may precede a JSON escape and any run of
    "25" may follow a "%".
    """
    if c in _UNRESERVED:
        return re.escape(c)
    alts = {re.escape(c),
            "".join("%(?:25)*" + _any_case(f"{b:02X}") for b in c.encode("utf-8"))}
    if c == " ":
        alts.add(r"\+")
    escapes = {json.dumps(c)[1:-1],  # \" \\ \n ..., or \uXXXX (pairs beyond the BMP)
               "".join(f"\\u{u:04x}" for u in _utf16(c))}
    if c in "\"/":
        escapes.add("\\" + c)  # "\/" is JSON's optional escape of "/"
    for escape in escapes:
        if escape.startswith("\\"):
            alts.add(_any_case(escape).replace(r"\\", r"\\+"))
    return "(?:" + "|".join(sorted(alts, key=len, reverse=True)) + ")"


def _utf16(c: str) -> list[int]:
    data = c.encode("utf-16-be")
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


def secret_pattern(secret: str) -> str:
    """A regex matching `secret` in any of the forms redaction looks for."""
    chars = "".join(_char_pattern(c) for c in secret)
    frags = sorted(_b64_fragments(secret.encode("utf-8")), key=len, reverse=True)
    return "|".join([chars, *map(re.escape, frags)])


class Redactor:
    """Replaces managed secrets (and, optionally, leak-rule matches) in text and bytes."""

    def __init__(self, secrets: Mapping[str, str] | Iterable[tuple[str, str]],
                 extra: SpanFinder | None = None) -> None:
        """`secrets` maps a label (the credential name) to its secret value, or lists
        (label, secret) pairs: tenants may each have a credential of the same name."""
        pairs = secrets.items() if isinstance(secrets, Mapping) else secrets
        # Longest first, so a secret is not half-replaced by a shorter one inside it.
        ordered = sorted(((label, secret) for label, secret in pairs if secret),
                         key=lambda p: len(p[1]), reverse=True)
        self._labels = [label for label, _ in ordered]
        self._count = len(ordered)
        source = "|".join(f"(?P<s{i}>{secret_pattern(secret)})"
                          for i, (_, secret) in enumerate(ordered))
        self._text_re = re.compile(source) if ordered else None
        # Literal non-ASCII characters become their UTF-8 bytes: right for bytes bodies.
        self._bytes_re = re.compile(source.encode("utf-8")) if ordered else None
        self._extra = extra

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def text(self, value: str) -> str:
        """`value` with every managed secret and leak-rule match replaced."""
        if self._text_re is not None:
            value = self._text_re.sub(self._replacement, value)
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
        return self._bytes_re.sub(lambda m: self._replacement(m).encode("utf-8"), value)

    def _replacement(self, match: re.Match[Any]) -> str:
        group = match.lastgroup
        assert group is not None
        return f"[REDACTED:{self._labels[int(group[1:])]}]"

    def headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(k, self.text(v)) for k, v in headers]
