"""/v1/proxy as an attacker probes it: a hostile or broken upstream, an agent reading the bytes.

Real parts throughout: the broker serves on its socket in a thread, the upstream is a
real server on loopback that writes, byte for byte, the answer a test gives it
(tests/support/upstream.py, `.../as-written`), and the agent is a subprocess in acme's folder
that sends requests on one connection and prints every byte the broker wrote back.
What the agent read is then decoded the way an agent could (every gzip member, what a
broken stream gave before it broke, packing inside packing) and searched for every
form of every key (tests/support/fixtures.py, computed apart from broker/).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import logging
import os
import socket
import subprocess
import sys
import zlib
from collections.abc import AsyncGenerator, Iterator

import pytest
from support.connect_proxy import Socks5Proxy
from support.fixtures import BrokerThread, World

from broker.calls import server as server_module
from broker.calls.forward import PIECE, Forwarder, UpstreamSettings
from broker.calls.protocol import StreamedAnswer
from broker.config import Auth, ConfigEditor, Credential
from broker.leaks.redact import with_leak_rules
from broker.leaks.stream import HOLD, MAX_HELD, StreamRedactor
from broker.policy import NormalPath
from broker.secrets import Secret, SecretStore

# Sends argv[2] (hex) on the socket argv[1] and prints every byte the broker writes
# back, as hex, a line per read as it arrives, until the broker closes the connection.
RAW_AGENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
while chunk := s.recv(65536):
    print(chunk.hex(), flush=True)
"""

# A provider key no credential manages (the leak rules' business).
PROVIDER_KEY = "ghp_0123456789abcdefABCDEFghijklmnopqrst"

Answer = tuple[int, list[tuple[str, str]], bytes, bool]  # status, headers, body, whole


def get(target: str, close: bool = True) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: outloop\r\n{'Connection: close' if close else 'X-Keep: 1'}\r\n\r\n".encode()


def exchange(world: World, *requests: bytes) -> bytes:
    """Send the requests on one connection (the last one closes it); all the broker wrote."""
    ran = world.python(RAW_AGENT, str(world.socket), b"".join(requests).hex(), cwd=world.acme)
    assert ran.returncode == 0, ran.stderr[-2000:]
    return bytes.fromhex(ran.stdout.replace("\n", ""))


def answers(data: bytes) -> list[Answer]:
    """The responses in `data`, framed as an HTTP/1.1 client frames them."""
    out: list[Answer] = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"a response head that does not end: {head[:80]!r}"
        first, *lines = head.decode("latin-1").split("\r\n")
        assert first.startswith("HTTP/1.1 "), f"not a status line: {first[:80]!r}"
        status = int(first.split(" ")[1])
        headers = [(k.lower(), v) for k, _, v in (line.partition(": ") for line in lines)]
        names = dict(headers)
        whole = True
        if status in (204, 304):
            body = b""
        elif "content-length" in names:
            size = int(names["content-length"])
            body, data = data[:size], data[size:]
        elif names.get("transfer-encoding") == "chunked":
            body, data, whole = dechunk(data)
        else:
            body, data = data, b""
        out.append((status, headers, body, whole))
    return out


def dechunk(data: bytes) -> tuple[bytes, bytes, bool]:
    """(body, what follows it, whether its last chunk came) of a chunked body."""
    body = b""
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return body, b"", False
        size = int(size_line, 16)
        if size == 0:
            assert rest.startswith(b"\r\n")
            return body, rest[2:], True
        if len(rest) < size + 2:
            return body + rest[:size], b"", False
        body, data = body + rest[:size], rest[size + 2 :]


def unpacked(data: bytes, depth: int = 0) -> bytes:
    """Everything an agent could unpack from `data`: every gzip member or zlib stream in a
    row, what a broken one gave before it broke, and packing inside packing."""
    out = b""
    while data[:2] == b"\x1f\x8b" or data[:1] == b"\x78":
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)
        got, rest = b"", b""
        for i in range(len(data)):
            try:
                got += decoder.decompress(data[i : i + 1])
            except zlib.error:
                break
            if decoder.eof:
                rest = decoder.unused_data + data[i + 1 :]
                break
        if not got and not decoder.eof:
            break
        out += unpacked(got, depth + 1) if depth < 6 else got
        data = rest
    return out + data


def assert_clean(world: World, data: bytes) -> None:
    __tracebackhide__ = True
    for seen in (data, unpacked(data)):
        assert not world.leaks(seen), f"secrets leaked: {world.leaks(seen)}"
        assert PROVIDER_KEY.encode() not in seen


def upstream_answer(head: bytes, body: bytes = b"", *, streamed: bool) -> bytes:
    """An answer that goes back whole (it says its length) or streams (it ends at close)."""
    framing = b"Connection: close" if streamed else b"Content-Length: %d" % len(body)
    return b"HTTP/1.1 " + head + b"\r\n" + framing + b"\r\n\r\n" + body


FRAMINGS = pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])


@pytest.fixture(params=["pool", "httpx2"])
def either_way(request: pytest.FixtureRequest, world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerThread]:
    """The broker calling upstream on its own pool, or through httpx2 (a SOCKS5 proxy in ALL_PROXY)."""
    with contextlib.ExitStack() as stack:
        if request.param == "httpx2":
            proxy = stack.enter_context(Socks5Proxy())
            monkeypatch.setenv("ALL_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", "")
        thread = BrokerThread(world.paths).start()
        stack.callback(thread.stop)
        yield thread
        if request.param == "httpx2":
            assert proxy.tunnels  # the calls went that way


# -- framing -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [204, 304])
def test_a_bodyless_answer_that_streams_sends_no_chunk_so_the_next_answer_is_read_right(
    world: World, broker: BrokerThread, status: int
) -> None:
    """A 204 or 304 without a Content-Length streams; a last chunk after its head would be
    read by the agent as the start of the next answer on the connection."""
    data = exchange(world, get(f"/v1/proxy/api/status/{status}", close=False), get("/v1/health"))
    (first, *_, whole), (second, _, body, _) = answers(data)
    assert first == status and whole
    assert second == 200 and b'"ok": true' in body


@FRAMINGS
def test_the_upstream_cannot_forge_the_brokers_own_headers(
    world: World, either_way: BrokerThread, streamed: bool
) -> None:
    world.upstream.raw_parts = [
        upstream_answer(
            b"200 OK\r\nX-Outloop-Audit-Id: forged\r\nX-Outloop-Error: approval_denied", b"ok\n", streamed=streamed
        )
    ]
    ((status, headers, body, whole),) = answers(exchange(world, get("/v1/proxy/api/as-written")))
    assert (status, body, whole) == (200, b"ok\n", True)
    ids = [v for k, v in headers if k == "x-outloop-audit-id"]
    assert len(ids) == 1 and ids[0] != "forged"
    assert not [k for k, _ in headers if k == "x-outloop-error"]


@FRAMINGS
def test_headers_the_upstreams_connection_header_names_are_not_passed_on(
    world: World, either_way: BrokerThread, streamed: bool
) -> None:
    """Hop-by-hop: a header the upstream lists in Connection is for the broker's hop only."""
    world.upstream.raw_parts = [
        upstream_answer(
            b"200 OK\r\nConnection: x-hop, Keep-Alive\r\nX-Hop: for the broker\r\nX-Kept: yes",
            b"ok\n",
            streamed=streamed,
        )
    ]
    ((status, headers, body, _),) = answers(exchange(world, get("/v1/proxy/api/as-written")))
    assert (status, body) == (200, b"ok\n")
    names = {k for k, _ in headers}
    assert "x-kept" in names and "x-hop" not in names


def test_a_declared_gzip_bomb_is_unpacked_a_piece_at_a_time(world: World) -> None:
    """A small gzip chunk can unpack to megabytes: it goes on to the redactor in pieces, so a
    stream's memory does not grow by what one chunk unpacks to."""
    size = 8 * 1024 * 1024
    bomb = gzip.compress(b"\0" * size)
    world.upstream.raw_parts = [
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb
    ]

    async def pieces() -> list[int]:
        forwarder = Forwarder(UpstreamSettings())
        credential = Credential("acme", "api", world.upstream.url, Auth("bearer", ""))
        try:
            stream = await forwarder.open(
                credential, Secret("sk-unused"), "GET", NormalPath((), "/as-written"), [], {}, b""
            )
            return [len(chunk) async for chunk in stream.chunks()]
        finally:
            await forwarder.close()

    sizes = asyncio.run(pieces())
    assert sum(sizes) == size
    assert max(sizes) <= PIECE


# -- headers -----------------------------------------------------------------------------


@FRAMINGS
def test_a_non_ascii_key_in_a_header_is_redacted_when_another_header_is_not_utf8(
    world: World, either_way: BrokerThread, streamed: bool
) -> None:
    """httpx reads every header as latin-1 once one is not UTF-8; the key's UTF-8 bytes
    then go back to the agent as they came, and the agent reads them as UTF-8."""
    key = world.keys[("acme", "legacy")].encode()
    world.upstream.raw_parts = [
        upstream_answer(b"200 OK\r\nX-Echo: " + key + b"\r\nX-Name: caf\xe9", b"ok\n", streamed=streamed),
    ]
    data = exchange(world, get("/v1/proxy/api/as-written"))
    assert_clean(world, data)
    ((status, headers, _, _),) = answers(data)
    assert status == 200 and ("x-echo", "[REDACTED:legacy]") in headers
    assert ("x-name", "caf\xe9") in headers  # the latin-1 value goes back as it came


def test_a_non_ascii_key_with_bytes_that_are_not_utf8_in_one_header_is_redacted(
    world: World, either_way: BrokerThread
) -> None:
    key = world.keys[("acme", "legacy")].encode()
    world.upstream.raw_parts = [upstream_answer(b"200 OK\r\nX-Echo: \xff" + key + b"\xfe", b"ok\n", streamed=True)]
    data = exchange(world, get("/v1/proxy/api/as-written"))
    assert_clean(world, data)
    assert b"\xff[REDACTED:legacy]\xfe" in data


# -- bodies ------------------------------------------------------------------------------


def _packings(key: bytes) -> dict[str, bytes]:
    text = b'{"echo": "' + key + b'"}\n'
    packed = gzip.compress(text)
    bad_crc = bytearray(packed)
    bad_crc[-6] ^= 0xFF
    return {
        "gzip-members": gzip.compress(b"first member\n") + packed,  # gunzip and gzip.decompress read both
        "zlib-streams": zlib.compress(b"first stream\n") + zlib.compress(text),
        "gzip-cut-short": packed[:-8],  # no trailer: gunzip prints what it has, then complains
        "gzip-bad-crc": bytes(bad_crc),
        "zlib-cut-short": zlib.compress(text)[:-4],
        "gzip-3-deep": gzip.compress(gzip.compress(gzip.compress(text))),
        "gzip-5-deep": gzip.compress(gzip.compress(gzip.compress(gzip.compress(gzip.compress(text))))),
        "gzip-bomb": gzip.compress(text + b"\0" * (17 * 1024 * 1024)),  # past what is unpacked to look
    }


@FRAMINGS
@pytest.mark.parametrize("packing", list(_packings(b"k")))
def test_an_undeclared_packed_body_is_redacted_however_an_agent_would_unpack_it(
    world: World, broker: BrokerThread, streamed: bool, packing: str
) -> None:
    blob = _packings(world.keys[("acme", "api")].encode())[packing]
    world.upstream.raw_parts = [
        upstream_answer(b"200 OK\r\nContent-Type: application/octet-stream", blob, streamed=streamed)
    ]
    data = exchange(world, get("/v1/proxy/api/as-written"))
    assert_clean(world, data)
    ((status, _, body, whole),) = answers(data)
    assert status == 200 and whole
    assert b"[REDACTED:" in unpacked(body)


@FRAMINGS
def test_leak_rules_apply_to_an_answer_that_is_not_utf8(world: World, broker: BrokerThread, streamed: bool) -> None:
    body = b"\xff\xfe binary, then text: token " + PROVIDER_KEY.encode() + b"\n"
    world.upstream.raw_parts = [upstream_answer(b"200 OK\r\nContent-Type: text/plain", body, streamed=streamed)]
    data = exchange(world, get("/v1/proxy/api/as-written"))
    assert_clean(world, data)
    ((status, _, got, _),) = answers(data)
    assert status == 200 and got.startswith(b"\xff\xfe binary") and b"[REDACTED:" in got


def test_a_private_key_longer_than_the_hold_is_redacted_as_its_lines_stream() -> None:
    """A PEM block still open after HOLD characters went out line by line, and the leak
    rule matches a block's first line alone: every line after it reached the agent."""
    lines = [base64.b64encode(os.urandom(48)).decode() for _ in range(HOLD // 64 + 64)]
    pem = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END RSA PRIVATE KEY-----\n"
    body = f"data: here\n{pem}data: after\n".encode()
    assert HOLD < len(pem) < MAX_HELD
    redactor = with_leak_rules([("api", "sk-unrelated-Zq9Tr4Lw7Hq2Pk")])
    stream = StreamRedactor(redactor)
    out = [stream.feed(line) for line in body.splitlines(keepends=True)]  # a line a write
    out.append(stream.close())
    sent = b"".join(out)
    assert not [line for line in lines if line.encode() in sent]
    assert sent == redactor.bytes(body)
    assert out[0] == b"data: here\n"


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\\n"], ids=["lf", "crlf", "json-escaped"])
def test_a_private_key_cut_short_of_its_end_line_is_redacted_whole(newline: str) -> None:
    """The rule took a block's BEGIN line and first base64 line: with no END line (an
    answer cut short, a key pasted in part), every later line of the key went out."""
    lines = [base64.b64encode(os.urandom(48)).decode() for _ in range(6)] + ["Zw=="]
    body = f"data: here{newline}-----BEGIN RSA PRIVATE KEY-----{newline}" + newline.join(lines) + newline
    body += f"data: after, a line of prose that stays{newline}"
    redactor = with_leak_rules([("api", "sk-unrelated-Zq9Tr4Lw7Hq2Pk")])
    stream = StreamRedactor(redactor)
    for out in (redactor.text(body), (stream.feed(body.encode()) + stream.close()).decode()):
        assert not [line for line in lines if line in out]
        assert "data: after, a line of prose that stays" in out


# -- ends of a stream --------------------------------------------------------------------


@pytest.fixture
def gated(world: World) -> World:
    """acme's "stream" credential, on the upstream's gated routes."""
    editor = ConfigEditor(world.paths)
    editor.add_credential(
        "acme", "stream", {"base_url": f"{world.upstream.url}/gated", "auth": "bearer", "allow": ["GET /**"]}
    )
    editor.save()
    key = "sk-stream-attack-Kq81ZmT4vXa9Lw2"
    SecretStore().set("acme", "stream", Secret(key))
    world.keys[("acme", "stream")] = key
    return world


def test_a_broker_that_stops_mid_stream_cuts_it_and_audits_it(gated: World, caplog: pytest.LogCaptureFixture) -> None:
    up = gated.upstream
    up.stream_parts = [b"data: one\n\n", b"data: never sent\n\n"]
    thread = BrokerThread(gated.paths).start()
    agent = subprocess.Popen(
        [sys.executable, "-c", RAW_AGENT, str(gated.socket), get("/v1/proxy/stream/sse").hex()],
        cwd=gated.acme,
        env=gated.env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert agent.stdout is not None
    try:
        seen = b""
        while b"data: one" not in seen:  # the first event is through: the broker waits for the next
            line = agent.stdout.readline()
            assert line, "the agent ended early"
            seen += bytes.fromhex(line)
        with caplog.at_level(logging.ERROR):
            thread.stop()
        seen += bytes.fromhex(agent.communicate(timeout=60)[0].replace("\n", ""))
    finally:
        up.release()
        up.step(5)
        thread.stop()
    ((status, _, body, whole),) = answers(seen)
    assert status == 200 and not whole  # no last chunk: the agent knows it was cut
    assert body == b"data: one\n\n"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    (rec,) = [r for r in gated.audit() if r.get("event") == "outcome" and r.get("credential") == "stream"]
    assert rec["upstream_status"] == 200 and rec["bytes"] == len(b"data: one\n\n")
    assert rec["status"] == "broker_stopped"  # not the agent's doing


def test_a_stream_cancelled_while_its_generator_winds_down_is_closed_after_it(broker: BrokerThread) -> None:
    """When the broker stops, a streaming connection is cancelled while its pump waits in
    the answer's generator. Closing the upstream call and auditing it there take turns of
    the loop: the generator may be closed only once the pump is out of it (else aclose()
    raises "asynchronous generator is already running" and the connection dies unhandled)."""
    wound_down = []

    async def body() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: one\n\n"
            await asyncio.Event().wait()  # the upstream is quiet
        finally:
            for _ in range(3):  # (the relay's `await upstream.aclose()`, `await audit.record()`)
                await asyncio.sleep(0)
            wound_down.append(True)

    async def scenario() -> BaseException | None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        conn = server_module._Connection(broker.engine, reader, writer)
        task = asyncio.ensure_future(conn._send_stream(StreamedAnswer(200, [], body(), "a1"), close=True))
        seen = b""
        while b"data: one" not in seen:
            seen += await asyncio.get_running_loop().sock_recv(theirs, 65536)
        task.cancel()
        try:
            await task
        except BaseException as e:  # noqa: BLE001 - which one is the point
            return e
        finally:
            conn.close()
            writer.close()
            theirs.close()
        return None

    error = broker.run(scenario())
    assert isinstance(error, asyncio.CancelledError), repr(error)
    assert wound_down == [True]
