"""Redacting an answer while it streams, holding back no more than a match can span.

An answer passes to the agent chunk by chunk (server-sent events, chunked JSON,
long downloads), and a key may arrive split across two chunks. `StreamRedactor`
lets text through only up to a point no match can straddle:

- the end of the last complete line: no managed secret's form and no single-line
  leak rule crosses a line break, so a line can be judged alone (a secret that
  itself holds a line break turns this off);
- a private-key block (the only leak rules that span lines) is held from its
  first line until its end line has arrived, or MAX_HELD characters have passed
  (a rule matches the first line of a block alone, not the lines after it);
- within a long line, all but the last `hold` characters, where `hold` is longer
  than any match (HOLD, or more for a long secret's escaped forms); a match that
  reaches over that point is held whole until it ends.

So what is held at any time is at most one line, one private-key block (MAX_HELD),
or `hold` characters; an SSE event goes out as soon as its line ends. Matches are found
over everything held (the text after the cut is context for the text before it),
so a rule that needs to see what follows a key still sees it.

A body that starts like gzip or zlib data the upstream did not declare is kept
whole instead, to be unpacked and redacted at its end as `Redactor.bytes` does.
"""

from __future__ import annotations

import codecs
import re

from broker.leaks.redact import Redactor, looks_packed

# Characters a match may span at most, but for private keys longer than 4096-bit RSA.
HOLD = 8192
# Within a long line, text goes out in pieces of at least this much (each piece
# costs a search over what is held).
MIN_PIECE = 4096
# Where a multi-line leak rule's match begins (broker/leaks/rules.py: private-key,
# openssh-private-key, pgp-private-key, putty-private-key, gcp-service-account-key).
OPENER_RE = re.compile(r'-----BEGIN [A-Z ]*PRIVATE KEY|PuTTY-User-Key-File-|"private_key"')
# What ends such a block (PEM, and PuTTY's last line).
CLOSERS = ("-----END ", "Private-MAC:")
# A match still growing past this much held text goes out redacted as it stands, and
# a private-key block still open after this much goes out as it stands.
MAX_HELD = 48 * 1024


class StreamRedactor:
    """Feed it an answer's bytes as they arrive; what it returns may go to the agent."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self.hold = max(HOLD, 8 * redactor.longest_secret + 16)  # %xx is 3 per byte, \\uXXXX 6-7
        self._by_line = not redactor.secret_spans_lines
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._held = ""
        self._start: bytes | None = b""  # the first bytes, until they show whether the body is packed
        self._whole: bytearray | None = None  # a packed body, kept to its end

    @property
    def held(self) -> int:
        """How many characters (or bytes, of a packed body) are held back now."""
        return len(self._held) + len(self._start or b"") + len(self._whole or b"")

    def feed(self, data: bytes) -> bytes:
        if self._whole is not None:
            self._whole += data
            return b""
        if self._start is not None:  # the body's first bytes: is it packed?
            self._start += data
            if len(self._start) < 2:
                return b""
            data, self._start = self._start, None
            if looks_packed(data):
                self._whole = bytearray(data)
                return b""
        self._held += self._decoder.decode(data)
        return self._emit(final=False)

    def close(self) -> bytes:
        """The rest, at the end of the answer."""
        if self._whole is not None:
            whole, self._whole = bytes(self._whole), None
            return self._redactor.bytes(whole)
        self._held += self._decoder.decode(self._start or b"", final=True)
        self._start = None
        return self._emit(final=True)

    def _emit(self, final: bool) -> bytes:
        text = self._held
        n = len(text)
        if final:
            cut = n
        else:
            cut = n - self.hold if n >= self.hold + MIN_PIECE else 0
            if self._by_line:
                cut = max(cut, text.rfind("\n") + 1)
            if cut == 0:
                return b""
        spans = self._redactor.spans(text)
        if not final:
            cut = self._safe_cut(text, cut, spans)
            if cut == 0:
                return b""
        out: list[str] = []
        pos = 0
        for start, end, replacement in spans:
            if end > cut:
                break
            out.append(text[pos:start])
            out.append(replacement)
            pos = end
        out.append(text[pos:cut])
        self._held = text[cut:]
        return "".join(out).encode("utf-8", "surrogateescape")

    def _safe_cut(self, text: str, cut: int, spans: list[tuple[int, int, str]]) -> int:
        """`cut` moved back so that no match, found or still possible, reaches over it."""
        floor = max(0, len(text) - MAX_HELD)
        for opener in OPENER_RE.finditer(text, floor):
            if opener.start() >= cut:
                break
            # A block's rule may match its first lines alone: it is whole at its end line.
            if not any(0 <= text.find(end, opener.end(), cut) for end in CLOSERS):
                cut = opener.start()
                break
        for start, end, _ in spans:
            if start < cut < end:
                # Held whole until it ends; a match longer than MAX_HELD goes out whole, redacted.
                return end if len(text) - start > MAX_HELD else start
        return cut
