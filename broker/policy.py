"""Policy rules (`METHOD PATH-GLOB`) and the path normalisation they are matched against.

`*` matches within one path segment, `**` as a whole segment matches any number of
segments (zero included). Precedence: deny, then allow, then ask, then deny by
default; a credential with no rules at all asks for everything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal
from urllib.parse import quote, unquote

Action = Literal["allow", "ask", "deny"]

# \Z, not $: "$" also matches before a trailing newline ("GET\n").
METHOD_RE = re.compile(r"\A[A-Z][A-Z0-9-]{0,19}\Z")
# Characters left as they are when a decoded segment is re-encoded for the upstream.
SEGMENT_SAFE = "!$&'()*+,;=:@-._~"


class RuleError(ValueError):
    """A rule string is not `METHOD /path/glob`."""


class PathRejected(ValueError):
    """A request path is unsafe or malformed (answered as bad_request)."""


@dataclass(frozen=True)
class Rule:
    text: str
    method: str  # upper case, or "*"
    pattern: re.Pattern[str]

    def matches(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method == method) and bool(self.pattern.match(path))


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str | None  # the rule that matched; None for the default

    @property
    def reason(self) -> str:
        if self.rule:
            return f"{self.action} rule {self.rule!r}"
        return f"{self.action}: no rule matched"


@dataclass(frozen=True)
class NormalPath:
    """A request path split into decoded segments, and its canonical encoded form."""

    segments: tuple[str, ...]
    encoded: str  # what goes to the upstream, beginning with "/"

    @cached_property
    def match_key(self) -> str:
        # Segments joined with "/" after decoding; an encoded "/" inside a segment is
        # kept as %2F so it can never pose as a separator to the matcher.
        return "/" + "/".join(s.replace("%", "%25").replace("/", "%2F") for s in self.segments)


@lru_cache(maxsize=4096)
def parse_rule(text: str) -> Rule:
    """Parse `METHOD PATH-GLOB` into a Rule; raise RuleError with what is wrong."""
    parts = text.split()
    if len(parts) != 2:
        raise RuleError(f"rule {text!r} must be 'METHOD /path' (e.g. 'GET /repos/**')")
    method, glob = parts
    # ASCII only before upper-casing: str.upper() folds "poſt" to "POST" and "lınk" to "LINK".
    method = method.upper() if method.isascii() else method
    if method != "*" and not METHOD_RE.match(method):
        raise RuleError(f"rule {text!r}: {method!r} is not an HTTP method or '*'")
    if not glob.startswith("/"):
        raise RuleError(f"rule {text!r}: the path must start with '/'")
    segments = glob.strip("/").split("/") if glob.strip("/") else []
    regex = ""
    for seg in segments:
        if seg == "**":
            regex += r"(?:/[^/]*)*"
        elif "**" in seg:
            raise RuleError(f"rule {text!r}: '**' must be a whole path segment")
        elif seg == "" or seg in (".", ".."):
            raise RuleError(f"rule {text!r}: empty, '.' or '..' segments are not allowed")
        else:
            regex += "/" + "[^/]*".join(re.escape(p) for p in seg.split("*"))
    return Rule(text, method, re.compile(regex + "/?$" if regex else "/?$"))


def decide(
    method: str, path: NormalPath, allow: tuple[str, ...], ask: tuple[str, ...], deny: tuple[str, ...]
) -> Decision:
    """Apply a credential's rules to a normalised request.

    The method is upper-cased (ASCII only) and then matched exactly: a `GET` rule is
    never a `GETX` one, and a method that is not an ASCII token is denied outright.
    """
    # HTTP clients upper-case the method on the wire; so must policy, or "delete"
    # would slip past a "DELETE" deny rule. Not str.upper() on other text: it folds
    # "poſt" (long s) to "POST", a method the request did not name.
    method = method.upper() if method.isascii() else ""
    if not METHOD_RE.match(method):
        return Decision("deny", None)
    if not (allow or ask or deny):
        return Decision("ask", None)
    key = path.match_key
    for action, rules in (("deny", deny), ("allow", allow), ("ask", ask)):
        for text in rules:
            if parse_rule(text).matches(method, key):
                return Decision(action, text)  # type: ignore[arg-type]
    return Decision("deny", None)


def normalize_path(raw: str, *, allow_encoded_slash: bool = False, allow_path_params: bool = False) -> NormalPath:
    """Split and decode a request path, refusing anything that could change its meaning.

    Refused: not starting with "/", "//" (a host), a scheme, "." and ".." segments
    (encoded or not), empty inner segments, backslashes (%5C too), control characters,
    and a query or fragment (the query travels separately); and, unless the credential
    opts in, an encoded "/" (%2F) inside a segment and ";" path parameters.
    """
    # Agents call the same paths over and over, and a NormalPath is immutable; only
    # short ASCII paths are kept, so the cache stays small in bytes (a few MiB at most).
    if len(raw) <= CACHED_PATH_MAX and raw.isascii():
        return _normalize_cached(raw, allow_encoded_slash, allow_path_params)
    return _normalize(raw, allow_encoded_slash, allow_path_params)


CACHED_PATH_MAX = 256


@lru_cache(maxsize=2048)
def _normalize_cached(raw: str, allow_encoded_slash: bool, allow_path_params: bool) -> NormalPath:
    return _normalize(raw, allow_encoded_slash, allow_path_params)


def _normalize(raw: str, allow_encoded_slash: bool = False, allow_path_params: bool = False) -> NormalPath:
    if not raw.startswith("/"):
        raise PathRejected("the path must start with '/' (absolute URLs are not accepted)")
    if raw.startswith("//"):
        raise PathRejected("the path must not name a host ('//...')")
    if "?" in raw or "#" in raw:
        raise PathRejected("put the query in 'query', not in the path")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw):
        raise PathRejected("the path holds spaces or control characters")
    pieces = raw[1:].split("/")
    trailing = len(pieces) > 1 and pieces[-1] == ""
    if trailing:
        pieces.pop()
    segments: list[str] = []
    for piece in pieces:
        try:
            seg = unquote(piece, errors="strict") if "%" in piece else piece
        except UnicodeDecodeError:
            raise PathRejected("the path's percent-encoding is not UTF-8") from None
        # Also refuse dot segments hidden behind an encoded "/" (an upstream may decode
        # it before routing) or before a ";" parameter (servlet containers read "..;"
        # as "..").
        if any(p.split(";")[0] in (".", "..") for p in seg.split("/")):
            raise PathRejected("'.' and '..' segments are not allowed in the path")
        if "\\" in seg or any(ord(c) < 0x20 or ord(c) == 0x7F for c in seg):
            raise PathRejected("the path holds a backslash or control character")
        if "/" in seg and not allow_encoded_slash:
            # Judged as one segment, an upstream that decodes %2F first routes it as two.
            # (The message does not name the opt-in: that is the operator's to know.)
            raise PathRejected(
                "the path has an encoded '/' (%2F) inside a segment, which this credential does not accept"
            )
        if ";" in seg and not allow_path_params:
            # Servlet containers and others strip ";..." before routing: another path than the one judged.
            raise PathRejected("the path has a ';' parameter, which this credential does not accept")
        if seg == "" and pieces != [""]:
            raise PathRejected("the path has an empty segment ('//')")
        segments.append(seg)
    if segments == [""]:
        segments = []
    encoded = "/" + "/".join(quote(s, safe=SEGMENT_SAFE) for s in segments)
    if trailing and segments:
        encoded += "/"
    return NormalPath(tuple(segments), encoded)
