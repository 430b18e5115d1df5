"""Redaction of managed secrets from everything the agent gets back.

Each secret is searched for in every form a server might echo it in: plain,
base64 (standard and URL-safe, at each of the three byte alignments, so a key
inside `base64("Bearer " + key)` is found), base32 (at each of the five
alignments, either case), hex (either case), percent-encoded and JSON-escaped,
including `%xx` of every byte and `\\uXXXX` of every character (letters and digits
too). Matches become `[REDACTED:<credential>]`.

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
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

# What a response header whose name held a secret is called instead.
REDACTED_HEADER = "X-Outloop-Redacted"

# A base64 fragment shorter than this is too likely to occur by chance.
MIN_FRAGMENT = 8

# With more secrets than this, a body is first searched for literal pieces of
# each secret (see `_Prefilter`), and only the secrets found there are matched
# with their full patterns. One regex of every secret's pattern costs time in
# proportion to the number of secrets: 20 ms for a 13 KB body with 50 secrets.
DIRECT_MAX = 1
GRAM = 8  # the prefilter's piece length; anchors need 2 * GRAM - 1 characters

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


def _b32_fragments(raw: bytes) -> set[str]:
    """Base32 text that encodes `raw` wherever it sits in a larger byte string (as
    `_b64_fragments`, with 5 bits a character and five alignments), in either case."""
    found: set[str] = set()
    n = len(raw)
    for k in range(5):
        enc = base64.b32encode(b"\0" * k + raw).decode("ascii")
        frag = enc[-(-8 * k // 5) : 8 * (k + n) // 5]
        if len(frag) >= MIN_FRAGMENT:
            found |= {frag, frag.lower()}
    return found


def _whole_forms(secret: str) -> set[str]:
    """Forms that encode every character, literal ones included: hex, base32, and
    `%xx` of every byte and `\\uXXXX` of every character, in either case."""
    raw = secret.encode("utf-8")
    pct = "".join(f"%{b:02X}" for b in raw)
    uni = "".join(f"\\u{u:04x}" for u in _utf16_units(secret))
    forms = {raw.hex(), raw.hex().upper(), pct, pct.lower(), uni, uni.upper().replace("\\U", "\\u")}
    return forms | _b32_fragments(raw)


def encodings(secret: str) -> set[str]:
    """Every textual form of `secret` that redaction looks for."""
    raw = secret.encode("utf-8")
    forms = {
        secret,
        quote(secret, safe=""),
        quote_plus(secret, safe=""),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    forms |= {f.replace("/", "\\/") for f in list(forms)}  # JSON's optional escaped slash
    for f in list(forms):
        if "%" in f:
            forms.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), f))
    forms |= _b64_fragments(raw) | _whole_forms(secret)
    return {f for f in forms if f}


# Characters every encoder leaves as they are.
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def _any_case(escape: str) -> str:
    """A regex for an ASCII escape sequence whose hex digits may be in either case."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c in "abcdefABCDEF" else re.escape(c) for c in escape)


def _char_pattern(c: str) -> str:
    """A regex for one character of a secret: raw, percent-encoded or JSON-escaped.

    Escapes may be repeated (JSON inside a JSON string: `\\\"`; a URL inside a URL:
    `%252F`), so any run of backslashes may precede a JSON escape and any run of
    "25" may follow a "%".
    """
    if c in _UNRESERVED:
        return re.escape(c)
    alts = {re.escape(c), "".join("%(?:25)*" + _any_case(f"{b:02X}") for b in c.encode("utf-8"))}
    if c == " ":
        alts.add(r"\+")
    escapes = {
        json.dumps(c)[1:-1],  # \" \\ \n ..., or \uXXXX (pairs beyond the BMP)
        "".join(f"\\u{u:04x}" for u in _utf16(c)),
    }
    if c in '"/':
        escapes.add("\\" + c)  # "\/" is JSON's optional escape of "/"
    for escape in escapes:
        if escape.startswith("\\"):
            alts.add(_any_case(escape).replace(r"\\", r"\\+"))
    return "(?:" + "|".join(sorted(alts, key=len, reverse=True)) + ")"


def _utf16(c: str) -> list[int]:
    return _utf16_units(c)


def _utf16_units(text: str) -> list[int]:
    data = text.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def secret_pattern(secret: str) -> str:
    """A regex matching `secret` in any of the forms redaction looks for."""
    raw = secret.encode("utf-8")
    chars = "".join(_char_pattern(c) for c in secret)
    # Every byte percent-encoded (escapes repeated as in _char_pattern), every
    # character \\u-escaped (any run of backslashes), either case of hex digits.
    pct = "".join("%(?:25)*" + _any_case(f"{b:02X}") for b in raw)
    uni = "".join(_any_case(f"\\u{u:04x}").replace(r"\\", r"\\+") for u in _utf16_units(secret))
    # The whole base64 of the secret too (its last characters and padding included),
    # as a value of its own is written: base64("user:key") of Basic auth goes whole.
    whole = base64.b64encode(raw).decode("ascii")
    literal = _b64_fragments(raw) | _b32_fragments(raw) | {raw.hex(), raw.hex().upper()}
    literal |= {whole, whole.translate(str.maketrans("+/", "-_"))}
    frags = sorted(literal, key=len, reverse=True)
    return "|".join([chars, pct, uni, *map(re.escape, frags)])


# Runs of these characters hold every anchor (unreserved characters, plus
# base64's "+/="); a longer run around an anchor is fine.
_RUN_RE = re.compile(rf"[A-Za-z0-9._~+/=-]{{{2 * GRAM - 1},}}")
# Runs of escapes (%xx, \\uXXXX, with repeated "25"s and backslashes) long enough
# to spell an anchor, mixed with characters left as they are.
_ESCAPED_RUN_RE = re.compile(
    rf"(?:%(?:25)*[0-9A-Fa-f]{{2}}|\\+u[0-9A-Fa-f]{{4}}|[A-Za-z0-9._~+/=-]){{{2 * GRAM - 1},}}"
)
_ESCAPE_RE = re.compile(r"%(?:25)*([0-9A-Fa-f]{2})|\\+u([0-9A-Fa-f]{4})")


def _unescape(run: str) -> str:
    """A run of escapes with each undone (bytes of %xx as latin-1: anchors are ASCII)."""
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), run)


def _anchors(secret: str) -> list[str] | None:
    """Literal strings, one of which every form `secret_pattern` matches contains.

    The character-by-character forms keep the secret's unreserved characters as
    they are, so its longest unreserved run is in each of them; each base64
    fragment is itself literal. None if any is too short to look for.
    """
    runs = re.findall(r"[A-Za-z0-9._~-]+", secret)
    longest = max(runs, key=len, default="")
    raw = secret.encode("utf-8")
    anchors = [longest, *_b64_fragments(raw), *_b32_fragments(raw), raw.hex(), raw.hex().upper()]
    if any(len(a) < 2 * GRAM - 1 for a in anchors):
        return None
    return anchors


class _Prefilter:
    """Which secrets may be in a text, in time that does not grow with their number.

    Every GRAM-long piece of every anchor is indexed. An anchor of at least
    2 * GRAM - 1 characters inside a run of the text covers a piece that starts
    at a multiple of GRAM within that run, so only those pieces of the text are
    looked up. A piece found is a candidate, not a match: the full pattern decides.
    """

    def __init__(self, secrets: list[str]) -> None:
        self.always: set[int] = set()  # secrets with no usable anchor: always matched
        self.pieces: dict[str, set[int]] = {}
        for index, secret in enumerate(secrets):
            anchors = _anchors(secret)
            if anchors is None:
                self.always.add(index)
                continue
            for anchor in anchors:
                for i in range(len(anchor) - GRAM + 1):
                    self.pieces.setdefault(anchor[i : i + GRAM], set()).add(index)

    def candidates(self, text: str) -> set[int]:
        found = set(self.always)
        pieces = self.pieces
        runs = _RUN_RE.findall(text)
        if "%" in text or "\\" in text:
            # A secret with every character escaped holds no literal anchor: its
            # escapes, undone, hold the plain one.
            for m in _ESCAPED_RUN_RE.finditer(text):
                runs += _RUN_RE.findall(_unescape(m.group(0)))
        for run in runs:
            for i in range(0, len(run) - GRAM + 1, GRAM):
                hit = pieces.get(run[i : i + GRAM])
                if hit is not None:
                    found |= hit
        return found


class Redactor:
    """Replaces managed secrets (and, optionally, leak-rule matches) in text and bytes."""

    def __init__(
        self,
        secrets: Mapping[str, str] | Iterable[tuple[str, str]],
        extra: SpanFinder | None = None,
        extra_gate: Callable[[str], bool] | None = None,
    ) -> None:
        """`secrets` maps a label (the credential name) to its secret value, or lists
        (label, secret) pairs: tenants may each have a credential of the same name.
        `extra_gate(text)`, if given, is False only when `extra` finds nothing in
        `text` nor in any part of it."""
        pairs = secrets.items() if isinstance(secrets, Mapping) else secrets
        # Longest first, so a secret is not half-replaced by a shorter one inside it.
        ordered = sorted(((label, secret) for label, secret in pairs if secret), key=lambda p: len(p[1]), reverse=True)
        self._labels = [label for label, _ in ordered]
        self._count = len(ordered)
        # For StreamRedactor: how long a secret's forms can get, and whether one spans lines.
        self.longest_secret = max((len(secret.encode("utf-8")) for _, secret in ordered), default=0)
        self.secret_spans_lines = any("\n" in secret or "\r" in secret for _, secret in ordered)
        self._sources = [f"(?P<s{i}>{secret_pattern(secret)})" for i, (_, secret) in enumerate(ordered)]
        self._prefilter = _Prefilter([secret for _, secret in ordered]) if self._count > DIRECT_MAX else None
        self._compiled: dict[frozenset[int], re.Pattern[str]] = {}
        self._extra = extra
        self._extra_gate = extra_gate

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def text(self, value: str) -> str:
        """`value` with every managed secret and leak-rule match replaced."""
        pattern = self._pattern(value)
        if pattern is not None:
            value = pattern.sub(self._replacement, value)
        if self._extra is not None:
            spans = sorted(self._extra(value), reverse=True)
            for start, end, rule in spans:
                value = value[:start] + f"[REDACTED:{rule}]" + value[end:]
        return value

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, replacement) of each managed secret and leak-rule match in `text`,
        in order and not overlapping (a secret wins over a rule match that overlaps it)."""
        pattern = self._pattern(text)
        found = [(m.start(), m.end(), self._replacement(m)) for m in pattern.finditer(text)] if pattern else []
        if self._extra is None or (self._extra_gate is not None and not self._extra_gate(text)):
            return found
        taken = list(found)
        for start, end, rule in self._extra(text):
            if not any(start < e and s < end for s, e, _ in taken):
                found.append((start, end, f"[REDACTED:{rule}]"))
        return sorted(found)

    def bytes(self, value: bytes, _depth: int = 0) -> bytes:
        """Like text(), for bodies that may not be UTF-8: bytes that are not UTF-8 pass as
        they are, and the text among them is redacted as text is (leak rules included).

        A body that is gzip or zlib data without saying so (no Content-Encoding) is looked
        into too, as an agent's decoder would read it (see _unpacked): if what it unpacks
        to holds a secret, it is packed again, redacted. Packing nested deeper than
        MAX_PACKED_DEPTH, or unpacking to more than SNIFF_MAX, is not given (a bomb
        could hold a key in its first bytes)."""
        try:
            packed = _unpacked(value)
        except _TooLarge:
            return TOO_LARGE
        if packed is not None:
            streams, rest = packed
            if _depth >= MAX_PACKED_DEPTH:
                return TOO_DEEP  # packed inside packed inside ...: no honest server's answer
            cleaned = [(wbits, self.bytes(inner, _depth + 1)) for wbits, inner in streams]
            tail = self.bytes(rest, _depth + 1)
            if cleaned != streams or tail != rest:
                return b"".join(_pack(wbits, inner) for wbits, inner in cleaned) + tail
        return self.text(value.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")

    def _pattern(self, text: str) -> re.Pattern[str] | None:
        """The compiled pattern of the secrets that may be in `text`, or None for none."""
        if not self._count:
            return None
        if self._prefilter is None:
            which = frozenset(range(self._count))
        else:
            which = frozenset(self._prefilter.candidates(text))
            if not which:
                return None
        compiled = self._compiled.get(which)
        if compiled is None:
            # Group names keep each secret's index, so _replacement finds its label.
            source = "|".join(self._sources[i] for i in sorted(which))
            compiled = re.compile(source)
            if len(self._compiled) >= 256:
                self._compiled.clear()
            self._compiled[which] = compiled
        return compiled

    def _replacement(self, match: re.Match[Any]) -> str:
        group = match.lastgroup
        assert group is not None
        return f"[REDACTED:{self._labels[int(group[1:])]}]"

    def headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Names and values redacted; a name that held a secret becomes
        X-Outloop-Redacted (a redacted name is no longer an HTTP token)."""
        pairs = list(headers)
        # Usually nothing needs redacting: one look at all the names and values says
        # so. A secret (its patterns have no anchors) or a rule's keyword in one is in them all.
        values = "\n".join(f"{k}\n{v}\n{_as_utf8(v)}" for k, v in pairs)
        pattern = self._pattern(values)
        if (pattern is None or pattern.search(values) is None) and (
            self._extra is None or (self._extra_gate is not None and not self._extra_gate(values))
        ):
            return pairs
        out = []
        for k, v in pairs:
            name = self.text(k)
            out.append((k if name == k else REDACTED_HEADER, self._header_value(v)))
        return out

    def _header_value(self, value: str) -> str:
        """`value` redacted as text, and as the bytes it goes back to the agent as.

        httpx reads every header as latin-1 once one of them is not UTF-8, and the
        server writes such a value back as its latin-1 bytes: the UTF-8 text those
        bytes hold (a non-ASCII key) is what the agent reads, so it is redacted too.
        """
        value = self.text(value)
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            return value  # it goes back as UTF-8, as read
        if raw.isascii():
            return value
        return self.bytes(raw).decode("latin-1")


# The most an undeclared gzip or zlib body is unpacked to, to look inside.
SNIFF_MAX = 16 * 1024 * 1024
# Packing nested deeper than this is not given to the agent at all (it is not looked into).
MAX_PACKED_DEPTH = 3
# What stands for such a body, and for one that unpacks to more than SNIFF_MAX.
TOO_DEEP = b"[REDACTED:packed-too-deep]"
TOO_LARGE = b"[REDACTED:packed-too-large]"
# How much packed data is fed to the decoder at a time.
INFLATE_PIECE = 64 * 1024


def _as_utf8(value: str) -> str:
    """A header value that is not ASCII, read as the UTF-8 its latin-1 bytes may be
    (see Redactor._header_value); "" for any other."""
    if value.isascii():
        return ""
    try:
        return value.encode("latin-1").decode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return ""


def looks_packed(value: bytes) -> bool:
    """Whether `value` starts like gzip or zlib data."""
    return value[:2] == b"\x1f\x8b" or (
        len(value) >= 2 and value[0] & 0x0F == 8 and (value[0] << 8 | value[1]) % 31 == 0
    )


def _unpacked(value: bytes) -> tuple[list[tuple[int, bytes]], bytes] | None:
    """([(wbits, contents), ...], what follows) of a body that starts as gzip or zlib data,
    else None; _TooLarge when it unpacks to more than SNIFF_MAX.

    Read as a decoder would read it for the agent: gzip members or zlib streams one after
    another (gunzip and Python's gzip module read on past the first), and what a stream
    that breaks off or goes wrong gave before it did (gunzip prints it, then complains).
    """
    streams: list[tuple[int, bytes]] = []
    size = 0
    rest: bytes | None = value
    while rest is not None and looks_packed(rest):
        wbits = zlib.MAX_WBITS | 16 if rest[:2] == b"\x1f\x8b" else zlib.MAX_WBITS
        inner, after = _inflate(wbits, rest, SNIFF_MAX + 1 - size)
        size += len(inner)
        if size > SNIFF_MAX:
            raise _TooLarge
        if not inner and after is None:
            break  # not packed after all (text that starts like a zlib header)
        streams.append((wbits, inner))
        rest = after
    return (streams, rest or b"") if streams else None


class _TooLarge(Exception):
    """A packed body unpacks to more than SNIFF_MAX."""


def _inflate(wbits: int, value: bytes, limit: int) -> tuple[bytes, bytes | None]:
    """(what the stream at the start of `value` unpacks to, up to `limit` bytes and as far
    as it decodes; what follows its end, None if it has none). Fed a piece at a time: a
    piece that does not decode is fed again a byte at a time, to keep what came before."""
    decoder = zlib.decompressobj(wbits)
    out = bytearray()
    for i in range(0, len(value), INFLATE_PIECE):
        piece = value[i : i + INFLATE_PIECE]
        before = decoder.copy()
        try:
            out += decoder.decompress(piece, limit - len(out))
        except zlib.error:
            for j in range(len(piece)):
                try:
                    out += before.decompress(piece[j : j + 1], limit - len(out))
                except zlib.error:
                    break
                if len(out) >= limit:  # (a max_length of 0 would mean no limit)
                    break
            return bytes(out), None
        if decoder.eof:
            return bytes(out), decoder.unused_data + value[i + INFLATE_PIECE :]
        if len(out) >= limit:
            break
    return bytes(out), None


def _pack(wbits: int, data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=wbits)
    return packer.compress(data) + packer.flush()


def with_leak_rules(secrets: Mapping[str, str] | Iterable[tuple[str, str]]) -> Redactor:
    """A Redactor of `secrets` that also redacts what the confident leak rules find:
    what every answer, worker answer and hook output is redacted with."""
    from broker.leaks.rules import iter_provider_key_spans, may_hold_provider_key

    return Redactor(secrets, iter_provider_key_spans, may_hold_provider_key)
