"""Tolerant parsing of `.env`-like files.

Real `.env` files are written by hand and by a dozen tools, so the parser accepts
what they produce rather than rejecting it: an `export ` prefix, single, double
and backtick quotes, values spanning several lines inside quotes, `#` comments
(whole-line, and inline after whitespace on unquoted values), duplicate keys
(every occurrence is kept: each may hold a secret), CRLF line ends and a BOM.
Lines that are not assignments (`.envrc` shell commands, garbage) are skipped.

Every entry keeps the offsets of its raw value in the original text, so a
caller can report the exact line and span without re-reading the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ASSIGN = re.compile(r"[ \t]*(?:export[ \t]+)?(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)[ \t]*=[ \t]*")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "$": "$", "`": "`"}


@dataclass(frozen=True, slots=True)
class EnvEntry:
    """One `KEY=value` assignment. The value is kept out of repr()."""

    key: str
    value: str = field(repr=False)
    line: int
    value_start: int
    value_end: int
    quote: str | None = None


def _unescape_double(raw: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), raw, flags=re.S)


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def parse_env(text: str) -> list[EnvEntry]:
    """Every assignment in `text`, in file order, with 1-based lines and raw value spans."""
    entries: list[EnvEntry] = []
    pos = 1 if text.startswith("\ufeff") else 0
    line = 1
    n = len(text)
    while pos < n:
        eol = _line_end(text, pos)
        m = _ASSIGN.match(text, pos, eol)
        if m is None:
            pos, line = eol + 1, line + 1
            continue
        vstart = m.end()
        first = text[vstart] if vstart < eol else ""
        if first in ("'", '"', "`"):
            close = _closing_quote(text, vstart + 1, first)
            if close is None:  # unterminated: take the rest of the line, never the whole file
                raw_end = eol
                while raw_end > vstart + 1 and text[raw_end - 1] in "\r \t":
                    raw_end -= 1
                start, end = vstart + 1, raw_end
                value = text[start:end]
                next_pos = eol + 1
            else:
                start, end = vstart + 1, close
                raw = text[start:end]
                value = _unescape_double(raw) if first == '"' else raw
                next_pos = _line_end(text, close) + 1
            entries.append(EnvEntry(m.group("key"), value, line, start, end, first))
            line += text.count("\n", pos, next_pos)
            pos = next_pos
            continue
        end = eol
        hash_at = _inline_comment(text, vstart, eol)
        if hash_at is not None:
            end = hash_at
        while end > vstart and text[end - 1] in "\r \t":
            end -= 1
        entries.append(EnvEntry(m.group("key"), text[vstart:end], line, vstart, end, None))
        pos, line = eol + 1, line + 1
    return entries


def _closing_quote(text: str, start: int, quote: str) -> int | None:
    i = start
    while True:
        j = text.find(quote, i)
        if j < 0:
            return None
        if quote == '"':
            backslashes = 0
            k = j - 1
            while k >= start and text[k] == "\\":
                backslashes += 1
                k -= 1
            if backslashes % 2:
                i = j + 1
                continue
        return j


def _inline_comment(text: str, start: int, end: int) -> int | None:
    # Only " #" starts a comment: '#' inside a value (URL fragments, passwords) is data.
    i = text.find("#", start, end)
    while i >= 0:
        if i == start or text[i - 1] in " \t":
            return i
        i = text.find("#", i + 1, end)
    return None


def env_dict(text: str) -> dict[str, str]:
    """The effective variables: the last assignment of a key wins, as in a shell."""
    return {e.key: e.value for e in parse_env(text)}
