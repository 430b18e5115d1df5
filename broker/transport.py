"""The broker's upstream HTTP/1.1 client: pooled keep-alive connections on asyncio.

The broker reads every answer whole (it must redact it), so one call here is one
whole exchange, `PooledTransport.fetch`, for the one shape the broker needs: plain
HTTP/1.1 to a handful of API hosts, with keep-alive. httpx's stock transport
(httpcore over AnyIO) cost about half a millisecond of CPU per call, and httpx's
client layers above it more than the exchange itself; h11, pure Python, then
took 40-80 µs of each exchange. So:

- responses are parsed by httptools (llhttp, Node.js's parser, in C), never by
  us; the request head is written here from values the broker has checked, and
  checked again, so no CR, LF or NUL can split it;
- a connection learns that the server hung up from asyncio's callbacks
  (`eof_received` / `connection_lost`), so idle connections are never polled,
  and bytes no request asked for retire it;
- idle connections are kept per origin, most recently used first, so taking
  one is O(1) however many are pooled;
- TLS is asyncio's, with httpx's default context;
- `timeout` bounds the wait for a pool slot, the connect, the write, and every
  silence while the answer arrives; failures raise httpx's exceptions.

No proxies, no HTTP/2, no retries: a request is put on the wire at most once.
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
import time
from dataclasses import dataclass

import httptools
import httpx2 as httpx

# Largest response head (status line and headers) read before giving up.
MAX_HEAD_BYTES = 64 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII: no space, no line break
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # anything but HTAB splits or corrupts a line


class ResponseTooLarge(Exception):
    """The response body is longer than the caller's cap."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A whole response from `PooledTransport.fetch` (header names in lower case)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers, as sent; raises httpx.LocalProtocolError for
    anything that is not a token, a visible target, or a single-line value.

    The messages name what is wrong but never quote a value: one may be the key.
    """
    if not _TOKEN.fullmatch(method):
        raise httpx.LocalProtocolError("the method is not an HTTP token")
    if not _TARGET.fullmatch(target):
        raise httpx.LocalProtocolError("the request target holds a space or a control character")
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise httpx.LocalProtocolError("a header name is not an HTTP token")
        if _CONTROL.search(value):
            raise httpx.LocalProtocolError(f"header {name.decode('ascii')} holds a control character")
        lines += (name, b": ", value.strip(b" \t"), b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; llhttp's callbacks gather the answer to the request in flight."""

    def __init__(self, origin: tuple[bytes, bytes, int]) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.lost = False  # the socket is closed, or the server sent EOF
        self.stray = False  # bytes came that no request asked for: never reuse
        self.idle_since = 0.0
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        # The exchange in flight (begin() starts one): None while idle.
        self._parser: httptools.HttpResponseParser | None = None
        self._done: asyncio.Future[None] | None = None  # resolved when whole, or failed
        self._head_only = False  # the answer to HEAD: its head is all of it
        self._max_bytes = 0
        self._heard = 0.0  # monotonic time bytes last arrived
        self._quiet_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes fed since the head (or a trailer) began: about
        self._interim = False  # reading a 1xx answer, which the final one follows
        self._until_eof = False  # the body ends when the server closes
        self.complete = False
        self.keep_alive = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_body = False  # the final head is whole
        self.chunks: list[bytes] = []
        self._size = 0

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.complete:
            self.stray = True  # a late 408, a second answer: never read as the next one
            return
        self._heard = time.monotonic()
        self._head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._fail(cause if isinstance(cause, Exception) else
                       httpx.RemoteProtocolError("the server's answer could not be read"))
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("the server switched protocols"))
        except httptools.HttpParserError as e:
            self._fail(httpx.RemoteProtocolError(f"the server broke HTTP/1.1 framing: {e}"))
        else:
            if self._head_bytes > MAX_HEAD_BYTES and not self.complete:
                self._fail(httpx.RemoteProtocolError(
                    "the server sent a response head (or chunk trailer) over 64 KiB"))

    def eof_received(self) -> bool:
        self.lost = True
        if self._parser is not None and not self.complete:
            if self.in_body and self._until_eof:
                self._finish(keep_alive=False)  # the close is the body's end
            else:
                self._fail(httpx.RemoteProtocolError("the server disconnected without a whole response"))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # a reset, say: even a body that ends at the close is cut short
            self._fail(httpx.ReadError(f"the connection broke ({type(exc).__name__})"))
        elif not self.lost:
            self.eof_received()
        self.lost = True
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.stray = True  # a second answer in the same read

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_body:  # trailers are not headers, and are dropped
            # llhttp keeps trailing whitespace; it is not part of the value.
            self.headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._head_bytes = 0
        # A head that arrived whole in one read is measured here (about: llhttp drops
        # some whitespace); one still arriving, as it is fed.
        if sum(len(k) + len(v) + 4 for k, v in self.headers) > MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError("the server sent a response head over 64 KiB")
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue and friends: the final answer follows
            self._interim = True
            self.headers = []
            return
        self.status, self.in_body = status, True
        if self._head_only:
            self._finish(self._parser.should_keep_alive())
            return
        length = chunked = None
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        if status in (204, 304):
            return  # no body, whatever the head says; llhttp completes it
        if length is not None and int(length) > self._max_bytes:
            raise ResponseTooLarge(self._max_bytes)  # said up front: not read at all
        self._until_eof = length is None and not chunked

    def on_body(self, body: bytes) -> None:
        self._head_bytes = 0
        if self.complete:
            self.stray = True  # a body after a HEAD's answer
            return
        self._size += len(body)
        if self._size > self._max_bytes:
            raise ResponseTooLarge(self._max_bytes)
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self.complete:
            assert self._parser is not None
            self._finish(self._parser.should_keep_alive())

    # -- one exchange

    def begin(self, *, head_only: bool, max_bytes: int) -> None:
        """Ready to read the answer to a request about to be written."""
        self._parser = httptools.HttpResponseParser(self)
        self._done = asyncio.get_running_loop().create_future()
        self._head_only, self._max_bytes = head_only, max_bytes
        self._head_bytes, self._size, self._interim, self._until_eof = 0, 0, False, False
        self.complete = self.keep_alive = self.in_body = False
        self.status, self.headers, self.chunks = 0, [], []

    async def write(self, data: bytes, timeout: float | None) -> None:  # noqa: ASYNC109
        if self.lost or self.transport is None:
            raise httpx.WriteError("the server closed the connection")
        self.transport.write(data)
        if self._write_paused:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drained
            except TimeoutError:
                raise httpx.WriteTimeout("timed out sending the request") from None
            finally:
                self._drained = None
            if self.lost and not self.complete:
                raise httpx.WriteError("the server closed the connection")

    async def answer(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Wait until the answer is whole; raises what broke it, or ReadTimeout after
        `timeout` seconds with no byte from the server."""
        done = self._done
        assert done is not None
        if not done.done() and timeout is not None:
            self._heard = time.monotonic()
            self._quiet_timer = asyncio.get_running_loop().call_later(timeout, self._check_quiet, timeout)
        try:
            await done
        finally:
            if self._quiet_timer is not None:
                self._quiet_timer.cancel()
                self._quiet_timer = None

    def _check_quiet(self, timeout: float) -> None:
        quiet = time.monotonic() - self._heard
        if quiet >= timeout:
            self._fail(httpx.ReadTimeout("timed out waiting for the server"))
        else:
            self._quiet_timer = asyncio.get_running_loop().call_later(timeout - quiet, self._check_quiet, timeout)

    def _finish(self, keep_alive: bool) -> None:
        self.complete, self.keep_alive = True, keep_alive
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.stray = True  # whatever is left on the wire cannot be trusted
        self._parser = None
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)

    def reusable(self) -> bool:
        return not (self.lost or self.stray) and (self._parser is None or (self.complete and self.keep_alive))

    def rest(self) -> None:
        """Back to idle after a whole answer: what comes now, nobody asked for."""
        self._parser = self._done = None
        self.chunks = []

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class PooledTransport:
    """Pooled HTTP/1.1 connections for the broker's calls; see the module docstring."""

    def __init__(self, *, max_connections: int = 200, max_idle: int = 64,
                 idle_seconds: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self._idle: dict[tuple[bytes, bytes, int], collections.deque[_Connection]] = {}
        self._idle_count = 0
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._slots = asyncio.Semaphore(max_connections)
        self._ssl = ssl_context
        self._open: set[_Connection] = set()
        self._closed = False

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        return self._ssl

    async def fetch(self, origin: tuple[bytes, bytes, int], method: bytes, target: bytes,
                    headers: list[tuple[bytes, bytes]], body: bytes, *, timeout: float | None,  # noqa: ASYNC109
                    max_bytes: int) -> Fetched:
        """One whole exchange: `origin` is (scheme, host, port), `headers` already hold
        Host and Content-Length. A body over `max_bytes` raises ResponseTooLarge;
        failures raise httpx's exceptions."""
        head = request_head(method, target, headers)
        conn = await self._checkout(origin, timeout)
        reuse = False
        try:
            conn.begin(head_only=method == b"HEAD", max_bytes=max_bytes)
            if len(body) <= 65536:
                await conn.write(head + body, timeout)
            else:  # not copied to join the head
                await conn.write(head, timeout)
                await conn.write(body, timeout)
            await conn.answer(timeout)
            reuse = conn.keep_alive
            return Fetched(conn.status, conn.headers, b"".join(conn.chunks))
        finally:
            conn.rest()
            self._release(conn, reuse)

    async def _checkout(self, origin: tuple[bytes, bytes, int], timeout: float | None) -> _Connection:  # noqa: ASYNC109
        """A connection to `origin`, idle or new, holding one of the pool's slots."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        if self._slots.locked():
            try:
                async with asyncio.timeout(timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no upstream connection came free in time") from None
        else:
            await self._slots.acquire()  # free: returns without waiting
        try:
            return self._idle_connection(origin) or await self._connect(origin, timeout)
        except BaseException:
            self._slots.release()
            raise

    def _idle_connection(self, origin: tuple[bytes, bytes, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # most recently used: the least likely to have been closed
            self._idle_count -= 1
            if conn.reusable() and now - conn.idle_since < self._idle_seconds:
                return conn
            conn.close()
            self._open.discard(conn)
        return None

    async def _connect(self, origin: tuple[bytes, bytes, int], timeout: float | None) -> _Connection:  # noqa: ASYNC109
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        name = host.decode("ascii").strip("[]")
        tls = self._context() if scheme == b"https" else None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin), name, port, ssl=tls,
                    server_hostname=name if tls else None)
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting to the upstream") from None
        except (OSError, ssl.SSLError) as e:
            raise httpx.ConnectError(f"cannot connect to the upstream ({type(e).__name__})") from None
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection, reuse: bool) -> None:
        self._slots.release()
        if not reuse or self._closed or not conn.reusable() or self._idle_count >= self._max_idle:
            conn.close()
            self._open.discard(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.origin, collections.deque()).append(conn)
        self._idle_count += 1

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        self._idle_count = 0
