"""The broker's upstream transport for httpx: pooled HTTP/1.1 connections on asyncio.

httpx's stock transport (httpcore over AnyIO) costs about half a millisecond of
CPU per call, as much as everything else the broker does together. Each call
scans every pooled connection twice (and asks each socket, by a system call,
whether the server hung up), and every read and write passes through AnyIO's
cancel scopes. This transport does the same job for the one shape the broker
needs, plain HTTP/1.1 to a handful of API hosts with keep-alive, on asyncio
protocols:

- framing is h11's (a maintained protocol library), not ours;
- a connection learns that the server hung up from asyncio's callbacks
  (`eof_received` / `connection_lost`), so idle connections are never polled;
- idle connections are kept per origin, most recently used first, so taking
  one is O(1) however many are pooled;
- TLS is asyncio's, with httpx's default context (certifi's CA bundle);
- timeouts are httpx's (connect, read, write, pool from the request's
  `timeout` extension) and failures raise httpx's exceptions, so a client
  above behaves as with the stock transport;
- `fetch` makes a whole exchange on the same pool without httpx's request and
  response models: the broker's hot path (broker/forward.py).

No proxies (the broker's client ignores the environment), no HTTP/2, no
retries: a request is put on the wire at most once.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import h11
import httpx2 as httpx

# Largest response head h11 will buffer (status line + headers).
MAX_HEAD_BYTES = 64 * 1024
# Bytes received but not yet read by the caller before the socket stops being read.
MAX_BUFFERED = 1024 * 1024


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: h11's state machine fed by asyncio's callbacks."""

    def __init__(self, origin: tuple[bytes, bytes, int]) -> None:
        self.origin = origin
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.transport: asyncio.Transport | None = None
        self.lost = False  # the socket is closed, or the server sent EOF
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._unread = 0  # bytes received that h11 has not handed out yet (about)
        self._reading_paused = False

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self._unread += len(data)
        if self._unread > MAX_BUFFERED and self.transport is not None and not self._reading_paused:
            # The reader is behind: stop reading the socket until it catches up,
            # so a fast server cannot make the broker buffer without bound.
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.lost = True
        try:
            self.h11.receive_data(b"")
        except h11.RemoteProtocolError:
            pass
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- used by the transport

    def reusable(self) -> bool:
        # Bytes already buffered on an idle connection (a second response, a late 408)
        # would otherwise be read as the answer to the next request.
        return (not self.lost and self.h11.our_state is h11.IDLE
                and self.h11.their_state is h11.IDLE and not self.h11.trailing_data[0])

    def resume_reading(self) -> None:
        """Count unread bytes from zero again and read the socket if it was paused."""
        self._unread = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def finish(self) -> bool:
        """After a whole response: ready the connection for the next request, if it can be."""
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        self.h11.start_next_cycle()
        # Reading may have paused as the body's end arrived; an idle connection
        # must read, or it never sees the server hang up.
        self.resume_reading()
        return True

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    async def send(self, event: h11.Event, timeout: float | None) -> None:  # noqa: ASYNC109
        data = self.h11.send(event)
        if self.lost or self.transport is None:
            raise httpx.WriteError("the server closed the connection")
        if data:
            self.transport.write(data)
        if self._paused:
            loop = asyncio.get_running_loop()
            self._drained = loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drained
            except TimeoutError:
                raise httpx.WriteTimeout("timed out sending the request") from None
            finally:
                self._drained = None
            if self.lost:
                raise httpx.WriteError("the server closed the connection")

    async def next_event(self, timeout: float | None) -> h11.Event:  # noqa: ASYNC109
        """The next event from the server, waiting at most `timeout` for more bytes."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise httpx.RemoteProtocolError(f"the server broke HTTP/1.1 framing: {e}") from None
            if event is h11.PAUSED:  # only after a whole response, which nobody reads past
                raise httpx.RemoteProtocolError("the server sent more than one response")
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                if isinstance(event, h11.Data):
                    self._unread -= len(event.data)
                return event
            self.resume_reading()
            if self.lost:
                raise httpx.RemoteProtocolError("the server disconnected without a whole response")
            self._waiter = loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._waiter
            except TimeoutError:
                raise httpx.ReadTimeout("timed out waiting for the server") from None
            finally:
                self._waiter = None


async def _send(conn: _Connection, event: h11.Event, timeout: float | None) -> None:  # noqa: ASYNC109
    try:
        await conn.send(event, timeout)
    except h11.LocalProtocolError as e:
        raise httpx.LocalProtocolError(str(e)) from None


class ResponseTooLarge(Exception):
    """The response body is longer than the caller's cap."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A whole response from `PooledTransport.fetch` (header names in lower case)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection; closing it returns the connection to the pool."""

    def __init__(self, transport: PooledTransport, conn: _Connection, read_timeout: float | None) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._timeout = read_timeout
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        while not self._done:
            event = await conn.next_event(self._timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                self._done = True
            else:  # pragma: no cover - h11 sends only these after a Response
                raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} in a body")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Not reused: a body not read to its end, or "Connection: close".
        self._transport._release(conn, self._done and conn.finish())


class PooledTransport(httpx.AsyncBaseTransport):
    """Pooled HTTP/1.1 for httpx.AsyncClient (`transport=`); see the module docstring."""

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

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}")
        port = url.port or (443 if scheme == b"https" else 80)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        conn = await self._checkout((scheme, url.raw_host, port), timeouts.get("pool"),
                                    timeouts.get("connect"))
        try:
            write_timeout = timeouts.get("write")
            await self._send_head(conn, request.method.encode("ascii"), request.url.raw_path,
                                  request.headers.raw, write_timeout)
            async for chunk in request.stream:  # type: ignore[union-attr]
                if chunk:
                    await _send(conn, h11.Data(data=chunk), write_timeout)
            await _send(conn, h11.EndOfMessage(), write_timeout)
            head = await self._read_head(conn, timeouts.get("read"))
        except BaseException:
            self._release(conn, reuse=False)
            raise
        # The slot and the connection come back when the body is closed.
        extensions: dict[str, Any] = {"http_version": b"HTTP/" + head.http_version,
                                      "reason_phrase": head.reason}
        return httpx.Response(status_code=head.status_code, headers=head.headers.raw_items(),
                              stream=_Body(self, conn, timeouts.get("read")),
                              extensions=extensions)

    async def fetch(self, origin: tuple[bytes, bytes, int], method: bytes, target: bytes,
                    headers: list[tuple[bytes, bytes]], body: bytes, *, timeout: float | None,  # noqa: ASYNC109
                    max_bytes: int) -> Fetched:
        """One whole exchange on the pool, without httpx's request and response models.

        The broker's hot path: it reads every answer whole anyway, and httpx's
        client layers cost more per call than the exchange itself. `timeout`
        bounds each of pool, connect, write and each read; a body over
        `max_bytes` raises ResponseTooLarge. Failures raise httpx's exceptions.
        """
        conn = await self._checkout(origin, timeout, timeout)
        reuse = False
        try:
            await self._send_head(conn, method, target, headers, timeout)
            if body:
                await _send(conn, h11.Data(data=body), timeout)
            await _send(conn, h11.EndOfMessage(), timeout)
            head = await self._read_head(conn, timeout)
            declared = next((v for k, v in head.headers if k == b"content-length"), None)
            if declared is not None and method != b"HEAD" and int(declared) > max_bytes:
                raise ResponseTooLarge(max_bytes)  # said up front: not read at all
            chunks: list[bytes] = []
            size = 0
            while True:
                event = await conn.next_event(timeout)
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > max_bytes:
                        raise ResponseTooLarge(max_bytes)
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
                else:  # pragma: no cover - h11 sends only these after a Response
                    raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} in a body")
            reuse = conn.finish()
            return Fetched(head.status_code, list(head.headers), b"".join(chunks))
        finally:
            self._release(conn, reuse)

    async def _checkout(self, origin: tuple[bytes, bytes, int], pool_timeout: float | None,
                        connect_timeout: float | None) -> _Connection:
        """A connection to `origin`, idle or new, holding one of the pool's slots."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        if self._slots.locked():
            try:
                async with asyncio.timeout(pool_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no upstream connection came free in time") from None
        else:
            await self._slots.acquire()  # free: returns without waiting
        try:
            return self._idle_connection(origin) or await self._connect(origin, connect_timeout)
        except BaseException:
            self._slots.release()
            raise

    @staticmethod
    async def _send_head(conn: _Connection, method: bytes, target: bytes,
                         headers: list[tuple[bytes, bytes]], timeout: float | None) -> None:  # noqa: ASYNC109
        try:
            event = h11.Request(method=method, target=target, headers=headers)
        except h11.LocalProtocolError as e:
            raise httpx.LocalProtocolError(str(e)) from None
        await _send(conn, event, timeout)

    @staticmethod
    async def _read_head(conn: _Connection, timeout: float | None) -> h11.Response:  # noqa: ASYNC109
        while True:
            event = await conn.next_event(timeout)
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends: the final answer follows
            if isinstance(event, h11.Response):
                break
            raise httpx.RemoteProtocolError("the server disconnected without a response")
        # h11 bounds a head only while it is still incomplete after a read; one that came
        # whole in a single read is measured here (about: h11 drops some whitespace).
        size = len(event.reason) + sum(len(k) + len(v) + 4 for k, v in event.headers.raw_items())
        if size > MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError("the server sent a response head over 64 KiB")
        return event

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
        name = host.decode("ascii")
        tls = self._context() if scheme == b"https" else None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin), name.strip("[]"), port, ssl=tls,
                    server_hostname=name.strip("[]") if tls else None)
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
