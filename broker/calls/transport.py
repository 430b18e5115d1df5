"""The broker's upstream HTTP/1.1 client: pooled keep-alive connections on asyncio.

One call here is one exchange, for the one shape the broker needs: plain HTTP/1.1
to a handful of API hosts, with keep-alive. `PooledTransport.open` waits for the
answer's head and then gives the body as it arrives (`Streamed`), reading no more
from the server than the broker has taken plus STREAM_BUFFER once the request is
sent (an answer that comes while it is still going out is read on, as the server
may read no more of the request until it has written its answer). httpx's stock transport
(httpcore over AnyIO) cost about half a millisecond of CPU per call, and httpx's
client layers above it more than the exchange itself; h11, pure Python, then
took 40-80 µs of each exchange. So:

- responses are parsed by httptools (llhttp, Node.js's parser, in C), never by
  us, and what llhttp reads but h11 refuses (a transfer coding but chunked, a
  status line not HTTP/1.0 or 1.1, a status below 100) is refused; the request
  head is written here from values the broker has checked, and checked again, so
  no CR, LF or NUL can split it;
- a connection learns that the server hung up from asyncio's callbacks
  (`eof_received` / `connection_lost`), so idle connections are never polled,
  and bytes no request asked for retire it;
- idle connections are kept per lane and origin, most recently used first, so
  taking one is O(1) however many are pooled; the broker's lane is the credential,
  so no connection ever carries two credentials' calls (an upstream that reads a
  request body as the next request, or answers twice, can then only mix up calls
  of one credential, never hand one tenant another's request or answer);
- TLS is asyncio's, with httpx's default context;
- `timeout` bounds the wait for a pool slot, the connect, the write, and every
  silence until the head arrives; `Streamed.read` takes its own for each silence
  of the body; failures raise httpx's exceptions.

No proxies, no HTTP/2, no retries: a request is put on the wire at most once.
(The broker sends calls through a proxy, or over HTTP/2, with httpx2.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import re
import select
import ssl
import struct
import termios
import time
from collections.abc import Callable

import httptools
import httpx2 as httpx

# Largest response head (status line and headers) read before giving up; interim
# (1xx) heads before the final one count towards it too.
MAX_HEAD_BYTES = 64 * 1024
# More interim answers than this before the final one, and the server is stalling.
MAX_INTERIM = 8
# Body bytes held for a reader before the connection stops reading from the server.
STREAM_BUFFER = 64 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII: no space, no line break
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # anything but HTAB splits or corrupts a line


Origin = tuple[bytes, bytes, int]  # (scheme, host, port)
PoolKey = tuple[tuple[str, ...], Origin]  # (lane, origin)


class ResponseTooLarge(Exception):
    """The response body is longer than the caller's cap."""


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

    def __init__(self, key: PoolKey) -> None:
        self.key = key  # (lane, origin): the only calls this connection ever carries
        self.transport: asyncio.Transport | None = None
        self.lost = False  # the socket is closed, or the server sent EOF
        self.stray = False  # bytes came that no request asked for: never reuse
        self.idle_since = 0.0
        self.on_idle_lost: Callable[[_Connection], None] | None = None  # set while pooled
        self.request_sent = False  # the whole request of the exchange is written
        self._fd = -1
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        # The exchange in flight (begin() starts one): None while idle.
        self._parser: httptools.HttpResponseParser | None = None
        self._done: asyncio.Future[None] | None = None  # resolved when whole, or failed
        self._wake: asyncio.Future[None] | None = None  # a reader waiting for the head or body bytes
        self._reading_paused = False  # STREAM_BUFFER bytes wait for the reader
        self._received = 0  # body bytes of this answer so far
        self._head_only = False  # the answer to HEAD: its head is all of it
        self._max_bytes = 0
        self._heard = 0.0  # monotonic time bytes last arrived (or request bytes last left)
        self._unsent = -1  # request bytes not yet taken by the server when last looked at
        self._quiet_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes fed since the head (or a trailer) began: about
        self._interim = 0  # 1xx answers read so far
        self._interim_bytes = 0  # about the size of their heads
        self._in_interim = False  # reading one
        self._until_eof = False  # the body ends when the server closes
        self.complete = False
        self.keep_alive = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_body = False  # the final head is whole
        self.body = bytearray()  # not yet taken by the reader; many tiny chunks cost no more than their bytes

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        sock = transport.get_extra_info("socket")
        self._fd = -1 if sock is None else sock.fileno()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.complete:
            self.stray = True  # a late 408, a second answer: never read as the next one
            self._left_pool()
            return
        self._heard = time.monotonic()
        self._head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._fail(
                cause
                if isinstance(cause, Exception)
                else httpx.RemoteProtocolError("the server's answer could not be read")
            )
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("the server switched protocols"))
        except httptools.HttpParserError as e:
            self._fail(httpx.RemoteProtocolError(f"the server broke HTTP/1.1 framing: {e}"))
        else:
            if self._head_bytes > MAX_HEAD_BYTES and not self.complete:
                self._fail(httpx.RemoteProtocolError("the server sent a response head (or chunk trailer) over 64 KiB"))

    def eof_received(self) -> bool:
        self.lost = True
        self._left_pool()
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
        self._left_pool()
        self._stop_waiting_to_write()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._stop_waiting_to_write()

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.stray = True  # a second answer in the same read

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_body:  # trailers are not headers, and are dropped
            name = name.lower()
            # Only chunked, as h11 (llhttp reads `gzip, chunked` as chunked, leaving the
            # body gzipped, `chunked, gzip` up to the close, and `chunked` and a tab as
            # no coding at all).
            if name == b"transfer-encoding" and value.rstrip(b" ").lower() != b"chunked":
                raise httpx.RemoteProtocolError("the server sent a transfer coding other than chunked")
            # llhttp keeps trailing whitespace; it is not part of the value.
            self.headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        if self.complete:
            return  # a second answer in the same read (on_message_begin retired the connection)
        # A head that arrived whole in one read is measured here, with the interim heads
        # before it (about: llhttp drops some whitespace), if the bytes fed since the
        # first began could hold that much; one still arriving, as it is fed.
        heads = self._interim_bytes + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if self._head_bytes > MAX_HEAD_BYTES and heads > MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError("the server sent a response head over 64 KiB")
        status = self._parser.get_status_code()
        # llhttp reads HTTP/0.9 and 2.0 status lines, and 099 as a status.
        if self._parser.get_http_version() not in ("1.0", "1.1") or status < 100:
            raise httpx.RemoteProtocolError("the server's status line is not HTTP/1.x")
        if status < 200:  # 100 Continue and friends: the final answer follows
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise httpx.RemoteProtocolError("the server sent interim answers and no final one")
            self._in_interim, self._interim_bytes = True, heads
            self.headers = []
            return
        length, codings = None, 0
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                codings += 1  # each `chunked` (on_header refused any other)
        if codings > 1:
            raise httpx.RemoteProtocolError("the server sent Transfer-Encoding twice")
        self._head_bytes = 0
        self.status, self.in_body = status, True
        self._notify()
        if self._head_only:
            self._finish(self._head_keep_alive())
            return
        if status in (204, 304):
            return  # no body, whatever the head says; llhttp completes it
        if length is not None and int(length) > self._max_bytes:
            raise ResponseTooLarge(self._max_bytes)  # said up front: not read at all
        self._until_eof = length is None and not codings

    def on_body(self, body: bytes) -> None:
        self._head_bytes = 0
        if self.complete:
            self.stray = True  # a body after a HEAD's answer
            return
        self._received += len(body)
        if self._received > self._max_bytes:
            raise ResponseTooLarge(self._max_bytes)
        self.body += body
        self._notify()
        # Not while the request is going out: a server may read no more of it until its
        # (early) answer is written, and then neither side would move.
        full = len(self.body) >= STREAM_BUFFER and self.request_sent
        if full and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._in_interim:
            self._in_interim = False
        elif not self.complete:
            assert self._parser is not None
            self._finish(self._parser.should_keep_alive())

    def _head_keep_alive(self) -> bool:
        """Whether the connection stays open after the answer to a HEAD. llhttp cannot
        know the request was HEAD, and takes a head with no length as the start of a
        body that ends at the close."""
        assert self._parser is not None
        tokens = {t.strip().lower() for name, value in self.headers if name == b"connection" for t in value.split(b",")}
        if self._parser.get_http_version() == "1.0":
            return b"keep-alive" in tokens
        return b"close" not in tokens

    # -- one exchange

    def begin(self, *, head_only: bool, max_bytes: int) -> None:
        """Ready to read the answer to a request about to be written."""
        self._parser = httptools.HttpResponseParser(self)
        self._done = asyncio.get_running_loop().create_future()
        self._head_only, self._max_bytes, self._received = head_only, max_bytes, 0
        self._head_bytes, self._interim, self._interim_bytes = 0, 0, 0
        self._in_interim = self._until_eof = False
        self.complete = self.keep_alive = self.in_body = self.request_sent = False
        self.status, self.headers, self.body = 0, [], bytearray()

    async def write(self, data: bytes, timeout: float | None) -> bool:  # noqa: ASYNC109
        """Write (part of) the request; False if the exchange ended before it was all
        written (an early answer, a 413 say, or a failure: answer() tells which)."""
        if self.lost or self.transport is None:
            raise httpx.WriteError("the server closed the connection")
        self.transport.write(data)
        unsent = self.transport.get_write_buffer_size()
        while self._write_paused and not self.lost:
            if self._done is not None and self._done.done():
                return False
            self._drained = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drained
            except TimeoutError:
                # `timeout` bounds a stall, not the whole upload: going on if it moved.
                if self.transport.get_write_buffer_size() >= unsent:
                    raise httpx.WriteTimeout("timed out sending the request") from None
                unsent = self.transport.get_write_buffer_size()
            finally:
                self._drained = None
        if self._done is not None and self._done.done():
            return False
        if self.lost:
            raise httpx.WriteError("the server closed the connection")
        return True

    async def head(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Wait for the final head; raises what broke the exchange, or ReadTimeout
        after `timeout` seconds with no byte from the server."""
        await self._wait(lambda: self.in_body, timeout)
        assert self._done is not None
        if self._done.done():
            self._done.result()  # raises a failure

    async def take(self, timeout: float | None) -> bytes:  # noqa: ASYNC109
        """The body bytes that arrived since the last take (waiting for some, at most
        `timeout` seconds of silence); b"" once the answer is whole. What broke the
        exchange is raised once the bytes before it are taken."""
        done = self._done
        assert done is not None
        await self._wait(lambda: bool(self.body), timeout)
        if self._done is not done:  # the stream was closed while this waited
            raise httpx.ReadError("the stream was closed")
        if self.body:
            data, self.body = bytes(self.body), bytearray()
            if self._reading_paused and self.transport is not None and not self.lost:
                self._reading_paused = False
                self.transport.resume_reading()
            return data
        done.result()  # raises a failure
        return b""

    async def _wait(self, ready: Callable[[], bool], timeout: float | None) -> None:  # noqa: ASYNC109
        done = self._done
        assert done is not None
        if ready() or done.done():
            return
        if timeout is not None:
            self._heard = time.monotonic()
            self._unsent = -1  # measured at the first check: no system call on every call
            self._quiet_timer = asyncio.get_running_loop().call_later(timeout, self._check_quiet, timeout)
        try:
            while not (ready() or done.done()):
                self._wake = asyncio.get_running_loop().create_future()
                await self._wake
        finally:
            self._wake = None
            if self._quiet_timer is not None:
                self._quiet_timer.cancel()
                self._quiet_timer = None

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _check_quiet(self, timeout: float) -> None:
        unsent = self._unsent_bytes()
        if unsent and (self._unsent < 0 or unsent < self._unsent):
            # The request is still going out (a large upload to a slow server): not quiet.
            self._unsent, self._heard = unsent, time.monotonic()
        quiet = time.monotonic() - self._heard
        if quiet >= timeout:
            self._fail(httpx.ReadTimeout("timed out waiting for the server"))
        else:
            self._quiet_timer = asyncio.get_running_loop().call_later(timeout - quiet, self._check_quiet, timeout)

    def _unsent_bytes(self) -> int:
        """Request bytes not yet taken by the server: buffered here, and in the kernel."""
        if self.transport is None:
            return 0
        size = self.transport.get_write_buffer_size()
        if self._fd >= 0:
            with contextlib.suppress(OSError):  # Linux: the socket's send queue
                size += struct.unpack("i", fcntl.ioctl(self._fd, termios.TIOCOUTQ, b"\0" * 4))[0]
        return size

    def _finish(self, keep_alive: bool) -> None:
        self.complete, self.keep_alive = True, keep_alive
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        self._notify()
        self._stop_waiting_to_write()

    def _fail(self, exc: Exception) -> None:
        self.stray = True  # whatever is left on the wire cannot be trusted
        self._parser = None
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        self._notify()
        self._stop_waiting_to_write()

    def _stop_waiting_to_write(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def reusable(self) -> bool:
        return not (self.lost or self.stray) and (self._parser is None or (self.complete and self.keep_alive))

    def unread_bytes_waiting(self) -> bool:
        """Whether the kernel holds bytes (or a FIN) that asyncio has not delivered yet:
        a connection taken from the pool must have none, or a late answer would be read
        as the next call's."""
        if self._fd < 0:
            return True
        # Over TLS, asyncio may hold bytes it has read off the socket: those that came
        # while reading was paused wait for the loop step after resume_reading.
        tls_buffered = getattr(self.transport, "get_read_buffer_size", None)
        if tls_buffered is not None and tls_buffered():
            return True
        readable, _, _ = select.select([self._fd], [], [], 0)
        return bool(readable)

    def rest(self) -> None:
        """Done with the exchange: what comes now, nobody asked for."""
        done = self._done
        if done is not None and done.done() and not done.cancelled():
            done.exception()  # a failure the caller heard of another way (a failed write)
        self._parser = self._done = None
        self.body = bytearray()
        if self._reading_paused and self.transport is not None and not self.lost:
            self.transport.resume_reading()
        self._reading_paused = False

    def close(self) -> None:
        """Close; an exchange not finished is failed, and its unsent bytes dropped."""
        unfinished = self._done is not None and not self.complete
        if unfinished:
            self._fail(httpx.ReadError("the connection was closed"))
        self.lost = True
        if self.transport is not None:
            if unfinished or self.stray or not self.request_sent:
                self.transport.abort()  # not one more byte of a request given up on
            else:
                self.transport.close()

    def _left_pool(self) -> None:
        if self.on_idle_lost is not None:
            self.on_idle_lost(self)


class Streamed:
    """An answer whose head has arrived (header names in lower case); its body comes
    from `read`. `close` gives the connection back, to be reused only if the whole
    answer was read, or ends it."""

    def __init__(self, pool: PooledTransport, conn: _Connection) -> None:
        self.status = conn.status
        self.headers = conn.headers
        self._pool = pool
        self._conn: _Connection | None = conn
        self._reading = False  # a read is waiting

    async def read(self, timeout: float | None) -> bytes:  # noqa: ASYNC109
        """The next part of the body, waiting at most `timeout` seconds of silence
        (ReadTimeout); b"" at its end. A read waiting when the stream is closed
        raises ReadError."""
        if self._conn is None:
            return b""
        self._reading = True
        try:
            return await self._conn.take(timeout)
        finally:
            self._reading = False

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Half a request left on the wire would be read as the start of the next;
            # a read still waiting would wake on the next exchange.
            whole = conn.complete and not conn.body and not self._reading
            self._pool._end(conn, reuse=whole and conn.keep_alive and conn.request_sent)


class PooledTransport:
    """Pooled HTTP/1.1 connections for the broker's calls; see the module docstring."""

    def __init__(
        self,
        *,
        max_connections: int = 64,
        max_idle: int = 64,
        idle_seconds: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._idle: dict[PoolKey, collections.deque[_Connection]] = {}
        self._idle_count = 0
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        # Connections in use, capped per lane: one credential's long streams never
        # keep another's calls waiting for a slot.
        self._max_connections = max_connections
        self._slots: dict[tuple[str, ...], asyncio.Semaphore] = {}
        self._ssl = ssl_context
        self._open: set[_Connection] = set()
        self._closed = False
        self._reaper: asyncio.TimerHandle | None = None  # closes connections idle too long

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        return self._ssl

    async def open(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        timeout: float | None,  # noqa: ASYNC109
        max_bytes: int,
        lane: tuple[str, ...] = (),
    ) -> Streamed:
        """Send a request and wait for the answer's head: `origin` is (scheme, host,
        port), `headers` already hold Host and Content-Length. A body over `max_bytes`
        raises ResponseTooLarge (here if the head says so, else from `read`);
        failures raise httpx's exceptions. Only calls of the same `lane` share a
        connection (the broker passes the credential's tenant and name)."""
        head = request_head(method, target, headers)
        conn = await self._checkout((lane, origin), timeout)
        try:
            conn.begin(head_only=method == b"HEAD", max_bytes=max_bytes)
            # A large body is not copied to join the head.
            for data in (head + body,) if len(body) <= 65536 else (head, body):
                if not await conn.write(data, timeout):
                    break  # the exchange ended first: head() says how
            else:
                conn.request_sent = True
            await conn.head(timeout)
        except BaseException:
            self._end(conn, reuse=False)
            raise
        return Streamed(self, conn)

    def _end(self, conn: _Connection, reuse: bool) -> None:
        if not reuse:
            conn.close()  # before rest(): an unfinished exchange is aborted
        conn.rest()
        self._release(conn, reuse)

    async def _checkout(self, key: PoolKey, timeout: float | None) -> _Connection:  # noqa: ASYNC109
        """A connection of `key`'s lane to its origin, idle or new, holding one of its lane's slots."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        slots = self._slots.get(key[0])
        if slots is None:
            slots = self._slots[key[0]] = asyncio.Semaphore(self._max_connections)
        if slots.locked():
            try:
                async with asyncio.timeout(timeout):
                    await slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no upstream connection came free in time") from None
        else:
            await slots.acquire()  # free: returns without waiting
        try:
            if self._closed:  # closed while this call waited for a slot
                raise RuntimeError("the transport is closed")
            return self._idle_connection(key) or await self._connect(key, timeout)
        except BaseException:
            slots.release()
            raise

    def _idle_connection(self, key: PoolKey) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # most recently used: the least likely to have been closed
            self._idle_count -= 1
            conn.on_idle_lost = None
            if conn.reusable() and now - conn.idle_since < self._idle_seconds and not conn.unread_bytes_waiting():
                return conn
            conn.close()
            self._open.discard(conn)
        return None

    def _idle_lost(self, conn: _Connection) -> None:
        """A pooled connection heard from its server (a FIN, a late 408): out of the pool."""
        conn.on_idle_lost = None
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            self._idle_count -= 1
        conn.close()
        self._open.discard(conn)

    def _reap(self) -> None:
        """Close the connections idle for idle_seconds (each deque is oldest first);
        again in idle_seconds while any are left."""
        self._reaper = None
        now = time.monotonic()
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since >= self._idle_seconds:
                conn = idle.popleft()
                self._idle_count -= 1
                conn.on_idle_lost = None
                conn.close()
                self._open.discard(conn)
        if self._idle_count and not self._closed:
            self._reaper = asyncio.get_running_loop().call_later(self._idle_seconds, self._reap)

    async def _connect(self, key: PoolKey, timeout: float | None) -> _Connection:  # noqa: ASYNC109
        scheme, host, port = key[1]
        loop = asyncio.get_running_loop()
        name = host.decode("ascii").strip("[]")
        tls = self._context() if scheme == b"https" else None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(key), name, port, ssl=tls, server_hostname=name if tls else None
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting to the upstream") from None
        except (OSError, ssl.SSLError) as e:
            raise httpx.ConnectError(f"cannot connect to the upstream ({type(e).__name__})") from None
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection, reuse: bool) -> None:
        self._slots[conn.key[0]].release()
        now = time.monotonic()
        if not reuse or self._closed or not conn.reusable() or self._idle_count >= self._max_idle:
            conn.close()
            self._open.discard(conn)
            return
        conn.idle_since = now
        conn.on_idle_lost = self._idle_lost
        self._idle.setdefault(conn.key, collections.deque()).append(conn)
        self._idle_count += 1
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(self._idle_seconds, self._reap)

    async def aclose(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for conn in list(self._open):
            conn.on_idle_lost = None
            conn.close()
        self._open.clear()
        self._idle.clear()
        self._idle_count = 0
