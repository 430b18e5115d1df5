"""StreamRedactor: what a streamed answer's chunks may let through, wherever the chunks split it.

The property every test here checks: the concatenated output equals what the whole
body redacts to (`Redactor.bytes`), for every split, and no form of a secret is in
any piece that went out, while only a bounded amount is ever held back.
"""

from __future__ import annotations

import gzip
import random

import pytest

from broker.leaks.redact import encodings, with_leak_rules
from broker.leaks.stream import HOLD, MIN_PIECE, StreamRedactor

SECRET = 'sk-live/Zq9+Tr4="Lw~x7Hq2PkM8'
OTHER = "ghp_0123456789abcdefABCDEFghijklmnopqrst"  # a provider key no credential manages
REDACTOR = with_leak_rules([("api", SECRET)])


def streamed(body: bytes, cuts: list[int]) -> tuple[bytes, list[bytes], int]:
    """(output, the pieces that went out, the most held back at once) for `body` cut at `cuts`."""
    s = StreamRedactor(REDACTOR)
    pieces, most = [], 0
    last = 0
    for cut in [*cuts, len(body)]:
        pieces.append(s.feed(body[last:cut]))
        most = max(most, s.held)
        last = cut
    pieces.append(s.close())
    return b"".join(pieces), pieces, most


def forms() -> list[str]:
    return sorted(encodings(SECRET))


@pytest.mark.parametrize("form", forms())
def test_every_form_split_at_every_place_is_redacted_as_the_whole_is(form: str) -> None:
    body = ('data: {"echo": "before ' + form + ' after"}\n\n').encode()
    whole = REDACTOR.bytes(body)
    assert form.encode() not in whole and b"[REDACTED:api]" in whole
    for cut in range(1, len(body)):
        out, pieces, _ = streamed(body, [cut])
        assert out == whole, f"split at {cut}"
        assert not any(form.encode() in p for p in pieces)
    out, _, _ = streamed(body, list(range(1, len(body))))  # a byte at a time
    assert out == whole


def test_a_provider_key_split_across_chunks_is_redacted() -> None:
    body = f"token: {OTHER}\n".encode()
    whole = REDACTOR.bytes(body)
    assert OTHER.encode() not in whole
    for cut in range(1, len(body)):
        out, pieces, _ = streamed(body, [cut])
        assert out == whole
        assert not any(OTHER[: max(8, cut - 7)].encode() in p for p in pieces[:1] if cut > 12)


def test_complete_lines_go_out_at_once() -> None:
    s = StreamRedactor(REDACTOR)
    event = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    assert s.feed(event) == event
    assert s.feed(b"data: half") == b""  # an unfinished line waits for its end
    assert s.feed(b" done\n") == b"data: half done\n"
    assert s.held == 0


def test_a_private_key_block_is_held_until_it_is_whole() -> None:
    rng = random.Random(3)
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    lines = ["MIIEowIBAAKCAQEA" + "".join(rng.choice(b64) for _ in range(48)) for _ in range(20)]
    body = (
        "data: here it is\n-----BEGIN RSA PRIVATE KEY-----\n"
        + "\n".join(lines)
        + "\n-----END RSA PRIVATE KEY-----\ndata: after\n"
    ).encode()
    whole = REDACTOR.bytes(body)
    assert lines[3].encode() not in whole
    cuts, pos = [], 0
    for line in body.splitlines(keepends=True)[:-1]:
        pos += len(line)
        cuts.append(pos)
    out, pieces, _ = streamed(body, cuts)  # a line at a time, as a server would flush it
    assert out == whole
    assert pieces[0] == b"data: here it is\n"  # what comes before the block is not held
    assert not any(line.encode() in p for p in pieces for line in lines)


def test_a_long_line_is_held_back_by_a_bounded_amount_only() -> None:
    rng = random.Random(7)
    body = ("".join(rng.choice("abc def ") for _ in range(200_000)) + SECRET + "x" * 50_000 + "\n").encode()
    cuts = list(range(1000, len(body), 1000))
    out, pieces, most = streamed(body, cuts)
    assert out == REDACTOR.bytes(body)
    assert most <= HOLD + MIN_PIECE + 1000  # what is held: the hold, a piece, one chunk
    assert most <= 64 * 1024
    assert sum(1 for p in pieces if p) > 20  # and it went out on the way, not at the end


def test_an_undeclared_gzip_body_is_kept_whole_and_redacted_at_its_end() -> None:
    packed = gzip.compress(f"the key is {SECRET}".encode())
    out, pieces, _ = streamed(packed, [1, 5, 20])
    assert pieces[:-1] == [b""] * (len(pieces) - 1)
    assert SECRET.encode() not in gzip.decompress(out)
    assert b"[REDACTED:api]" in gzip.decompress(out)


def test_bytes_that_are_not_utf8_pass_unchanged_and_keys_among_them_do_not() -> None:
    body = b"\xff\xfe\x00 " + SECRET.encode() + b" \x80\x81\n"
    for cut in range(1, len(body)):
        out, _, _ = streamed(body, [cut])
        assert SECRET.encode() not in out
        assert out.startswith(b"\xff\xfe\x00 ") and out.endswith(b" \x80\x81\n")


def test_a_secret_holding_a_line_break_still_cannot_slip_through() -> None:
    redactor = with_leak_rules([("pem", "line-one-secret\nline-two-secret")])
    body = b"a\nb line-one-secret\nline-two-secret c\n"
    whole = redactor.bytes(body)
    for cut in range(1, len(body)):
        s = StreamRedactor(redactor)
        out = s.feed(body[:cut]) + s.feed(body[cut:]) + s.close()
        assert out == whole and b"line-two-secret" not in out
