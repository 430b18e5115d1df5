"""The broker's HTTP/1.1 server on a Unix socket (httptools, i.e. llhttp, parses requests).

Routes (DESIGN §4, §10):
    GET    /v1/health
    GET    /v1/whoami
    POST   /v1/request                       JSON in, JSON out
    ANY    /v1/proxy/<credential>/<path...>  the upstream response itself, redacted
    POST   /v1/sessions                      open a session rooted at the caller (`outloop run`)
    GET    /v1/sessions                      the live sessions (the operator, outside any session)
    DELETE /v1/sessions/<id>                 revoke one
    POST   /v1/scan                          the post hook's question: keys in a tool's output, redacted

The same API is served on loopback TCP when `[broker] listen` is set. A TCP
caller is found from its socket (identity.tcp_peer), once per connection, and a
TCP connection that sits idle past `idle_timeout` is closed.

On Linux a Unix-socket caller is identified per request, not per connection: the
socket has SO_PASSCRED, every read is a recvmsg whose SCM_CREDENTIALS name the
process that wrote those bytes (the kernel never joins two writers' bytes in one
read then), and a request is charged to the process whose bytes carried it. A
connection handed to another process over SCM_RIGHTS is that process's from its
first byte; a request whose bytes came from two processes is refused.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import errno
import http
import json
import logging
import os
import re
import select
import socket
import struct
import sys
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httptools

from broker import __version__
from broker.calls.forward import UpstreamError, connection_listed
from broker.calls.identity import Peer, holders_split, peer_of, tcp_peer
from broker.calls.protocol import Answer, CallRequest, Refusal, StreamedAnswer
from broker.calls.sessions import TOKEN_PREFIX, TOKEN_RE, find_token
from broker.paths import ensure_private_dir
from broker.policy import METHOD_RE
from broker.secrets import SecretStoreError

if TYPE_CHECKING:
    from broker.engine import Engine

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
# On shutdown, how long a call already being handled may take to send its answer.
STOP_GRACE_SECONDS = 2.0
READ_CHUNK = 64 * 1024
# What a header from the agent may not hold (the parser has checked the framing).
FORBIDDEN_VALUE_CHARS = ("\r", "\n", "\0")
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LINE_BREAK_OR_NUL = re.compile(rb"[\r\n\0]")
# A JSON escape of a UTF-16 surrogate: paired, it is one character; alone, it is not text.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Headers a session token may come in (an SDK puts its API key in the first two).
TOKEN_HEADERS = (b"authorization", b"x-api-key", b"x-outloop-session")
# Per-request senders on the Unix socket (Linux): SCM_CREDENTIALS on every read.
PASSCRED = sys.platform.startswith("linux") and hasattr(socket, "SO_PASSCRED")
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_CREDS_SPACE = socket.CMSG_SPACE(_CREDS.size) if PASSCRED else 0
# After refusing a malformed request on the Unix socket: how long, and how much, of
# what the client still sends is read and dropped before closing (see _linger).
LINGER_SECONDS, LINGER_BYTES = 1.0, 16 * 1024 * 1024
# Loopback TCP connections open at once; more are answered 503 and closed.
MAX_TCP_CONNECTIONS = 256
# Unix-socket connections one process may hold open at once; more are answered 429.
MAX_PROCESS_CONNECTIONS = 64
# A request head must arrive whole this many seconds after its first byte (a client
# that sends a byte now and then holds a connection no longer); between requests a
# connection may stay quiet for [broker] idle_timeout.
HEAD_TIMEOUT = 10.0
# Headers the broker sets on an upstream's answer (an upstream's own would mislead the agent).
BROKER_HEADERS = frozenset({"x-outloop-audit-id", "x-outloop-error"})
HANGUP_POLL_SECONDS = 0.25  # how often a waiting TCP call looks whether its caller left
# A /v1/scan body larger than this is scanned in a thread, not on the event loop.
SCAN_INLINE_BYTES = 64 * 1024


class SocketInUse(Exception):
    """Another broker already answers on the socket path."""


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Server:
    def __init__(self, engine: Engine, path: Path, listen: tuple[str, int] | None = None) -> None:
        self.engine = engine
        self.path = path
        self.listen = listen
        self._server: asyncio.AbstractServer | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._tcp_count = 0
        self._per_process: collections.Counter[tuple[int, int]] = collections.Counter()
        self.listen_url: str | None = None  # once listening on TCP: http://127.0.0.1:PORT

    def check_free(self) -> None:
        """Raise SocketInUse if a live broker already answers on the socket path."""
        from broker.paths import Paths

        Paths(self.path, self.path, self.path).check_socket_path()
        if (self.path.exists() or self.path.is_symlink()) and _is_live(self.path):
            raise SocketInUse(f"a broker is already running on {self.path}")

    async def start(self) -> None:
        """Listen on the socket; replace a stale one, refuse if a live broker is there."""
        from broker.paths import Paths

        Paths(self.path, self.path, self.path).check_socket_path()
        ensure_private_dir(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            self.check_free()
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if PASSCRED:
            # Before listen: accepted sockets inherit it, so even the bytes a client sends
            # before the broker accepts carry their writer's credentials.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where it is wider
        try:
            listener.bind(str(self.path))
            listener.listen(100)
            self._server = await asyncio.start_unix_server(self._connection, sock=listener, limit=READ_CHUNK)
        except BaseException:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        if self.listen is not None:
            host, port = self.listen
            try:
                self._tcp = await asyncio.start_server(self._tcp_connection, host, port, limit=READ_CHUNK)
            except OSError as e:
                await self.stop()
                raise SocketInUse(f"cannot listen on {host}:{port} (broker.listen): {e.strerror}") from None
            bound = self._tcp.sockets[0].getsockname()
            self.listen_url = f"http://[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"http://{bound[0]}:{bound[1]}"

    async def stop(self) -> None:
        """Stop listening; calls being answered get a moment to finish, idle connections close."""
        if self._tcp is not None:
            self._tcp.close()
        if self._server is not None:
            self._server.close()
            busy = [task for task, conn in self._connections.items() if conn.busy]
            for task, conn in self._connections.items():
                conn.stopping = True
                if not conn.busy:
                    task.cancel()
            if busy:
                # Calls the shutdown refused (pending approvals) still get their answer.
                await asyncio.wait(busy, timeout=STOP_GRACE_SECONDS)
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2)
            self._tcp = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tcp: bool = False) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(self.engine, reader, writer, tcp=tcp)
        # Who connected (Unix socket: SO_PEERCRED; on TCP the peer is found later, and
        # MAX_TCP_CONNECTIONS bounds them all).
        who = (conn.peer.pid, conn.peer.uid)
        if not tcp and self._per_process[who] >= MAX_PROCESS_CONNECTIONS:
            refusal = await self.engine.refuse(
                conn.peer,
                "bad_request",
                f"this process already holds {MAX_PROCESS_CONNECTIONS} connections to the broker",
                status=429,
            )
            with contextlib.suppress(Exception):
                writer.write(response_bytes(429, _refusal_headers(refusal), _json(refusal.json()), 0, True))
                await writer.drain()
            conn.close()
            writer.close()
            return
        if not tcp:
            self._per_process[who] += 1
        self._connections[task] = conn
        try:
            await conn.run()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if not tcp:
                self._per_process[who] -= 1
                if not self._per_process[who]:
                    del self._per_process[who]
            conn.close()
            self._connections.pop(task, None)
            with contextlib.suppress(Exception):
                writer.close()

    async def _tcp_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_count >= MAX_TCP_CONNECTIONS:
            # No peer lookup for these: answering must stay cheap under a flood.
            refusal = await self.engine.refuse(
                Peer(0, -1, "tcp"),
                "bad_request",
                f"the broker already holds {MAX_TCP_CONNECTIONS} TCP connections",
                base={"identity": None},
                status=503,
            )
            with contextlib.suppress(Exception):
                writer.write(response_bytes(503, _refusal_headers(refusal), _json(refusal.json()), 0, True))
                await writer.drain()
                writer.close()
            return
        self._tcp_count += 1
        try:
            await self._connection(reader, writer, tcp=True)
        finally:
            self._tcp_count -= 1


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(str(path))
    except OSError as e:
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        probe.close()
    return True


@dataclass
class _Request:
    """One request as the parser saw it; header names in lower case."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    # (pid, uid) of every process whose bytes made up this request (Unix socket, Linux).
    senders: frozenset[tuple[int, int]] = frozenset()


class _Parser:
    """httptools (llhttp) callbacks gathering whole requests, in the order they came.

    Enforces the head size and the body cap as the bytes arrive, so neither is
    buffered past its limit.
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.parser = httptools.HttpRequestParser(self)
        self.ready: collections.deque[_Request] = collections.deque()
        self.in_message = False  # a request has begun and is not whole yet
        self.wants_continue = False  # its head asked for "100 Continue" before the body
        self._in_body = False  # its head is whole, its body is arriving
        self._head_bytes = 0
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self.sender: tuple[int, int] | None = None  # who wrote the bytes being fed
        self._senders: set[tuple[int, int]] = set()
        self.head_started = 0.0  # monotonic time the request being read began

    def feed(self, data: bytes) -> None:
        # Since the last head, body data or request ended: about. In a body, what is
        # not data (chunk extensions, trailers) is capped like a head.
        self._head_bytes += len(data)
        if self.in_message and self.sender is not None:
            self._senders.add(self.sender)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            raise e.__context__ or BadRequest("malformed HTTP") from None
        except httptools.HttpParserUpgrade:
            if self.ready and not self.in_message:
                self.ready.pop()  # the upgrade request itself: refused, not answered
            raise BadRequest("protocol upgrades are not supported") from None
        except httptools.HttpParserError as e:
            raise BadRequest(f"malformed HTTP ({e})") from None
        if self._head_bytes > MAX_HEAD:
            if self._in_body:
                raise BadRequest(f"the request's chunk extensions or trailers are larger than {MAX_HEAD} bytes", 431)
            raise BadRequest(f"the request head is larger than {MAX_HEAD} bytes", 431)

    # -- httptools callbacks

    @property
    def head_pending(self) -> bool:
        """A request has begun and its head is not whole yet."""
        return self.in_message and not self._in_body

    def on_message_begin(self) -> None:
        self.in_message = True
        self.head_started = time.monotonic()
        self._target, self._headers, self._body, self._size = b"", [], [], 0
        self._senders = {self.sender} if self.sender is not None else set()

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_body:  # trailers are not headers, and are dropped (as h11 did)
            # llhttp keeps trailing whitespace; it is not part of the value (h11 strips it).
            self._headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self._in_body, self._head_bytes = True, 0
        # A head that arrived whole in one read is measured here (about: the parser
        # drops some whitespace); one still arriving, in `feed`.
        if len(self._target) + sum(len(k) + len(v) + 4 for k, v in self._headers) > MAX_HEAD:
            raise BadRequest(f"the request head is larger than {MAX_HEAD} bytes", 431)
        for name, value in self._headers:
            if name == b"content-length" and int(value) > self.max_body:
                raise BadRequest(f"the request body is larger than the {self.max_body} byte cap", 413)
            if name == b"expect" and value.lower() == b"100-continue":
                self.wants_continue = True

    def on_body(self, body: bytes) -> None:
        self._head_bytes = 0
        self._size += len(body)
        if self._size > self.max_body:
            raise BadRequest(f"the request body is larger than the {self.max_body} byte cap", 413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = self._in_body = False
        self._head_bytes = 0
        self.ready.append(
            _Request(
                self.parser.get_method(),
                self._target,
                self._headers,
                b"".join(self._body),
                self.parser.should_keep_alive(),
                frozenset(self._senders),
            )
        )


class _Connection:
    def __init__(
        self, engine: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tcp: bool = False
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.writer = writer
        self.parser = _Parser(engine.config.broker.max_request_bytes)
        self.tcp = tcp
        self.served = 0  # requests answered on this connection
        if tcp:
            self._ends = (writer.get_extra_info("sockname")[:2], writer.get_extra_info("peername")[:2])
            # Found on the first request (it reads /proc), not at accept.
            self.peer = Peer(0, -1, "tcp")
            self._peer_known = False
        else:
            self.peer = peer_of(writer.get_extra_info("socket"))
            self._peer_known = True
        self._conn_peer = self.peer  # who connected; a request is charged to who sent it
        self._peers: dict[tuple[int, int], Peer] = {}
        self._sock: socket.socket | None = None
        if PASSCRED and not tcp:
            # Read with recvmsg on a duplicate of the socket: the transport only writes.
            transport = writer.transport
            assert isinstance(transport, asyncio.ReadTransport)
            transport.pause_reading()
            self._sock = socket.fromfd(writer.get_extra_info("socket").fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.setblocking(False)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.busy = False  # a request has arrived and its answer is not sent yet
        self.gone = False  # the caller hung up while its call waited: nobody to answer
        self.stopping = False  # the broker is stopping: close once this answer is sent
        # A malformed request read with whole ones before it: refused once they are answered.
        self.error: BadRequest | None = None

    async def run(self) -> None:
        while True:
            self.busy = False
            try:
                request = await self._read_request()
            except BadRequest as e:
                await self._refuse_protocol(str(e), e.status)
                return
            if request is None:
                return
            if self._sock is not None and not await self._charge(request):
                return
            if not self._peer_known:
                local, remote = self._ends
                self.peer = await asyncio.to_thread(tcp_peer, (local[0], local[1]), (remote[0], remote[1]))
                self._peer_known = True
            streamed: StreamedAnswer | None = None
            try:
                split = (
                    holders_split(
                        self.peer, self.engine.refresh_config(), self.engine.sessions, request_token(request.headers)
                    )
                    if len(self.peer.holders) > 1
                    else None
                )
                if split is not None:
                    status, headers, payload = await self._refusal("wrong_tenant", split)
                else:
                    answer = await self._dispatch(request, request.body)
                    if isinstance(answer, StreamedAnswer):
                        streamed = answer
                    else:
                        status, headers, payload = answer
            except Exception as e:  # a bug must still answer the agent, and never leak detail
                log.error(
                    "internal error handling a call: %s",
                    type(e).__name__,
                    exc_info=os.environ.get("OUTLOOP_DEBUG") == "1",
                )
                status, headers = 500, [("Content-Type", "application/json"), ("X-Outloop-Error", "internal_error")]
                payload = _json(
                    {
                        "error": {
                            "code": "internal_error",
                            "audit_id": None,
                            "message": "the broker failed on this call; see its log (OUTLOOP_DEBUG=1)",
                        }
                    }
                )
            close = self.stopping or not request.keep_alive
            if streamed is not None:
                self.served += 1
                if not await self._send_stream(streamed, close) or close or self.gone:
                    return
                continue
            if self.gone:
                return
            self.served += 1
            await self._send(status, headers, payload, close=close, head_only=request.method == b"HEAD")
            if close:
                return

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    async def _charge(self, request: _Request) -> bool:
        """Make `self.peer` the process whose bytes carried `request`; False when it was refused."""
        senders = request.senders
        if len(senders) > 1:
            pids = ", ".join(str(pid) for pid, _ in sorted(senders))
            await self._refuse_protocol(f"the request's bytes came from more than one process ({pids})", 400)
            return False
        sender = next(iter(senders), None)
        if sender is None or sender[0] == 0:
            # No credentials (a writer in a pid namespace the broker cannot see): who connected.
            self.peer = self._conn_peer
        elif sender != (self._conn_peer.pid, self._conn_peer.uid):
            peer = self._peers.get(sender)
            if peer is None:
                peer = self._peers[sender] = Peer(sender[0], sender[1])
            self.peer = peer
        else:
            self.peer = self._conn_peer
        return True

    async def _recv(self) -> bytes:
        """One read of the Unix socket with its writer's credentials (into parser.sender)."""
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data, ancillary, _flags, _addr = sock.recvmsg(READ_CHUNK, _CREDS_SPACE)
                break
            except (BlockingIOError, InterruptedError):
                loop = asyncio.get_running_loop()
                ready = loop.create_future()
                loop.add_reader(sock.fileno(), ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(sock.fileno())
        sender = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _CREDS.size:
                pid, uid, _gid = _CREDS.unpack_from(payload)
                sender = (pid, uid)
        self.parser.sender = sender
        return data

    async def _read_request(self) -> _Request | None:
        """The next whole request, or None once the caller hangs up between requests."""
        parser = self.parser
        # [broker] limits apply from the next call, as on a new connection.
        parser.max_body = self.engine.config.broker.max_request_bytes
        while not parser.ready:
            if self.error is not None:
                self.busy = True
                raise self.error
            if parser.wants_continue:
                # Its head passed the caps: ask for the body now, or the client (curl, for
                # bodies over 1 MiB) waits a second before sending it anyway.
                parser.wants_continue = False
                if parser.in_message:
                    self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            idle = self.engine.config.broker.idle_timeout
            wait = idle
            if parser.head_pending:
                wait = min(idle, max(0.0, HEAD_TIMEOUT - (time.monotonic() - parser.head_started)))
            if self.tcp:
                data = await self._read_or_idle(parser.in_message, wait)
            else:
                try:
                    async with asyncio.timeout(wait):
                        data = await (self._recv() if self._sock is not None else self.reader.read(READ_CHUNK))
                except TimeoutError:
                    if parser.in_message:
                        self.busy = True
                        raise BadRequest(_late(parser.head_pending, wait), 408) from None
                    return None  # quiet for idle_timeout between requests: closed
            if not data:
                if parser.in_message:
                    self.busy = True
                    raise BadRequest("the connection closed in the middle of a request")
                return None
            try:
                parser.feed(data)
            except BadRequest as e:
                if not parser.ready:
                    self.busy = True  # refused and audited even if the broker is stopping
                    raise
                self.error = e
            self.busy = parser.in_message or bool(parser.ready)
        # A request with a body that the limit check lets through is read whole.
        self.busy = True
        return parser.ready.popleft()

    async def _hangup(self) -> None:
        """Return once the caller has closed the connection (never, while it is still there).

        Used only while a call waits for the operator. Nothing is consumed: a peek sees
        the end of the stream, and bytes of a next request stay for the reader.
        """
        loop = asyncio.get_running_loop()
        if self._sock is None:  # loopback TCP, or no SO_PASSCRED: the stream reader sees EOF
            while not (self.reader.at_eof() or self.writer.is_closing()):  # noqa: ASYNC110 - no EOF event to wait on
                await asyncio.sleep(HANGUP_POLL_SECONDS)
            self.gone = True
            return
        sock = self._sock
        while True:
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            try:
                peeked = sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                peeked = b""
            if peeked:
                await asyncio.Event().wait()  # a pipelined request is waiting: the caller is there
            # End of stream. A client may only have shut its sending side and still wait for
            # the answer; a closed socket (Ctrl-C, a timeout) also hangs up: POLLHUP says which.
            while not _hung_up(sock):  # noqa: ASYNC110 - the kernel sends no event for it
                await asyncio.sleep(HANGUP_POLL_SECONDS)
            self.gone = True
            return

    async def _read_or_idle(self, in_message: bool, idle: float) -> bytes:
        """A read on TCP, bounded by `idle` seconds: an idle connection is closed (b"")."""
        try:
            async with asyncio.timeout(idle):
                return await self.reader.read(READ_CHUNK)
        except TimeoutError:
            if in_message:
                self.busy = True
                raise BadRequest(_late(self.parser.head_pending, idle), 408) from None
            if not self.served:  # a connection that never asked anything: a flood, or a port scan
                await self.engine.refuse(
                    self.peer,
                    "bad_request",
                    f"a TCP connection sent nothing for {idle:g} s and was closed",
                    base={"identity": None, "transport": "tcp"},
                    status=408,
                )
            return b""

    async def _refuse_protocol(self, message: str, status: int) -> None:
        refusal = await self.engine.refuse(self.peer, "bad_request", message, status=status)
        await self._send(refusal.http_status, _refusal_headers(refusal), _json(refusal.json()), close=True)
        if self._sock is not None:
            await self._linger()

    async def _linger(self) -> None:
        """After a refusal, read and drop what the client is still sending, briefly: closing
        with unread bytes would reset the connection and lose the answer on its way."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        dropped = 0
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(LINGER_SECONDS):
                while dropped < LINGER_BYTES and (data := await self._recv()):
                    dropped += len(data)

    async def _send(
        self, status: int, headers: list[tuple[str, str]], body: bytes, close: bool = False, head_only: bool = False
    ) -> None:
        length = len(body)
        if head_only:  # the answer to HEAD says how long GET's body would be, if the upstream said
            declared = [v for k, v in headers if k.lower() == "content-length"]
            if declared and declared[0].strip().isdigit():
                length = int(declared[0])
        self.writer.write(response_bytes(status, headers, b"" if head_only else body, length, close))
        await self.writer.drain()

    async def _send_stream(self, answer: StreamedAnswer, close: bool) -> bool:
        """Write an answer as it arrives, a chunk at a time; False when it could not be
        sent whole (the connection then closes: a missing last chunk tells the client).

        A caller that hangs up, even while the upstream is quiet, ends the upstream
        call (audited as client_gone). A 204 or 304 answer has no body, so no chunks.
        """
        chunks = answer.chunks
        headers = answer_headers(answer.headers, answer.audit_id)
        tasks: list[asyncio.Future[None]] = []
        try:
            self.writer.write(response_head(answer.status, headers, None, close))
            pump = asyncio.ensure_future(self._pump(chunks, framed=answer.status not in (204, 304)))
            tasks = [pump, asyncio.ensure_future(self._hangup())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                # The pump may be inside the generator: it must stop before the generator closes.
                await asyncio.wait(tasks)
            await chunks.aclose()
        if pump.cancelled():
            return False
        error = pump.exception()
        if isinstance(error, ConnectionError | UpstreamError):
            return False
        if error is not None:
            raise error
        return True

    async def _pump(self, chunks: AsyncGenerator[bytes, None], framed: bool) -> None:
        writer = self.writer
        async for chunk in chunks:
            if chunk and framed:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
        if framed:
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _dispatch(
        self, request: _Request, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes] | StreamedAnswer:
        target = request.target.decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            return await self._refusal("bad_request", "absolute URLs are not accepted")
        path = parts.path
        json_type = [("Content-Type", "application/json")]
        if path == "/v1/health" and method in ("GET", "HEAD"):
            return 200, json_type, _json(self.engine.health())
        if TOKEN_PREFIX in target and TOKEN_RE.search(unquote(parts.query)):
            return await self._refusal(
                "bad_request",
                "session tokens go in a header (Authorization, x-api-key or X-Outloop-Session), never in the URL",
            )
        token = request_token(request.headers)
        if path == "/v1/whoami" and method in ("GET", "HEAD"):
            result = self.engine.whoami(self.peer, token)
            if isinstance(result, dict):
                return 200, json_type, _json(result)
            return result.http_status, json_type, _json(result.json())
        if path == "/v1/request":
            if method != "POST":
                return await self._refusal("bad_request", "use POST for /v1/request", status=405)
            try:
                call = parse_request_json(body)
            except BadRequest as e:
                return await self._refusal("bad_request", str(e))
            if any(TOKEN_PREFIX in v and TOKEN_RE.search(v) for _, v in call.query):
                return await self._refusal("bad_request", "session tokens go in a header, never in the query of a call")
            call.token, call.hangup = token, self._hangup
            outcome = await self.engine.call(self.peer, call)
            assert not isinstance(outcome, StreamedAnswer)  # (call.stream is off: a whole answer)
            return self._redacted_envelope(outcome)
        if path.startswith("/v1/proxy/"):
            try:
                call = parse_proxy(method, target, request.headers, body)
            except BadRequest as e:
                return await self._refusal("bad_request", str(e))
            call.token, call.hangup, call.stream = token, self._hangup, True
            outcome = await self.engine.call(self.peer, call)
            return outcome if isinstance(outcome, StreamedAnswer) else _raw(outcome)
        if path == "/v1/sessions" or path.startswith("/v1/sessions/"):
            return await self._sessions(method, path, body, token)
        if path == "/v1/scan" and method == "POST":
            return await self._scan(body, token)
        return await self._refusal(
            "bad_request", f"no such endpoint: {method} {path} (broker {__version__})", status=404
        )

    def _redacted_envelope(self, outcome: Answer | Refusal) -> tuple[int, list[tuple[str, str]], bytes]:
        """The /v1/request envelope, redacted as the bytes the agent reads.

        The answer was redacted as the upstream sent it, but the envelope decodes a
        JSON body and writes it out again, undoing its escapes (`\\u0073\\u006b...`
        comes out as the plain key): so the envelope is redacted once more, whole.
        """
        status, headers, data = _envelope(outcome)
        if isinstance(outcome, Refusal):
            return status, headers, data
        try:
            redactor = self.engine.redactor()
        except SecretStoreError as e:
            refusal = Refusal("unknown_credential", f"the answer could not be redacted, so it was withheld: {e}", None)
            return refusal.http_status, _refusal_headers(refusal), _json(refusal.json())
        return status, headers, redactor.bytes(data)

    async def _sessions(
        self, method: str, path: str, body: bytes, token: str | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        json_type = [("Content-Type", "application/json")]
        result: Any
        if path == "/v1/sessions" and method == "POST":
            try:
                tenant, label, ttl = parse_session_json(body)
            except BadRequest as e:
                return await self._refusal("bad_request", str(e))
            result = await self.engine.open_session(self.peer, tenant=tenant, label=label, ttl=ttl, token=token)
            if isinstance(result, Refusal):
                return result.http_status, _refusal_headers(result), _json(result.json())
            return 201, json_type, _json(result)
        if path == "/v1/sessions" and method == "GET":
            result = await self.engine.list_sessions(self.peer, token)
            if isinstance(result, Refusal):
                return result.http_status, _refusal_headers(result), _json(result.json())
            return 200, json_type, _json({"sessions": result})
        if path.startswith("/v1/sessions/") and method == "DELETE":
            result = await self.engine.revoke_session(self.peer, unquote(path[len("/v1/sessions/") :]), token)
            if isinstance(result, Refusal):
                return result.http_status, _refusal_headers(result), _json(result.json())
            if not result:
                return await self._refusal("bad_request", "no such live session", status=404)
            return 200, json_type, _json({"revoked": True})
        return await self._refusal("bad_request", f"no such endpoint: {method} {path}", status=404)

    async def _scan(self, body: bytes, token: str | None) -> tuple[int, list[tuple[str, str]], bytes]:
        """The post hook's question: the keys in a tool's output, and a redacted copy.

        Not a call, so not audited. The tenant is the calling hook's (its session,
        token or folder; None when it has none), as a call's would be; the broker
        already holds the secrets and the compiled rules, so the hook loads neither.
        A large output is scanned in a thread, so calls keep flowing meanwhile.
        """
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError
            extra, where, cwd = data.get("extra") or [], data.get("where"), data.get("cwd")
            if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
                raise ValueError
            if not all(v is None or isinstance(v, str) for v in (where, cwd)):
                raise ValueError
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            return await self._refusal("bad_request", '/v1/scan takes {"response": ..., "extra": [str], "where": str}')
        answer = await self.engine.scan_output(
            self.peer, token, data.get("response"), extra, where, cwd, in_thread=len(body) > SCAN_INLINE_BYTES
        )
        if answer is None:
            message = {"error": {"code": "keyring_unavailable", "message": "the keyring cannot be read"}}
            return 503, [("Content-Type", "application/json")], _json(message)
        return 200, [("Content-Type", "application/json")], _json(answer)

    async def _refusal(self, code: str, message: str, status: int = 0) -> tuple[int, list[tuple[str, str]], bytes]:
        refusal = await self.engine.refuse(self.peer, code, message, status=status)
        return refusal.http_status, _refusal_headers(refusal), _json(refusal.json())


def _late(head: bool, waited: float) -> str:
    if head:
        return f"the request head did not arrive whole within {HEAD_TIMEOUT:g} s of its first byte"
    return f"the request body went quiet for {waited:g} s"


def _hung_up(sock: socket.socket) -> bool:
    """Whether the other end has closed the Unix socket (not merely shut its sending side)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    return any(events & (select.POLLHUP | select.POLLERR) for _fd, events in poller.poll(0))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def response_bytes(status: int, headers: list[tuple[str, str]], body: bytes, length: int, close: bool) -> bytes:
    """A whole HTTP/1.1 response: status line, headers, Content-Length, then the body."""
    return response_head(status, headers, length, close) + body


def response_head(status: int, headers: list[tuple[str, str]], length: int | None, close: bool) -> bytes:
    """An HTTP/1.1 response head: status line, headers, then Content-Length, or chunked
    framing when `length` is None.

    Header names and values come from the broker or from an upstream's answer that
    the HTTP client has already parsed; a line break or NUL in one would still split the
    response, so it is refused here rather than written.
    """
    reason = _REASONS.get(status, b"")
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, value in headers:
        if name.lower() in ("content-length", "connection", "transfer-encoding"):
            continue
        raw = _header_bytes(value)
        if not HEADER_NAME_RE.fullmatch(name) or _LINE_BREAK_OR_NUL.search(raw):
            raise ValueError(f"header {name[:40]!r} cannot be written")
        out.append(name.encode("ascii") + b": " + raw + b"\r\n")
    if status in (204, 304):  # neither has a body, nor says how long one would be
        pass
    elif length is None:
        out.append(b"Transfer-Encoding: chunked\r\n")
    else:
        out.append(b"Content-Length: %d\r\n" % length)
    if close:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


_REASONS = {s.value: s.phrase.encode("ascii") for s in http.HTTPStatus}


def _header_bytes(value: str) -> bytes:
    """An upstream header value back to the bytes it was sent as.

    Values are decoded as ASCII, else UTF-8, else latin-1 (broker/forward.py, as httpx
    does); latin-1 gives back the bytes of the last, and anything it cannot encode
    came from UTF-8.
    """
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def _refusal_headers(refusal: Refusal) -> list[tuple[str, str]]:
    return [("Content-Type", "application/json"), ("X-Outloop-Error", refusal.code)]


def _envelope(outcome: Answer | Refusal) -> tuple[int, list[tuple[str, str]], bytes]:

    if isinstance(outcome, Refusal):
        return outcome.http_status, _refusal_headers(outcome), _json(outcome.json())
    headers: dict[str, str] = {}
    for k, v in outcome.headers:
        key = k.lower()
        headers[key] = f"{headers[key]}, {v}" if key in headers else v
    result: dict[str, Any] = {"status": outcome.status, "headers": headers, "audit_id": outcome.audit_id}
    result.update(body_field(outcome.body, headers.get("content-type", "")))
    return 200, [("Content-Type", "application/json")], _json(result)


def body_field(body: bytes, content_type: str) -> dict[str, Any]:
    """The response body for the JSON envelope: JSON when it is JSON, else text, else base64."""
    if not body:
        return {"body": None}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return {"body": base64.b64encode(body).decode("ascii"), "body_base64": True}
    if "json" in content_type.lower():
        try:
            return {"body": json.loads(text)}
        except (ValueError, RecursionError):  # nested too deep to decode: given as text
            pass
    return {"body": text}


def _raw(outcome: Answer | Refusal) -> tuple[int, list[tuple[str, str]], bytes]:

    if isinstance(outcome, Refusal):
        return outcome.http_status, _refusal_headers(outcome), _json(outcome.json())
    # A Content-Length here is a HEAD answer's (see _send).
    return outcome.status, answer_headers(outcome.headers, outcome.audit_id), outcome.body


def answer_headers(upstream: list[tuple[str, str]], audit_id: str) -> list[tuple[str, str]]:
    """An upstream answer's headers and the broker's audit id: the broker's own headers
    are the broker's to send, so the upstream's copies of them are dropped."""
    headers = [(k, v) for k, v in upstream if k.lower() not in BROKER_HEADERS]
    headers.append(("X-Outloop-Audit-Id", audit_id))
    return headers


def _check_header(name: str, value: str) -> None:
    if not HEADER_NAME_RE.fullmatch(name):
        # The pool would refuse it on the way out, after the attempt is audited, as upstream_error.
        raise BadRequest(f"header name {name[:40]!r} is not an HTTP token (letters, digits and !#$%&'*+-.^_`|~)")
    if any(c in value for c in FORBIDDEN_VALUE_CHARS):
        raise BadRequest(f"header {name[:40]!r} holds a line break or NUL")
    if not value.isascii():
        # httpx sends ASCII header values only; anything else would fail after the audit.
        raise BadRequest(f"header {name[:40]!r} holds characters outside ASCII")


def request_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The session token in a request's Authorization, x-api-key or X-Outloop-Session header."""
    for name, value in headers:
        if name in TOKEN_HEADERS and TOKEN_PREFIX.encode() in value:
            token = find_token(value.decode("latin-1"))
            if token is not None:
                return token
    return None


def parse_session_json(body: bytes) -> tuple[str | None, str, float | None]:
    """(tenant, label, ttl) from a POST /v1/sessions body."""
    try:
        doc = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    except RecursionError:
        raise BadRequest(_TOO_DEEP) from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    tenant, label, ttl = doc.get("tenant"), doc.get("label") or "", doc.get("ttl")
    if tenant is not None and not isinstance(tenant, str):
        raise BadRequest("'tenant' must be a string")
    if not isinstance(label, str):
        raise BadRequest("'label' must be a string")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
        raise BadRequest("'ttl' must be a number of seconds")
    return tenant, label, None if ttl is None else float(ttl)


_TOO_DEEP = "the body's JSON is nested too deeply to read"


def parse_request_json(body: bytes) -> CallRequest:
    """Validate a /v1/request body into a CallRequest; raise BadRequest saying what is wrong."""

    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    except RecursionError:
        raise BadRequest(_TOO_DEEP) from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body):  # rare: only then is the whole document checked
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(
                "the body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text"
            ) from None
    for key in ("credential", "method", "path"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise BadRequest(f"'{key}' is required and must be a string")
    # Upper-cased (ASCII only: str.upper() folds "poſt" to "POST") and then used as it is,
    # for policy and on the wire alike.
    method = doc["method"].upper() if doc["method"].isascii() else ""
    if not METHOD_RE.match(method):
        raise BadRequest(f"'method' {doc['method'][:20]!r} is not an HTTP method")
    headers = doc.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise BadRequest("'headers' must be an object of strings")
    for k, v in headers.items():
        _check_header(k, v)
    query = _query(doc.get("query"))
    raw_body = doc.get("body")
    if raw_body is None:
        content = b""
    elif isinstance(raw_body, str):
        content = raw_body.encode("utf-8")
    else:
        content = json.dumps(raw_body, separators=(",", ":")).encode("utf-8")
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
    tenant = doc.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise BadRequest("'tenant' must be a string")
    reason = doc.get("reason") or ""
    if not isinstance(reason, str):
        raise BadRequest("'reason' must be a string")
    return CallRequest(doc["credential"], method, doc["path"], query, headers, content, tenant, reason[:500])


def _query(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    pairs: list[tuple[str, Any]]
    if isinstance(value, dict):
        pairs = []
        for k, v in value.items():
            pairs.extend((k, item) for item in (v if isinstance(v, list) else [v]))
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [(p[0], p[1]) for p in value]
    else:
        raise BadRequest("'query' must be an object (or a list of [name, value] pairs)")
    out: list[tuple[str, str]] = []
    for k, v in pairs:
        if not isinstance(k, str) or isinstance(v, dict | list) or v is None:
            raise BadRequest("'query' values must be strings, numbers or booleans")
        out.append((k, str(v).lower() if isinstance(v, bool) else str(v)))
    return out


def parse_proxy(method: str, target: str, raw_headers: Iterable[tuple[bytes, bytes]], body: bytes) -> CallRequest:
    """Turn `/v1/proxy/<credential>/<path>?q` into a CallRequest."""

    parts = urlsplit(target)
    rest = parts.path[len("/v1/proxy/") :]
    credential, _, path = rest.partition("/")
    credential = unquote(credential)
    if not credential:
        raise BadRequest("name the credential: /v1/proxy/<credential>/<path>")
    headers = {}
    reason = ""
    raw_headers = list(raw_headers)
    # Names the agent's Connection header lists belong to its hop to the broker.
    listed = connection_listed((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers)
    for name, value in raw_headers:
        k = name.decode("latin-1")
        if k.lower() in listed:
            continue
        v = value.decode("latin-1")
        if k.lower() == "x-outloop-reason":
            reason = v[:500]
        elif TOKEN_PREFIX in v or k.lower() == "x-outloop-session":
            continue  # a session token is the broker's, never the upstream's
        elif k.lower() not in ("host", "content-length", "connection", "transfer-encoding"):
            _check_header(k, v)
            headers[k] = v
    query = parse_qsl(parts.query, keep_blank_values=True)
    return CallRequest(credential, method.upper(), "/" + path, query, headers, body, None, reason)
