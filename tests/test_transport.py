"""The broker's pooled HTTP/1.1 client (broker/transport.py) against real loopback servers.

Each upstream here is a raw asyncio server that writes exact bytes, so a test can send
what a well-behaved server would not (a second response, a 70 KiB head, a FIN in the
middle of a body) and count the TCP connections the pool opened. Every wait is bounded:
the client's timeouts and the server-side waits give up after WAIT seconds, which only
a broken transport reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import socket
import ssl
import struct
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx
import pytest
import trustme

from broker.calls.transport import MAX_HEAD_BYTES, PooledTransport, ResponseTooLarge, Streamed

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # seconds; the upper bound on every wait in this file
MiB = 1024 * 1024


# -- a raw upstream ---------------------------------------------------------------------------


@dataclass
class Request:
    """One request as the server read it off the wire."""

    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


class Conn:
    """The server's side of one accepted connection."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index  # 0 for the first connection accepted, and so on
        self.reader = reader
        self.writer = writer
        self.eof = asyncio.Event()  # the client closed the connection
        self.closed = asyncio.Event()  # the server's side is closed

    async def request(self) -> Request | None:
        """The next request, or None once the client has closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            if isinstance(e, asyncio.IncompleteReadError) and e.partial:
                raise AssertionError(f"a torn request head: {e.partial[:80]!r}") from None
            self.eof.set()
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked_body()
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return Request(method, target, headers, body)

    async def _chunked_body(self) -> bytes:
        parts: list[bytes] = []
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await self.reader.readexactly(size))
            assert await self.reader.readexactly(2) == b"\r\n"
        while await self.reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return b"".join(parts)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_eof(self) -> None:
        """Read (and drop) whatever the client sends until it closes the connection."""
        while await self.reader.read(65536):
            pass
        self.eof.set()


Handler = Callable[[Conn], Awaitable[None]]


class RawServer:
    """A TCP (or TLS) server on 127.0.0.1 whose handler writes exact bytes."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.conns: list[Conn] = []
        self._handler = handler
        self._ssl = ssl_context
        self._tasks: set[asyncio.Task[Any]] = set()
        self.url = ""

    @property
    def accepted(self) -> int:
        return len(self.conns)

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ssl)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self._ssl else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=WAIT)
        await asyncio.wait_for(self._server.wait_closed(), WAIT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.eof.set()  # the client went away mid-exchange
        except asyncio.CancelledError:
            pass  # the test is over (asyncio would log a cancelled handler as an error)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass
            conn.closed.set()
            self._tasks.discard(task)


def response(body: bytes = b"", status: str = "200 OK", *headers: str) -> bytes:
    """An HTTP/1.1 response with a Content-Length."""
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def echo(conn: Conn) -> None:
    """Keep-alive: answer every request with the connection's index, the method and target."""
    while (req := await conn.request()) is not None:
        await conn.send(response(f"{conn.index} {req.method} {req.target}".encode()))


def answer_together(parties: int, body: Callable[[Conn, Request], str], wait_for: str = "/") -> Handler:
    """Keep-alive: hold each request whose target starts with `wait_for` until
    `parties` of them are in (so that many calls are in flight at once), then answer."""
    barrier = asyncio.Barrier(parties)

    async def handler(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.target.startswith(wait_for):
                async with asyncio.timeout(WAIT):
                    await barrier.wait()
            await conn.send(response(body(conn, req).encode()))

    return handler


async def stall(conn: Conn) -> None:
    """Read the request, then never answer."""
    await conn.request()
    await asyncio.sleep(WAIT * 3)


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def bounded(call: Awaitable[Reply]) -> Reply:
    """A call that must end (answer or raise) within WAIT, whatever the transport's timeouts do."""
    return await asyncio.wait_for(call, WAIT)


async def settle() -> None:
    """Let the event loop poll its sockets, so a FIN already in the kernel reaches the pool."""
    await asyncio.sleep(0.05)


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]  # names in lower case
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()


class Client:
    """Calls `PooledTransport.open` by URL, with the headers the broker would add; `request` reads the answer whole."""

    def __init__(self, *, timeout: float = WAIT, max_bytes: int = 64 * MiB, **options: Any) -> None:
        self.transport = PooledTransport(**options)
        self.timeout = timeout
        self.max_bytes = max_bytes

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def request(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        *,
        headers: list[tuple[bytes, bytes]] = (),
        timeout: float | None = None,
        lane: tuple[str, ...] = (),
    ) -> Reply:
        answer = await self.open(method, url, body, headers=headers, timeout=timeout, lane=lane)
        try:
            parts = []
            while data := await answer.read(timeout or self.timeout):
                parts.append(data)
        finally:
            answer.close()
        return Reply(answer.status, {k.decode(): v.decode() for k, v in answer.headers}, b"".join(parts))

    async def open(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        *,
        headers: list[tuple[bytes, bytes]] = (),
        timeout: float | None = None,
        lane: tuple[str, ...] = (),
    ) -> Streamed:
        parts = urlsplit(url)
        assert parts.hostname is not None
        origin = (
            parts.scheme.encode(),
            parts.hostname.encode(),
            parts.port or (443 if parts.scheme == "https" else 80),
        )
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent = [(b"Host", parts.netloc.encode()), *headers]
        if body or method == "POST":
            sent.append((b"Content-Length", str(len(body)).encode()))
        return await self.transport.open(
            origin,
            method.encode(),
            target.encode(),
            sent,
            body,
            timeout=timeout or self.timeout,
            max_bytes=self.max_bytes,
            lane=lane,
        )

    async def get(self, url: str, **options: Any) -> Reply:
        return await self.request("GET", url, **options)

    async def post(self, url: str, body: bytes, **options: Any) -> Reply:
        return await self.request("POST", url, body, **options)


def client(**options: Any) -> Client:
    return Client(**options)


@pytest.fixture
async def upstream() -> AsyncIterator[RawServer]:
    async with RawServer(echo) as server:
        yield server


# -- keep-alive ------------------------------------------------------------------------------


async def test_sequential_calls_share_one_connection(upstream: RawServer) -> None:
    async with client() as c:
        for i in range(20):
            r = await c.get(f"{upstream.url}/n/{i}?q={i}")
            assert (r.status_code, r.text) == (200, f"0 GET /n/{i}?q={i}")
    assert upstream.accepted == 1


async def test_concurrent_calls_each_get_their_own_answer_then_reuse_the_connections() -> None:
    # The server answers only once all ten requests are in, so ten calls in flight
    # need ten connections, and the second round must find them all in the pool.
    together = answer_together(10, lambda conn, req: f"{conn.index} {req.target}")
    async with RawServer(together) as server, client() as c:
        for _ in range(2):
            answers = await asyncio.gather(*(c.get(f"{server.url}/call/{i}") for i in range(10)))
            assert [a.text.split()[1] for a in answers] == [f"/call/{i}" for i in range(10)]
            assert sorted(int(a.text.split()[0]) for a in answers) == list(range(10))
        assert server.accepted == 10


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def one_answer_then_fin(conn: Conn) -> None:
        req = await conn.request()
        assert req is not None
        await conn.send(response(f"{conn.index}".encode()))  # keep-alive by default, then a FIN

    async with RawServer(one_answer_then_fin) as server, client() as c:
        for i in range(5):
            r = await c.get(f"{server.url}/")
            assert r.text == str(i)
            await asyncio.wait_for(server.conns[i].closed.wait(), WAIT)
            await settle()
        assert server.accepted == 5


async def test_a_server_that_closes_right_after_answering_is_not_an_error() -> None:
    # The FIN follows the body at once, so it may reach the client before or after the
    # caller has read the body and the connection has gone back to the pool.
    async def one_answer_then_fin(conn: Conn) -> None:
        if await conn.request() is not None:
            await conn.send(response(b"ok"))

    async with RawServer(one_answer_then_fin) as server, client() as c:
        for _ in range(5):
            assert (await c.get(f"{server.url}/")).text == "ok"
            await settle()
        assert server.accepted == 5


@pytest.mark.parametrize(
    "answer",
    [
        response(b"bye", "200 OK", "Connection: close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",  # HTTP/1.0 without keep-alive
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_a_connection_the_server_will_not_keep_is_closed_not_reused(answer: bytes) -> None:
    async def answer_then_linger(conn: Conn) -> None:
        if await conn.request() is not None:
            await conn.send(answer)
            await conn.until_eof()  # the server keeps its side open: the client must hang up

    async with RawServer(answer_then_linger) as server, client() as c:
        assert (await c.get(f"{server.url}/a")).text == "bye"
        await asyncio.wait_for(server.conns[0].eof.wait(), WAIT)
        assert (await c.get(f"{server.url}/b")).text == "bye"
        assert server.accepted == 2


async def test_a_body_delimited_by_the_connection_closing() -> None:
    body = bytes(range(256)) * 1200  # 300 KiB: more than one read

    async def until_close(conn: Conn) -> None:
        if await conn.request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + body)

    async with RawServer(until_close) as server, client() as c:
        for _ in range(2):
            r = await c.get(f"{server.url}/")
            assert r.status_code == 200 and r.content == body
        assert server.accepted == 2


async def test_a_chunked_response_is_read_and_its_connection_reused() -> None:
    async def chunked(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n"
                b"7;name=value\r\n, world\r\n"  # a chunk extension
                b"1\r\n!\r\n"
                b"0\r\nX-Trailer: done\r\n\r\n"
            )  # a trailer

    async with RawServer(chunked) as server, client() as c:
        for _ in range(3):
            assert (await c.get(f"{server.url}/")).text == "hello, world!"
        assert server.accepted == 1


async def test_head_204_and_304_have_no_body_and_keep_the_connection() -> None:
    answers = {
        "/head": response(b"", "200 OK").replace(b"Content-Length: 0", b"Content-Length: 1000"),
        "/204": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        "/304": b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\nETag: "x"\r\n\r\n',
    }

    async def bodyless(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            await conn.send(answers.get(req.target, response(b"after")))

    async with RawServer(bodyless) as server, client() as c:
        head = await c.request("HEAD", f"{server.url}/head")
        assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "1000")
        r204 = await c.get(f"{server.url}/204")
        assert (r204.status_code, r204.content, r204.headers["x-a"]) == (204, b"", "1")
        r304 = await c.get(f"{server.url}/304")
        assert (r304.status_code, r304.content) == (304, b"")
        assert (await c.get(f"{server.url}/after")).text == "after"
        assert server.accepted == 1


async def test_an_interim_100_continue_is_skipped() -> None:
    async def interim(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"final"))

    async with RawServer(interim) as server, client() as c:
        for _ in range(2):
            r = await c.post(f"{server.url}/", b"x")
            assert (r.status_code, r.text) == (200, "final")
        assert server.accepted == 1


async def test_a_call_cancelled_mid_answer_does_not_leave_its_connection_for_reuse() -> None:
    # The rest of the first answer may still come; it must never be read as the next one's.
    async def half_then_echo(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.target == "/half":
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            else:
                await conn.send(response(f"{conn.index}".encode()))

    async with RawServer(half_then_echo) as server, client() as c:
        call = asyncio.ensure_future(c.get(f"{server.url}/half"))
        await eventually(lambda: server.accepted == 1, "the call to reach the server")
        await settle()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert (await c.get(f"{server.url}/next")).text == "1"
        await asyncio.wait_for(server.conns[0].eof.wait(), WAIT)
        assert server.accepted == 2


async def test_a_body_after_the_answer_to_head_retires_the_connection() -> None:
    async def head_with_body(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.method == "HEAD":
                await conn.send(response(b"a body HEAD must not have"))
            else:
                await conn.send(response(f"{conn.index}".encode()))

    async with RawServer(head_with_body) as server, client() as c:
        head = await c.request("HEAD", f"{server.url}/")
        assert (head.status_code, head.content) == (200, b"")
        await settle()
        assert (await c.get(f"{server.url}/next")).text == "1"


async def test_extra_bytes_after_a_response_are_never_the_next_call_s_answer() -> None:
    # A second, unasked-for response on the wire must not become the answer to
    # whoever uses the connection next (another tenant, in the broker).
    async def two_answers(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if conn.index == 0:
                await conn.send(response(b"first") + response(b"stale"))
            else:
                await conn.send(response(req.target.encode()))

    async with RawServer(two_answers) as server, client() as c:
        assert (await c.get(f"{server.url}/one")).text == "first"
        assert (await c.get(f"{server.url}/two")).text == "/two"


async def test_bytes_that_arrive_on_an_idle_connection_retire_it() -> None:
    # Some servers send "408 Request Timeout" on an idle connection before closing it.
    sent = asyncio.Event()

    async def late_408(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            await conn.send(response(req.target.encode()))
            if conn.index == 0:
                await conn.send(response(b"", "408 Request Timeout"))
                sent.set()

    async with RawServer(late_408) as server, client() as c:
        assert (await c.get(f"{server.url}/one")).text == "/one"
        await asyncio.wait_for(sent.wait(), WAIT)
        await settle()
        r = await c.get(f"{server.url}/two")
        assert (r.status_code, r.text) == (200, "/two")


# -- failures ---------------------------------------------------------------------------------


async def test_a_server_that_never_answers_raises_read_timeout() -> None:
    async with RawServer(stall) as server, client(timeout=0.3) as c:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await bounded(c.get(f"{server.url}/"))
        assert time.monotonic() - start < WAIT / 2


async def test_a_body_that_stops_coming_raises_read_timeout() -> None:
    async def half_a_body(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await asyncio.sleep(WAIT * 3)

    async with RawServer(half_a_body) as server, client(timeout=0.3) as c:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await bounded(c.get(f"{server.url}/"))
        assert time.monotonic() - start < WAIT / 2


async def test_a_closed_port_raises_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await bounded(c.get(f"http://127.0.0.1:{port}/"))


def held_until(release: asyncio.Event) -> Handler:
    """Keep-alive echo that answers /held only once `release` is set."""

    async def handler(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.target == "/held":
                await asyncio.wait_for(release.wait(), WAIT)
            await conn.send(response(f"{conn.index} {req.method} {req.target}".encode()))

    return handler


async def test_an_exhausted_pool_raises_pool_timeout_and_recovers() -> None:
    release = asyncio.Event()
    async with RawServer(held_until(release)) as server, client(max_connections=1) as c:
        held = asyncio.ensure_future(c.get(f"{server.url}/held"))
        await eventually(lambda: server.accepted == 1, "the held call to reach the server")
        start = time.monotonic()
        with pytest.raises(httpx.PoolTimeout):
            await bounded(c.get(f"{server.url}/waits", timeout=0.2))
        assert time.monotonic() - start < WAIT / 2
        release.set()
        assert (await bounded(held)).text == "0 GET /held"
        assert (await c.get(f"{server.url}/after")).text == "0 GET /after"


async def test_one_lane_using_all_its_connections_keeps_no_other_lane_waiting() -> None:
    release = asyncio.Event()
    async with RawServer(held_until(release)) as server, client(max_connections=1) as c:
        held = asyncio.ensure_future(c.get(f"{server.url}/held", lane=("acme", "api")))
        await eventually(lambda: server.accepted == 1, "the held call to reach the server")
        with pytest.raises(httpx.PoolTimeout):
            await bounded(c.get(f"{server.url}/waits", timeout=0.2, lane=("acme", "api")))
        assert (await bounded(c.get(f"{server.url}/other", lane=("globex", "api")))).text == "1 GET /other"
        release.set()
        assert (await bounded(held)).text == "0 GET /held"


async def test_a_waiting_call_gets_the_connection_when_it_comes_free() -> None:
    release = asyncio.Event()
    async with RawServer(held_until(release)) as server, client(max_connections=1) as c:
        held = asyncio.ensure_future(c.get(f"{server.url}/held"))
        await eventually(lambda: server.accepted == 1, "the held call to reach the server")
        waiting = asyncio.ensure_future(c.get(f"{server.url}/next"))
        await settle()
        assert not waiting.done()
        release.set()
        assert (await bounded(held)).text == "0 GET /held"
        assert (await bounded(waiting)).text == "0 GET /next"
        assert server.accepted == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["status", "not-http", "length", "two-lengths", "header", "chunk-size"],
)
async def test_malformed_responses_raise_remote_protocol_error(garbage: bytes) -> None:
    async def malformed_first(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            await conn.send(garbage if conn.index == 0 else response(req.target.encode()))

    async with RawServer(malformed_first) as server, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await bounded(c.get(f"{server.url}/bad"))
        await asyncio.wait_for(server.conns[0].eof.wait(), WAIT)  # the broken connection is closed
        assert (await c.get(f"{server.url}/good")).text == "/good"
        assert server.accepted == 2


@pytest.mark.parametrize("whole", [True, False], ids=["complete-head", "endless-head"])
async def test_a_response_head_over_the_limit_raises_remote_protocol_error(whole: bool) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(
        b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 5)
    )
    assert len(head) > MAX_HEAD_BYTES

    async def big_head(conn: Conn) -> None:
        await conn.request()
        await conn.send(head + b"Content-Length: 2\r\n\r\nok" if whole else head)
        await conn.until_eof()

    async with RawServer(big_head) as server, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await bounded(c.get(f"{server.url}/"))
        await asyncio.wait_for(server.conns[0].eof.wait(), WAIT)


async def test_a_head_just_under_the_limit_is_accepted() -> None:
    filler = MAX_HEAD_BYTES // 2

    async def large_head(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(response(b"ok", "200 OK", f"X-Filler: {'f' * filler}"))

    async with RawServer(large_head) as server, client() as c:
        r = await c.get(f"{server.url}/")
        assert r.text == "ok" and len(r.headers["x-filler"]) == filler


@pytest.mark.parametrize(
    "answer",
    [
        b"",  # no response at all
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 100,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"z" * 50,
        b"HTTP/1.1 200 OK\r\nContent-Len",  # a torn head
    ],
    ids=["nothing", "content-length", "chunked", "torn-head"],
)
async def test_a_server_that_hangs_up_mid_response_raises_remote_protocol_error(answer: bytes) -> None:
    async def hang_up(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer)

    async with RawServer(hang_up) as server, client() as c:
        start = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            await bounded(c.get(f"{server.url}/"))
        assert time.monotonic() - start < WAIT / 2  # an error, not a wait for the read timeout
        assert server.accepted == 1


async def test_a_server_that_resets_the_connection_mid_body_raises_an_error() -> None:
    async def reset(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 100)
        # SO_LINGER 0: close with an RST rather than a FIN.
        conn.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()

    async with RawServer(reset) as server, client() as c:
        start = time.monotonic()
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await bounded(c.get(f"{server.url}/"))
        assert time.monotonic() - start < WAIT / 2


async def test_a_server_that_never_reads_raises_write_timeout() -> None:
    async def deaf(conn: Conn) -> None:
        await asyncio.sleep(WAIT * 3)

    body = b"w" * (64 * MiB)  # far more than the socket buffers hold
    async with RawServer(deaf) as server, client(timeout=0.3) as c:
        with pytest.raises(httpx.WriteTimeout):
            await bounded(c.post(f"{server.url}/", body))


# -- bodies -----------------------------------------------------------------------------------


async def digest(conn: Conn) -> None:
    """Answer each request with its body's length and SHA-256."""
    while (req := await conn.request()) is not None:
        await conn.send(response(f"{len(req.body)} {hashlib.sha256(req.body).hexdigest()}".encode()))


async def test_a_large_request_body_arrives_intact() -> None:
    body = hashlib.sha256(b"seed").digest() * (8 * MiB // 32)  # 8 MiB
    assert len(body) == 8 * MiB

    async with RawServer(digest) as server, client() as c:
        for _ in range(2):
            r = await c.post(f"{server.url}/upload", body)
            assert r.text == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
        assert server.accepted == 1


def block(i: int) -> bytes:
    """The i-th MiB of a large response: different bytes in every block."""
    return hashlib.sha256(i.to_bytes(4, "big")).digest() * (MiB // 32)


async def test_a_large_response_arrives_intact() -> None:
    blocks = 20
    expected = hashlib.sha256(b"".join(block(i) for i in range(blocks))).hexdigest()

    async def large(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {blocks * MiB}\r\n\r\n".encode())
            for i in range(blocks):
                await conn.send(block(i))

    async with RawServer(large) as server, client() as c:
        for _ in range(2):
            r = await c.get(f"{server.url}/large")
            assert (len(r.content), hashlib.sha256(r.content).hexdigest()) == (blocks * MiB, expected)
        assert server.accepted == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until-close"])
async def test_a_body_over_the_cap_raises_response_too_large(framing: str) -> None:
    big = b"z" * (2 * MiB)
    heads = {
        "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big),
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(big),
        "until-close": b"HTTP/1.1 200 OK\r\n\r\n",
    }

    async def oversized(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if conn.index == 0:
                await conn.send(heads[framing] + big)
                await conn.until_eof()
            else:
                await conn.send(response(req.target.encode()))

    async with RawServer(oversized) as server, client(max_bytes=MiB) as c:
        with pytest.raises(ResponseTooLarge):
            await bounded(c.get(f"{server.url}/big"))
        await asyncio.wait_for(server.conns[0].eof.wait(), WAIT)  # not kept: the rest is unread
        assert (await c.get(f"{server.url}/next")).text == "/next"


@pytest.mark.parametrize(
    "value", [b"a\r\nX-Injected: 1", b"a\nb", b"a\x00b", b"a\x7fb"], ids=["crlf", "lf", "nul", "del"]
)
async def test_a_header_value_that_could_split_the_request_is_never_sent(upstream: RawServer, value: bytes) -> None:
    # The message names the header, never its value: that may be the key.
    async with client() as c:
        with pytest.raises(httpx.LocalProtocolError) as caught:
            await c.get(f"{upstream.url}/", headers=[(b"Authorization", b"Bearer " + value)])
        assert "Authorization" in str(caught.value) and b"Bearer" not in str(caught.value).encode()
    assert upstream.accepted == 0


async def test_a_header_value_is_sent_without_surrounding_whitespace() -> None:
    heads: list[bytes] = []

    async def record(conn: Conn) -> None:
        heads.append(await conn.reader.readuntil(b"\r\n\r\n"))
        await conn.send(response(b"ok"))

    async with RawServer(record) as server, client() as c:
        await c.get(f"{server.url}/", headers=[(b"X-Spaced", b" \tvalue with inner spaces\t ")])
    assert b"\r\nX-Spaced: value with inner spaces\r\n" in heads[0]


# -- TLS and shutdown -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_https_with_a_trusted_certificate(ca: trustme.CA) -> None:
    async with RawServer(echo, server_context(ca, "127.0.0.1")) as server, client(ssl_context=trusting(ca)) as c:
        for i in range(3):
            r = await c.get(f"{server.url}/tls/{i}")
            assert r.text == f"0 GET /tls/{i}"
        assert server.accepted == 1


async def test_https_large_response_over_tls(ca: trustme.CA) -> None:
    blocks = 8
    expected = hashlib.sha256(b"".join(block(i) for i in range(blocks))).hexdigest()

    async def large(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {blocks * MiB}\r\n\r\n".encode())
            for i in range(blocks):
                await conn.send(block(i))

    async with RawServer(large, server_context(ca, "127.0.0.1")) as server, client(ssl_context=trusting(ca)) as c:
        for _ in range(2):
            r = await c.get(f"{server.url}/")
            assert hashlib.sha256(r.content).hexdigest() == expected
        assert server.accepted == 1


async def test_https_with_an_untrusted_certificate_raises_connect_error(ca: trustme.CA) -> None:
    async with RawServer(echo, server_context(ca, "127.0.0.1")) as server, client() as c:
        with pytest.raises(httpx.ConnectError):
            await bounded(c.get(f"{server.url}/"))


async def test_https_with_a_certificate_for_another_name_raises_connect_error(ca: trustme.CA) -> None:
    async with RawServer(echo, server_context(ca, "upstream.example")) as server, client(ssl_context=trusting(ca)) as c:
        with pytest.raises(httpx.ConnectError):
            await bounded(c.get(f"{server.url}/"))


async def test_aclose_closes_the_pooled_connections() -> None:
    together = answer_together(3, lambda conn, req: req.target)
    async with RawServer(together) as server:
        c = client()
        await asyncio.gather(*(c.get(f"{server.url}/{i}") for i in range(3)))
        assert server.accepted == 3
        assert not any(conn.eof.is_set() for conn in server.conns)
        await c.aclose()
        for conn in server.conns:
            await asyncio.wait_for(conn.eof.wait(), WAIT)


async def test_idle_connections_over_max_idle_are_closed() -> None:
    together = answer_together(5, lambda conn, req: f"{conn.index}", wait_for="/together")
    async with RawServer(together) as server, client(max_idle=2) as c:
        await asyncio.gather(*(c.get(f"{server.url}/together") for _ in range(5)))
        await eventually(
            lambda: sum(conn.eof.is_set() for conn in server.conns) == 3, "the three connections over max_idle to close"
        )
        # The most recently used connection is taken first, so one serves them all.
        again = {(await c.get(f"{server.url}/again")).text for _ in range(4)}
        assert len(again) == 1
        assert server.accepted == 5


async def test_connections_idle_longer_than_idle_seconds_are_not_reused(upstream: RawServer) -> None:
    async with client(idle_seconds=0.0) as c:
        assert [(await c.get(f"{upstream.url}/")).text for _ in range(3)] == ["0 GET /", "1 GET /", "2 GET /"]
        await eventually(
            lambda: sum(conn.eof.is_set() for conn in upstream.conns) == 2, "the expired connections to close"
        )


# -- what a pooled connection may hold, and how connections end -----------------------------


def thread_server(script: Callable[[int, socket.socket], None]) -> tuple[socket.socket, str]:
    """A blocking server in threads of its own: it goes on sending while the event loop
    is busy and not reading, which an asyncio server on the same loop cannot."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(WAIT)
    accepted = 0

    def accept() -> None:
        nonlocal accepted
        try:
            while True:
                sock, _ = listener.accept()
                sock.settimeout(WAIT)
                threading.Thread(target=script, args=(accepted, sock), daemon=True).start()
                accepted += 1
        except OSError:
            pass  # the listener was closed: the test is over

    threading.Thread(target=accept, daemon=True).start()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def read_target(sock: socket.socket) -> bytes | None:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        head += chunk
    return head.split(b" ")[1]


async def test_an_answer_nobody_asked_for_still_in_the_kernel_is_never_the_next_answer() -> None:
    # The stray answer reaches the client's socket while the loop is busy (it has not
    # read it yet) and the connection is idle in the pool: taking it must notice.
    def late_second_answer(index: int, sock: socket.socket) -> None:
        with contextlib.suppress(OSError), sock:
            while (target := read_target(sock)) is not None:
                sock.sendall(response(target))
                if target == b"/one":
                    time.sleep(0.05)
                    sock.sendall(response(b"STALE: an answer nobody asked for"))

    listener, url = thread_server(late_second_answer)
    with listener:
        async with client() as c:
            assert (await c.get(f"{url}/one")).text == "/one"
            time.sleep(0.3)  # noqa: ASYNC251 - the loop is busy elsewhere on purpose
            assert (await c.get(f"{url}/two")).text == "/two"


async def test_a_hang_up_still_in_the_kernel_makes_the_next_call_connect_afresh() -> None:
    def answer_then_hang_up(index: int, sock: socket.socket) -> None:
        with sock:
            read_target(sock)
            sock.sendall(response(b"%d" % index))
            time.sleep(0.05)

    listener, url = thread_server(answer_then_hang_up)
    with listener:
        async with client() as c:
            assert (await c.get(f"{url}/one")).text == "0"
            time.sleep(0.3)  # noqa: ASYNC251 - the FIN is in the kernel, not yet seen by asyncio
            assert (await c.get(f"{url}/two")).text == "1"


async def test_a_connection_the_server_closed_while_idle_leaves_the_pool_at_once() -> None:
    # Dead connections must not fill max_idle and crowd out live ones to another host.
    async def answer_then_fin(conn: Conn) -> None:
        if await conn.request() is not None:
            await conn.send(response(b"a"))

    async with RawServer(answer_then_fin) as a, RawServer(echo) as b, client(max_idle=1) as c:
        assert (await c.get(f"{a.url}/")).text == "a"
        await asyncio.wait_for(a.conns[0].closed.wait(), WAIT)
        await settle()
        for _ in range(3):
            await c.get(f"{b.url}/")
        assert b.accepted == 1


async def test_an_idle_connection_is_closed_after_idle_seconds_even_with_no_more_calls() -> None:
    async with RawServer(echo) as a, client(idle_seconds=0.1) as c:
        await c.get(f"{a.url}/")
        await asyncio.wait_for(a.conns[0].eof.wait(), WAIT)


async def test_a_cancelled_upload_stops_going_out() -> None:
    # The broker gave up on the call: the upstream must not receive the rest and act on it.
    received: dict[str, int] = {}

    async def slow_reader(conn: Conn) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        got = 0
        try:
            while got < length and (chunk := await conn.reader.read(65536)):
                got += len(chunk)
                await asyncio.sleep(0.002)
        finally:
            received["bytes"], received["of"] = got, length

    async with RawServer(slow_reader) as server, client() as c:
        call = asyncio.ensure_future(c.post(f"{server.url}/orders", b"u" * (16 * MiB)))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(server.conns[0].closed.wait(), WAIT)
    assert received["bytes"] < received["of"]


async def test_a_slow_but_steady_upload_is_not_a_timeout() -> None:
    # `timeout` bounds a stall, not the whole upload: 8 MiB at ~6 MB/s under a 0.5 s timeout.
    async def steady_reader(conn: Conn) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        got = 0
        while got < length:
            got += len(await conn.reader.read(min(65536, length - got)))
            await asyncio.sleep(0.01)
        await conn.send(response(b"%d" % got))

    body = b"u" * (8 * MiB)
    async with RawServer(steady_reader) as server, client(timeout=0.5) as c:
        assert (await bounded(c.post(f"{server.url}/", body))).text == str(len(body))


async def test_closing_the_pool_ends_a_call_in_flight_at_once() -> None:
    release = asyncio.Event()
    async with RawServer(held_until(release)) as server:
        c = client(max_connections=1)
        held = asyncio.ensure_future(c.get(f"{server.url}/held"))
        await eventually(lambda: server.accepted == 1, "the held call to reach the server")
        waiting = asyncio.ensure_future(c.get(f"{server.url}/after-close"))
        await settle()
        await c.aclose()
        start = time.monotonic()
        with pytest.raises(httpx.ReadError):
            await bounded(held)
        assert time.monotonic() - start < WAIT / 2
        with pytest.raises(RuntimeError):  # it waited for a slot: it must not connect now
            await bounded(waiting)
        release.set()
        assert server.accepted == 1


async def test_a_server_that_hangs_up_during_an_upload_leaves_no_unread_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def hang_up(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        conn.writer.transport.abort()

    async with RawServer(hang_up) as server, client(timeout=2) as c:
        with pytest.raises(httpx.HTTPError):
            await bounded(c.post(f"{server.url}/", b"w" * (64 * MiB)))
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_tiny_chunks_cost_no_more_memory_than_their_bytes() -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"2\r\nab\r\n" * (MiB // 2) + b"0\r\n\r\n"
    )  # 1 MiB of body, 3.5 MiB on the wire

    async def tiny_chunks(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(wire)

    async with RawServer(tiny_chunks) as server, client(max_bytes=MiB) as c:
        tracemalloc.start()
        try:
            r = await c.get(f"{server.url}/")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(r.content) == MiB
    assert peak < 12 * MiB  # the wire (3.5 MiB, held by the test server too) and one copy of the body


async def test_endless_interim_answers_end_the_call() -> None:
    async def interims(conn: Conn) -> None:
        await conn.request()
        for _ in range(40):
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await asyncio.sleep(0.05)
        await conn.until_eof()

    async with RawServer(interims) as server, client(timeout=0.3) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await bounded(c.get(f"{server.url}/"))


async def test_the_answer_to_head_without_a_length_keeps_the_connection() -> None:
    async def head_no_length(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.method == "HEAD":
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            else:
                await conn.send(response(req.target.encode()))

    async with RawServer(head_no_length) as server, client() as c:
        assert (await c.request("HEAD", f"{server.url}/")).status_code == 200
        assert (await c.get(f"{server.url}/x")).text == "/x"
        assert server.accepted == 1


async def test_an_answer_before_the_upload_is_done_is_given_and_the_connection_not_reused() -> None:
    # A 413 sent on reading the head: the caller gets it, and what is left of the body
    # never reaches the next call's request on that connection.
    async def refuse_early(conn: Conn) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        if b"/upload" in head:
            await conn.send(response(b"too large", "413 Content Too Large"))
            await conn.until_eof()
            return
        await conn.send(response(b"fresh"))

    async with RawServer(refuse_early) as server, client(timeout=2) as c:
        r = await bounded(c.post(f"{server.url}/upload", b"w" * (64 * MiB)))
        assert (r.status_code, r.text) == (413, "too large")
        assert (await c.get(f"{server.url}/next")).text == "fresh"
        assert server.accepted == 2


# -- answers read as they arrive (PooledTransport.open) --------------------------------------


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def then_silent(conn: Conn) -> None:
    """One SSE event, then silence until the client hangs up."""
    await conn.request()
    await conn.send(CHUNKED_HEAD + chunk(b"data: one\n\n"))
    await conn.until_eof()


async def test_a_body_is_given_as_it_arrives_and_the_connection_kept_after_it() -> None:
    sent_next = asyncio.Event()
    go_on = asyncio.Event()

    async def two_parts(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.target != "/stream":
                await conn.send(response(b"after"))
                continue
            await conn.send(CHUNKED_HEAD + chunk(b"data: one\n\n"))
            await go_on.wait()
            sent_next.set()
            await conn.send(chunk(b"data: two\n\n") + chunk(b""))

    async with RawServer(two_parts) as server, client() as c:
        answer = await c.open("GET", f"{server.url}/stream")
        assert (answer.status, dict(answer.headers)[b"content-type"]) == (200, b"text/event-stream")
        assert await answer.read(WAIT) == b"data: one\n\n"
        assert not sent_next.is_set()  # given before the server sent the rest
        go_on.set()
        assert await answer.read(WAIT) == b"data: two\n\n"
        assert await answer.read(WAIT) == b""
        answer.close()
        assert (await c.get(f"{server.url}/next")).text == "after"
        assert server.accepted == 1


async def test_a_reader_that_takes_nothing_holds_the_server_back() -> None:
    # 32 MiB is more than loopback's socket buffers hold: if the pool read on into its
    # own memory, the server's write would finish; instead it waits for the reader.
    size = 32 * MiB
    written = asyncio.Event()

    async def large(conn: Conn) -> None:
        await conn.request()
        await conn.send(response(b"x" * size))
        written.set()
        await conn.until_eof()

    async with RawServer(large) as server, client() as c:
        answer = await c.open("GET", f"{server.url}/large")
        first = await answer.read(WAIT)
        assert 0 < len(first) < size
        await asyncio.sleep(0.5)
        assert not written.is_set()
        got = len(first)
        while data := await answer.read(WAIT):
            got += len(data)
        assert got == size
        await asyncio.wait_for(written.wait(), WAIT)
        answer.close()


async def test_silence_in_the_middle_of_a_body_is_a_read_timeout_and_ends_the_connection() -> None:
    async with RawServer(then_silent) as server, client() as c:
        answer = await c.open("GET", f"{server.url}/stream")
        assert await answer.read(WAIT) == b"data: one\n\n"
        with pytest.raises(httpx.ReadTimeout):
            await answer.read(0.2)
        answer.close()
        await asyncio.wait_for(server.conns[0].eof.wait(), WAIT)


async def test_a_stream_closed_before_its_end_ends_its_connection() -> None:
    async def endless(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.target != "/stream":
                await conn.send(response(b"fresh"))
                continue
            await conn.send(CHUNKED_HEAD)
            with contextlib.suppress(ConnectionError):
                while True:
                    await conn.send(chunk(b"data: more\n\n"))
                    await asyncio.sleep(0.01)

    async with RawServer(endless) as server, client() as c:
        answer = await c.open("GET", f"{server.url}/stream")
        assert (await answer.read(WAIT)).startswith(b"data: more\n\n")
        answer.close()
        assert (await c.get(f"{server.url}/next")).text == "fresh"
        assert server.accepted == 2  # the rest of the stream is never read as this answer
