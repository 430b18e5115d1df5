"""The pool (broker/calls/transport.py) against h11, on one generated corpus of server answers.

Each case is a few answers a raw loopback server (tests/test_transport.py's RawServer)
writes to the requests of one client, in order: answer k goes to the k-th request,
whichever connection it comes on. The server splits every write at chosen offsets
(inside the status line, inside a chunk-size line, between a CR and its LF, anywhere),
and may write bytes nobody asked for with an answer's last bytes, or close after it.
The same case is run three times, on a fresh server each: by the reference, by the
pool reading each body as fast as it can, and by the pool with a slow reader (a short
sleep before every read: bodies of a few hundred KiB go through the pool's
pause/resume path, as STREAM_BUFFER is 64 KiB).

The reference is h11 (`h11.Connection(our_role=h11.CLIENT)`) over a plain non-blocking
socket, read 4 KiB at a time, with the rule a careful h11-based pool follows (httpcore's,
plus h11's own buffer): a connection is reused only if h11 says both sides are DONE,
h11 holds no bytes past the answer and the socket has none (nor a FIN) waiting. Its
head limit is the pool's (max_incomplete_event_size=MAX_HEAD_BYTES).

For every answer both must agree on the status, the headers (names in lower case,
values without surrounding whitespace, as the pool documents) and the body bytes, or
both refuse it; and after it, both reuse the connection or neither does. Three tables
list where they may differ, each entry with its reason, and the test asserts exactly
the difference listed: STRICTER (the pool refuses an answer h11 accepts), H11_QUIRKS
(h11 declines to reuse a connection the pool rightly reuses) and LENIENT (its one
entry: blank lines before a status line, which llhttp drops and h11 refuses; no byte
of an answer differs). Every well-formed answer also carries what it should read as
(status, body, whether the connection may be reused), so the reference is checked too.

Pool bugs this corpus found (fixed in transport.py; the cases are kept, and fail on the
pool before the fix): an answer followed by nobody's second answer in the same read took
that second answer's status (or, for an interim one, lost its headers); a
Transfer-Encoding other than `chunked` was read (`gzip, chunked` as chunked, leaving the
body gzipped; `identity` or `chunked, gzip` up to the close; `chunked` and a tab gave
the chunk framing as the body, and hung on a kept connection); a status below 100
(`HTTP/1.1 099`) was skipped as an interim answer; a HEAD answered in HTTP/0.9 kept its
connection (h11 closes it); interim heads counted towards the 64 KiB head limit only when
they came in several reads.
"""

from __future__ import annotations

import asyncio
import functools
import random
import select
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11
import httpx2 as httpx
import pytest
from test_transport import WAIT as WAIT
from test_transport import Client, Conn, Handler, RawServer, client

from broker.calls.transport import MAX_HEAD_BYTES, MAX_INTERIM, STREAM_BUFFER

pytestmark = pytest.mark.timeout(120)

KiB = 1024
SEED = 20240611
CASES = 320

# -- where the pool and h11 may differ (each with its reason) ------------------------------------

STRICTER: dict[str, str] = {
    "same-length-twice": "llhttp refuses a repeated Content-Length even with one value; h11 merges them",
    "length-list": "llhttp refuses `Content-Length: 5, 5`; h11 merges the list",
    "length-and-chunked": "Content-Length with Transfer-Encoding is a request-smuggling shape; llhttp refuses "
    "it, h11 lets chunked win (RFC 9112 6.3 allows either)",
    "obs-fold": "llhttp refuses obsolete line folding (RFC 9112 5.2 lets a client refuse it); h11 unfolds it",
    "trailer-obs-fold": "the same obsolete folding, in a chunked body's trailer",
    "bare-lf": "llhttp wants CRLF line ends; h11 also takes a bare LF",
    "del-in-header": "llhttp refuses DEL (0x7f) in a header value; h11 keeps it",
    "chunk-size-space": "llhttp refuses whitespace after a chunk size; h11 allows it",
    "chunk-ext-odd": "llhttp checks chunk extensions' grammar (`; a=b`, `;a = b`, `;`); h11 skips to the line end",
    "trailer-length": "llhttp refuses a Content-Length among a chunked body's trailers; h11 keeps it as a trailer",
    "interim-http10": "llhttp ends an HTTP/1.0 connection after a 1.0 interim answer, and refuses the final one",
    "too-many-interim": f"the pool gives up after {MAX_INTERIM} interim answers before the final one; h11 has no limit",
    "interim-heads-too-long": "the pool counts interim heads towards its 64 KiB head limit; h11 counts each alone",
    "te-chunked-tab": "llhttp does not take `chunked` followed by a tab as chunked (it would read the chunk "
    "framing as the body, up to the close), so the pool refuses any Transfer-Encoding but `chunked` and spaces",
    "odd-version": "the pool takes only HTTP/1.0 and HTTP/1.1 answers (llhttp also refuses 1.2); h11 takes any "
    "HTTP/d.d (before this, llhttp read 0.9 and 2.0 like 1.0 for a GET, and the pool like 1.1 for a HEAD)",
}

H11_QUIRKS: dict[str, str] = {
    "http10-keep-alive": "h11 never reuses an HTTP/1.0 connection; RFC 9112 9.3 lets one with a length-delimited "
    "body and `Connection: keep-alive` persist, and the pool reuses it",
}

LENIENT: dict[str, str] = {
    "blank-line-before-head": "llhttp skips CR and LF bytes wherever a status line may begin (before the first "
    "head, between an interim head and the next), and httptools does not say it did; h11 refuses them. They are "
    "dropped, never read as part of an answer: status, headers and body are the same. (Likewise a CRLF after a "
    "whole answer, in the same read, is dropped without retiring the connection; in a later read it retires it.)",
}

# Both must refuse these (the corpus checks h11 does, so each is really malformed).
REJECTED = {
    "bad-chunk-size",
    "chunk-overrun",
    "two-lengths",
    "nul-in-header",
    "bad-header-line",
    "head-too-long",
    "truncated-length",
    "truncated-chunked",
    "te-not-chunked",
    "status-below-100",
}


# -- the corpus ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    kind: str  # the corpus family; the key of STRICTER, H11_QUIRKS, REJECTED
    wire: bytes  # as the server writes it
    cuts: tuple[int, ...]  # offsets the server splits its writes at
    cut_kinds: frozenset[str]  # where some of them fall (for the coverage check)
    method: str = "GET"
    stray: bytes = b""  # written with the answer's last bytes: nobody asked for them
    close: bool = False  # the server closes (sends its FIN) right after
    # What a correct client reads, for a well-formed answer (None for a malformed one):
    status: int | None = None
    body: bytes | None = None
    keeps: bool = False  # whether the connection may carry the next call


@dataclass(frozen=True)
class Case:
    name: str
    answers: tuple[Answer, ...]


class Wire:
    """An answer's bytes as they are built, and offsets worth splitting a write at."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.data = bytearray()
        self.spots: list[tuple[int, str]] = []

    def add(self, part: bytes, spot: str = "") -> Wire:
        if spot and len(part) > 1:
            self.spots.append((len(self.data) + self.rng.randrange(1, len(part)), spot))
        self.data += part
        return self


def ows(rng: random.Random) -> bytes:
    return rng.choice([b"", b"", b" ", b"  ", b"\t", b" \t"])


def cased(rng: random.Random, name: bytes) -> bytes:
    return rng.choice(
        [
            name,
            name.lower(),
            name.upper(),
            bytes(c ^ 32 if chr(c).isalpha() and rng.random() < 0.3 else c for c in name),
        ]
    )


EXTRA_HEADERS = [
    (b"Content-Type", b"application/json; charset=utf-8"),
    (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
    (b"Server", b"differential/1.0"),
    (b"Set-Cookie", b"a=b; Path=/; HttpOnly"),
    (b"X-Empty", b""),
    (b"X-Tabbed", b"a\tb"),
    (b"X-Obs-Text", b"caf\xc3\xa9 \xff"),
    (b"X-Colon", b"a: b"),
    (b"Link", b"</style.css>; rel=preload"),
    (b"Cache-Control", b"no-store"),
]


def status_line(w: Wire, code: int, version: bytes = b"HTTP/1.1") -> None:
    reason = w.rng.choice([b"OK", b"Whatever Reason", b"", b"\xc3\xa9"])
    line = b"%s %d%s\r\n" % (version, code, (b" " + reason) if reason or w.rng.random() < 0.5 else b"")
    w.add(line, "status-line")


def headers(w: Wire, framing: list[tuple[bytes, bytes]]) -> None:
    """`framing` in a random order among random other headers, then the blank line."""
    rng = w.rng
    lines = framing + rng.sample(EXTRA_HEADERS, rng.randrange(0, 4))
    if rng.random() < 0.3:
        lines.append((b"X-Request-Id", rng.randbytes(8).hex().encode()))
    rng.shuffle(lines)
    for name, value in lines:
        # Not a tab after `chunked`: see STRICTER["te-chunked-tab"].
        after = rng.choice([b"", b" ", b"  "]) if name == b"Transfer-Encoding" else ows(rng)
        w.add(cased(rng, name) + b":" + ows(rng) + value + after + b"\r\n")
    w.add(b"\r\n")


def body_bytes(rng: random.Random, big: float = 0.12) -> bytes:
    r = rng.random()
    if r < big:
        return rng.randbytes(rng.randrange(STREAM_BUFFER + 1, 400 * KiB))
    if r < big + 0.1:
        return b""
    if r < 0.6:
        return rng.randbytes(rng.randrange(1, 100))
    return rng.randbytes(rng.randrange(100, 6000))


CHUNK_EXTENSIONS = [
    b"",
    b"",
    b"",
    b";a",
    b";a=b",
    b';name="quoted; value"',
    b";x=1;y=2",
    b';q="a\\"b"',
    b";a-b.c!#=x~y",
]
TRAILERS = [(b"X-Checksum", b"abc123"), (b"Server-Timing", b"db;dur=53"), (b"X-Empty-Trailer", b"")]


def chunked_body(w: Wire, body: bytes, *, size_line: Callable[[int], bytes] | None = None) -> None:
    rng = w.rng
    pieces: list[bytes] = []
    rest = body
    tiny = rng.random() < 0.1
    while rest:
        n = rng.randrange(1, 4) if tiny else rng.randrange(1, min(len(rest), 70 * KiB) + 1)
        pieces.append(rest[:n])
        rest = rest[n:]
    for piece in pieces:
        if size_line is not None:
            line = size_line(len(piece))
        else:
            size = b"%x" % len(piece)
            size = rng.choice([size, size.upper(), b"0" * rng.randrange(1, 4) + size])
            line = size + rng.choice(CHUNK_EXTENSIONS) + b"\r\n"
        w.add(line, "chunk-size-line")
        w.add(piece + b"\r\n")
    w.add(rng.choice([b"0", b"000"]) + rng.choice(CHUNK_EXTENSIONS) + b"\r\n", "chunk-size-line")
    for name, value in rng.sample(TRAILERS, rng.randrange(0, 3)):
        w.add(name + b":" + ows(rng) + value + b"\r\n")
    w.add(b"\r\n")


def finish(
    w: Wire,
    kind: str,
    *,
    method: str = "GET",
    status: int | None = None,
    body: bytes | None = None,
    keeps: bool = False,
    close: bool = False,
    stray_ok: bool = False,
) -> Answer:
    """The answer, with the offsets its writes are split at (and perhaps a stray)."""
    rng, data = w.rng, bytes(w.data)
    cuts: set[int] = set()
    kinds: set[str] = set()
    if rng.random() < 0.75:  # else written in one go
        for offset, spot in w.spots:
            if rng.random() < 0.4:
                cuts.add(offset)
                kinds.add(spot)
        crlfs = [i + 1 for i in range(len(data) - 1) if data[i : i + 2] == b"\r\n"]
        for offset in rng.sample(crlfs, min(len(crlfs), rng.randrange(0, 3))):
            cuts.add(offset)
            kinds.add("between-cr-and-lf")
        cuts.update(rng.randrange(1, len(data)) for _ in range(rng.randrange(0, 5)) if len(data) > 1)
    stray = b""
    if stray_ok and keeps and not close and rng.random() < 0.25:
        stray = rng.choice(
            [
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTALE",
                b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"junk",
            ]
        )
        keeps = False
    return Answer(
        kind,
        data,
        tuple(sorted(c for c in cuts if 0 < c < len(data))),
        frozenset(kinds),
        method,
        stray,
        close,
        status,
        body,
        keeps,
    )


def keep_alive_header(rng: random.Random) -> tuple[list[tuple[bytes, bytes]], bool]:
    """A Connection header (or none) for an HTTP/1.1 answer, and whether it keeps the connection."""
    r = rng.random()
    if r < 0.55:
        return [], True
    if r < 0.7:
        return [(b"Connection", rng.choice([b"keep-alive", b"Keep-Alive", b"foo, keep-alive"]))], True
    return [(b"Connection", rng.choice([b"close", b"Close", b"keep-alive, close", b"upgrade,close", b"CLOSE"]))], False


def with_length(rng: random.Random) -> Answer:
    w = Wire(rng)
    body = body_bytes(rng)
    code = rng.choice([200, 200, 200, 201, 400, 404, 429, 500, 503, 600])
    status_line(w, code)
    conn, keeps = keep_alive_header(rng)
    length = b"%d" % len(body)
    if rng.random() < 0.05:
        length = b"00" + length
    headers(w, [(b"Content-Length", length), *conn])
    w.add(body)
    # A server may close even after an answer that would keep the connection.
    close = not keeps and rng.random() < 0.5 or rng.random() < 0.1
    return finish(w, "length", status=code, body=body, keeps=keeps and not close, close=close, stray_ok=True)


def chunked(rng: random.Random) -> Answer:
    w = Wire(rng)
    body = body_bytes(rng)
    status_line(w, 200)
    conn, keeps = keep_alive_header(rng)
    headers(w, [(b"Transfer-Encoding", rng.choice([b"chunked", b"Chunked", b"CHUNKED"])), *conn])
    chunked_body(w, body)
    close = not keeps and rng.random() < 0.5 or rng.random() < 0.1
    return finish(w, "chunked", status=200, body=body, keeps=keeps and not close, close=close, stray_ok=True)


def until_close(rng: random.Random) -> Answer:
    w = Wire(rng)
    body = body_bytes(rng)
    version = rng.choice([b"HTTP/1.1", b"HTTP/1.0"])
    status_line(w, 200, version)
    conn = rng.choice([[], [(b"Connection", b"close")], [(b"Connection", b"keep-alive")]])
    headers(w, conn)
    w.add(body)
    return finish(w, "until-close", status=200, body=body, close=True)


INTERIM = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\nLink: </script.js>; rel=preload\r\n\r\n",
    b"HTTP/1.1 199 Misc\r\nX-Interim: yes\r\n\r\n",
]


def interim(rng: random.Random) -> Answer:
    final = rng.choice([with_length, chunked])(rng)
    w = Wire(rng)
    for head in rng.choices(INTERIM, k=rng.randrange(1, 4)):
        w.add(head, "status-line")
    w.add(final.wire)
    keeps = final.keeps or bool(final.stray)  # the stray is not written here
    return finish(w, "interim", status=final.status, body=final.body, keeps=keeps, close=final.close)


def head(rng: random.Random) -> Answer:
    w = Wire(rng)
    code = rng.choice([200, 200, 404])
    status_line(w, code)
    conn, keeps = keep_alive_header(rng)
    framing = rng.choice(
        [
            [(b"Content-Length", b"%d" % rng.randrange(0, 500 * KiB))],
            [(b"Transfer-Encoding", b"chunked")],
            [],
        ]
    )
    headers(w, framing + conn)
    close = not keeps and rng.random() < 0.5
    return finish(w, "head", method="HEAD", status=code, body=b"", keeps=keeps, close=close, stray_ok=True)


def no_body(rng: random.Random) -> Answer:
    w = Wire(rng)
    code = rng.choice([204, 304])
    status_line(w, code)
    conn, keeps = keep_alive_header(rng)
    framing = rng.choice(
        [[], [(b"Content-Length", b"0")], [(b"Content-Length", b"%d" % rng.randrange(1, 9999))]]
        + ([[(b"Transfer-Encoding", b"chunked")]] if code == 304 else [])
    )
    headers(w, framing + conn)
    close = not keeps and rng.random() < 0.5
    return finish(w, "no-body", status=code, body=b"", keeps=keeps, close=close, stray_ok=True)


def http10(rng: random.Random) -> Answer:
    w = Wire(rng)
    status_line(w, 200, b"HTTP/1.0")
    if rng.random() < 0.5:  # the quirk: kept alive here, by the pool only
        is_head = rng.random() < 0.3
        body = b"" if is_head else body_bytes(rng)
        headers(
            w, [(b"Connection", rng.choice([b"keep-alive", b"Keep-Alive"])), (b"Content-Length", b"%d" % len(body))]
        )
        if not is_head:
            w.add(body)
        method = "HEAD" if is_head else "GET"
        return finish(w, "http10-keep-alive", method=method, status=200, body=body, keeps=True)
    body = body_bytes(rng)
    if rng.random() < 0.5:
        headers(w, [(b"Content-Length", b"%d" % len(body))])
        w.add(body)
    else:  # chunked is HTTP/1.1's, but both read it
        headers(w, [(b"Transfer-Encoding", b"chunked")])
        chunked_body(w, body)
    return finish(w, "http10", status=200, body=body, close=True)


def big_head(rng: random.Random) -> Answer:
    w = Wire(rng)
    status_line(w, 200)
    body = rng.randbytes(rng.randrange(0, 100))
    filler = [(b"X-Filler-%d" % i, b"f" * 1000) for i in range(rng.randrange(30, 52))]
    headers(w, [(b"Content-Length", b"%d" % len(body)), *filler])
    w.add(body)
    return finish(w, "big-head", status=200, body=body, keeps=True, stray_ok=True)


WELL_FORMED: list[tuple[float, Callable[[random.Random], Answer]]] = [
    (4, with_length),
    (4, chunked),
    (1.5, until_close),
    (1.5, interim),
    (1.5, head),
    (1.5, no_body),
    (1.5, http10),
    (0.5, big_head),
]


# -- malformed answers (the server closes after each, so no one waits on a broken one)


def ok_head(w: Wire, framing: list[tuple[bytes, bytes]], code: int = 200) -> None:
    status_line(w, code)
    headers(w, framing)


def malformed(rng: random.Random) -> Answer:
    kind = rng.choice(sorted(REJECTED | set(STRICTER) | set(LENIENT)))
    w = Wire(rng)
    body = rng.randbytes(rng.randrange(1, 50))
    te = [(b"Transfer-Encoding", b"chunked")]
    cl = [(b"Content-Length", b"%d" % len(body))]
    expect: bytes | None = body  # what h11 reads, for a STRICTER one
    method, version = "GET", b"HTTP/1.1"
    if kind == "bad-chunk-size":
        ok_head(w, te)
        size = rng.choice([b"zz", b"-1", b"0x2", b"", b"2g", b"1 2", b"1" * rng.randrange(17, 21)])
        w.add(size + b"\r\n" + body + b"\r\n0\r\n\r\n", "chunk-size-line")
    elif kind == "chunk-overrun":
        ok_head(w, te)
        w.add(b"%x\r\n" % len(body) + body + b"XX" + b"\r\n0\r\n\r\n")
    elif kind == "two-lengths":
        ok_head(w, [*cl, (b"Content-Length", b"%d" % (len(body) + rng.randrange(1, 3)))])
        w.add(body + b"..")
    elif kind == "nul-in-header":
        ok_head(w, [*cl, (b"X-Nul", b"a\x00b")])
        w.add(body)
    elif kind == "bad-header-line":
        ok_head(w, [*cl, rng.choice([(b"X-Space ", b"v"), (b"", b"v"), (b"X(A)", b"v")])])
        w.add(body)
    elif kind == "head-too-long":
        ok_head(w, [*cl, *((b"X-Filler-%d" % i, b"f" * 1000) for i in range(rng.randrange(80, 130)))])
        w.add(body)
    elif kind == "truncated-length":
        ok_head(w, [(b"Content-Length", b"%d" % (len(body) + rng.randrange(1, 1000)))])
        w.add(body)
    elif kind == "truncated-chunked":
        ok_head(w, te)
        w.add(rng.choice([b"%x\r\n" % (len(body) + 5) + body, b"%x\r\n" % len(body) + body + b"\r\n"]))
    elif kind == "te-not-chunked":
        coding = rng.choice(
            [[b"gzip, chunked"], [b"identity"], [b"chunked, gzip"], [b"chunked,"], [b"chunked", b"chunked"]]
        )
        ok_head(w, [(b"Transfer-Encoding", c) for c in coding])
        w.add(b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    elif kind == "status-below-100":
        # Skipped as an interim answer, a valid final answer would follow it.
        w.add(
            rng.choice([b"HTTP/1.1 099 Odd", b"HTTP/1.1 000 Zero", b"HTTP/1.1 042 X"])
            + b"\r\nContent-Length: 0\r\n\r\n"
        )
        ok_head(w, cl)
        w.add(body)
    elif kind == "same-length-twice":
        ok_head(w, [*cl, *cl])
        w.add(body)
    elif kind == "length-list":
        ok_head(w, [(b"Content-Length", b"%d, %d" % (len(body), len(body)))])
        w.add(body)
    elif kind == "length-and-chunked":
        ok_head(w, [(b"Content-Length", b"%d" % rng.randrange(0, 40)), *te])
        chunked_body(w, body)
    elif kind == "obs-fold":
        ok_head(w, [*cl, (b"X-Folded", b"one\r\n two")])
        w.add(body)
    elif kind == "trailer-obs-fold":
        ok_head(w, te)
        w.add(b"%x\r\n" % len(body) + body + b"\r\n0\r\nX-T: one\r\n\ttwo\r\n\r\n")
    elif kind == "bare-lf":
        w.add(b"HTTP/1.1 200 OK\n" + rng.choice([b"Content-Length: %d\n\n", b"Content-Length: %d\r\n\n"]) % len(body))
        w.add(body)
    elif kind == "del-in-header":
        ok_head(w, [*cl, (b"X-Del", b"a\x7fb")])
        w.add(body)
    elif kind == "chunk-size-space":
        ok_head(w, te)
        w.add(b"%x%s\r\n" % (len(body), rng.choice([b" ", b"\t", b"  "])) + body + b"\r\n0\r\n\r\n")
    elif kind == "chunk-ext-odd":
        ok_head(w, te)
        w.add(b"%x%s\r\n" % (len(body), rng.choice([b"; a=b", b";a = b", b";", b";a b"])) + body + b"\r\n0\r\n\r\n")
    elif kind == "trailer-length":
        ok_head(w, te)
        w.add(b"%x\r\n" % len(body) + body + b"\r\n0\r\nContent-Length: 99\r\n\r\n")
    elif kind == "interim-http10":
        w.add(b"HTTP/1.0 100 Continue\r\n\r\n")
        ok_head(w, cl)
        w.add(body)
    elif kind == "too-many-interim":
        w.add(b"HTTP/1.1 100 Continue\r\n\r\n" * rng.randrange(MAX_INTERIM + 1, MAX_INTERIM + 4))
        ok_head(w, cl)
        w.add(body)
    elif kind == "interim-heads-too-long":
        filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(15))
        w.add((b"HTTP/1.1 103 Early Hints\r\n" + filler + b"\r\n") * 5)
        ok_head(w, cl)
        w.add(body)
    elif kind == "te-chunked-tab":
        ok_head(w, [(b"Transfer-Encoding", b"chunked" + rng.choice([b"\t", b" \t", b"\t "]))])
        w.add(b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    elif kind == "blank-line-before-head":
        w.add(rng.choice([b"", b"HTTP/1.1 100 Continue\r\n\r\n"]) + rng.choice([b"\r\n", b"\r\n\r\n", b"\n"]))
        ok_head(w, cl)
        w.add(body)
        return finish(w, kind, status=200, body=body, close=True)
    elif kind == "odd-version":
        version = rng.choice([b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.2"])
        status_line(w, 200, version)
        method = rng.choice(["GET", "HEAD"])
        headers(w, cl)
        if method == "GET":
            w.add(body)
        else:
            expect = b""
    else:
        raise AssertionError(kind)
    if kind in REJECTED:
        return finish(w, kind, method=method, close=True)
    # h11 reads these, and reuses the connection (the server keeps it) unless it is HTTP/0.9.
    keeps = not (kind == "odd-version" and version == b"HTTP/0.9")
    return finish(w, kind, method=method, status=200, body=expect, keeps=keeps)


def generate(rng: random.Random, count: int) -> list[Case]:
    weights, makers = zip(*WELL_FORMED, strict=True)
    cases = []
    for n in range(count):
        answers = []
        for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
            make = malformed if rng.random() < 0.3 else rng.choices(makers, weights)[0]
            answers.append(make(rng))
        name = f"{n:03d}-" + "+".join(a.kind for a in answers)
        cases.append(Case(name, tuple(answers)))
    return cases


CORPUS = generate(random.Random(SEED), CASES)


# -- running a case ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One answer as a client read it: ok=False if it refused it."""

    ok: bool
    status: int = 0
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


REFUSED = Seen(False)


def normal(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    # h11 gives Transfer-Encoding's value in lower case; the pool gives it as sent.
    return tuple((k, v.lower() if k == b"transfer-encoding" else v) for k, v in headers)


@dataclass
class Run:
    seen: list[Seen] = field(default_factory=list)
    conns: dict[int, int] = field(default_factory=dict)  # exchange -> the server's connection index

    def reused_after(self, i: int) -> bool:
        return self.conns[i + 1] == self.conns[i]


def scripted(case: Case, run: Run) -> Handler:
    """Answer the k-th request (on whichever connection) with the case's k-th answer."""
    answers = iter(case.answers)

    async def handler(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            i = int(req.target.lstrip("/"))
            answer = next(answers)
            assert answer is case.answers[i] and req.method == answer.method, "the clients ask in the case's order"
            run.conns[i] = conn.index
            pieces = [answer.wire[a:b] for a, b in zip((0, *answer.cuts), (*answer.cuts, None), strict=True)]
            pieces[-1] += answer.stray
            for n, piece in enumerate(pieces):
                conn.writer.write(piece)
                await conn.writer.drain()
                if n < len(pieces) - 1:
                    for _ in range(3):  # a loop step for the client to read this piece on its own
                        await asyncio.sleep(0)
            if answer.close:
                conn.writer.write_eof()  # at once: the FIN follows the last byte before anyone reads it
                await conn.until_eof()
                return

    return handler


async def by_pool(case: Case, port: int, slow: bool) -> list[Seen]:
    seen = []
    async with client() as c:
        for i, answer in enumerate(case.answers):
            seen.append(await asyncio.wait_for(pool_exchange(c, f"http://127.0.0.1:{port}/{i}", answer, slow), WAIT))
    return seen


async def pool_exchange(c: Client, url: str, answer: Answer, slow: bool) -> Seen:
    try:
        stream = await c.open(answer.method, url)
    except httpx.RemoteProtocolError:
        return REFUSED
    try:
        parts = []
        while True:
            if slow:
                await asyncio.sleep(0.002)
            if not (data := await stream.read(WAIT)):
                break
            parts.append(data)
    except httpx.RemoteProtocolError:
        return REFUSED
    finally:
        stream.close()
    return Seen(True, stream.status, normal(stream.headers), b"".join(parts))


async def by_h11(case: Case, port: int) -> list[Seen]:
    loop = asyncio.get_running_loop()
    seen: list[Seen] = []
    sock: socket.socket | None = None
    h: h11.Connection | None = None
    try:
        for i, answer in enumerate(case.answers):
            if h is not None and sock is not None and reusable(h, sock):
                h.start_next_cycle()
            else:
                if sock is not None:
                    sock.close()
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", port))
                h = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
            try:
                seen.append(await asyncio.wait_for(h11_exchange(h, sock, i, answer.method), WAIT))
            except h11.RemoteProtocolError:
                seen.append(REFUSED)
                h = None
    finally:
        if sock is not None:
            sock.close()
    return seen


def reusable(h: h11.Connection, sock: socket.socket) -> bool:
    if h.our_state is not h11.DONE or h.their_state is not h11.DONE or h.trailing_data != (b"", False):
        return False
    readable, _, _ = select.select([sock], [], [], 0)  # bytes, or a FIN, nobody asked for
    return not readable


async def h11_exchange(h: h11.Connection, sock: socket.socket, i: int, method: str) -> Seen:
    loop = asyncio.get_running_loop()
    request = h11.Request(method=method, target=f"/{i}", headers=[("Host", "127.0.0.1")])
    head, end = h.send(request), h.send(h11.EndOfMessage())
    assert head is not None and end is not None
    await loop.sock_sendall(sock, head + end)
    status, got, body = 0, list[tuple[bytes, bytes]](), bytearray()
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            h.receive_data(await loop.sock_recv(sock, 4096))
        elif isinstance(event, h11.InformationalResponse):
            pass
        elif isinstance(event, h11.Response):
            status, got = event.status_code, list(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Seen(True, status, normal(got), bytes(body))
        else:
            raise AssertionError(f"h11 gave {event!r} before the answer's end")


async def run(case: Case, reader: Callable[[Case, int], Awaitable[list[Seen]]]) -> Run:
    result = Run()
    async with RawServer(scripted(case, result)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        result.seen = await reader(case, port)
    assert sorted(result.conns) == list(range(len(case.answers))), "each call asked once"
    return result


# -- the comparison ------------------------------------------------------------------------------


def disagreements(case: Case, ref: Run, pool: Run) -> list[str]:
    found = []
    for i, answer in enumerate(case.answers):
        r, p = ref.seen[i], pool.seen[i]
        where = f"answer {i} ({answer.kind})"
        if answer.kind in STRICTER:
            if not r.ok or p.ok:
                found.append(f"{where}: listed as refused by the pool only, but h11 ok={r.ok}, pool ok={p.ok}")
        elif answer.kind in LENIENT:
            if r.ok or (p.status, p.body) != (answer.status, answer.body):
                found.append(f"{where}: listed as refused by h11 only, but h11 {brief(r)}, pool {brief(p)}")
        elif p != r:
            found.append(f"{where}: pool {brief(p)} but h11 {brief(r)}")
        if answer.kind in REJECTED:
            if r.ok:
                found.append(f"{where}: h11 accepts this 'malformed' answer (the corpus is wrong)")
        elif answer.kind not in LENIENT and (r.status, r.body) != (answer.status, answer.body):
            found.append(f"{where}: h11 read {brief(r)}, the answer was {answer.status} {len(answer.body or b'')} B")
    for i, answer in enumerate(case.answers[:-1]):
        reused = (pool.reused_after(i), ref.reused_after(i))
        where = f"after answer {i} ({answer.kind})"
        if answer.kind in H11_QUIRKS:
            expected = (True, False)
        elif answer.kind in STRICTER:
            expected = (False, answer.keeps)
        else:
            expected = (answer.keeps and answer.kind not in REJECTED,) * 2
        if reused != expected:
            found.append(f"{where}: (pool, h11) reused the connection: {reused}; expected {expected}")
    return found


def brief(s: Seen) -> str:
    if not s.ok:
        return "refused it"
    return f"read {s.status} {len(s.body)} B {s.body[:24]!r} headers={s.headers[:6]!r}"


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
async def test_the_pool_frames_each_answer_as_h11_does(case: Case) -> None:
    ref = await run(case, by_h11)
    for slow in (False, True):
        pool = await run(case, functools.partial(by_pool, slow=slow))
        found = disagreements(case, ref, pool)
        assert not found, f"{'slow' if slow else 'fast'} reader:\n" + "\n".join(found)


def test_the_corpus_covers_what_it_claims() -> None:
    answers = [a for c in CORPUS for a in c.answers]
    kinds = {a.kind for a in answers}
    families = {"length", "chunked", "until-close", "interim", "head", "no-body", "http10", "big-head"}
    assert families | REJECTED | set(STRICTER) | set(H11_QUIRKS) | set(LENIENT) <= kinds
    cut_kinds = {k for a in answers for k in a.cut_kinds}
    assert {"status-line", "chunk-size-line", "between-cr-and-lf"} <= cut_kinds
    assert sum(len(a.body or b"") > 3 * STREAM_BUFFER for a in answers) >= 10  # through pause/resume
    assert sum(bool(a.stray) for a in answers) >= 20
    assert sum(not a.cuts for a in answers) >= 50  # whole in one write
    assert sum(len(c.answers) >= 3 for c in CORPUS) >= 50  # several in a row
    assert any(b";" in a.wire and a.kind == "chunked" for a in answers)  # chunk extensions
    assert len(answers) >= 500
