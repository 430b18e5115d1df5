"""The broker's HTTP/1.1 server on a Unix socket (h11 does the framing).

Routes (DESIGN §4):
    GET  /v1/health
    GET  /v1/whoami
    POST /v1/request                       JSON in, JSON out
    ANY  /v1/proxy/<credential>/<path...>  the upstream response itself, redacted
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

from broker import __version__
from broker.identity import Peer, peer_of
from broker.paths import ensure_private_dir

if TYPE_CHECKING:
    from broker.engine import Answer, CallRequest, Engine, Refusal

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
# On shutdown, how long a call already being handled may take to send its answer.
STOP_GRACE_SECONDS = 2.0
READ_CHUNK = 64 * 1024
# Header names that may not come from the agent at all (h11 has checked framing).
FORBIDDEN_VALUE_CHARS = ("\r", "\n", "\0")
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class SocketInUse(Exception):
    """Another broker already answers on the socket path."""


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Server:
    def __init__(self, engine: Engine, path: Path) -> None:
        self.engine = engine
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}

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
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where it is wider
        try:
            self._server = await asyncio.start_unix_server(self._connection, path=str(self.path),
                                                           limit=READ_CHUNK)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        """Stop listening; calls being answered get a moment to finish, idle connections close."""
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
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(self.engine, reader, writer)
        self._connections[task] = conn
        try:
            await conn.run()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.pop(task, None)
            with contextlib.suppress(Exception):
                writer.close()


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


class _Connection:
    def __init__(self, engine: Engine, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.engine = engine
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        sock = writer.get_extra_info("socket")
        self.peer: Peer = peer_of(sock)
        self.busy = False  # a request has arrived and its answer is not sent yet
        self.stopping = False  # the broker is stopping: close once this answer is sent

    async def run(self) -> None:
        while True:
            self.busy = False
            try:
                request, body = await self._read_request()
            except h11.RemoteProtocolError as e:
                await self._refuse_protocol(f"malformed HTTP ({e})", e.error_status_hint)
                return
            except BadRequest as e:
                await self._refuse_protocol(str(e), e.status)
                return
            if request is None:
                return
            try:
                status, headers, payload = await self._dispatch(request, body)
            except Exception as e:  # a bug must still answer the agent, and never leak detail
                log.error("internal error handling a call: %s", type(e).__name__,
                          exc_info=os.environ.get("OUTLOOP_DEBUG") == "1")
                status, headers = 500, [("Content-Type", "application/json"),
                                        ("X-Outloop-Error", "internal_error")]
                payload = _json({"error": {"code": "internal_error", "audit_id": None,
                                           "message": "the broker failed on this call; "
                                           "see its log (OUTLOOP_DEBUG=1)"}})
            await self._send(status, headers, payload, close=self.stopping)
            if (self.stopping or self.conn.our_state is h11.MUST_CLOSE
                    or self.conn.their_state is h11.MUST_CLOSE):
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ_CHUNK)
                self.conn.receive_data(data)
                continue
            return event

    async def _read_request(self) -> tuple[h11.Request | None, bytes]:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None, b""
        self.busy = True
        if not isinstance(event, h11.Request):
            raise BadRequest("expected an HTTP request")
        limit = self.engine.config.broker.max_request_bytes
        for name, value in event.headers:
            if name == b"content-length" and int(value) > limit:
                raise BadRequest(f"the request body is larger than the {limit} byte cap", 413)
        chunks: list[bytes] = []
        size = 0
        while True:
            part = await self._next_event()
            if isinstance(part, h11.Data):
                size += len(part.data)
                if size > limit:
                    raise BadRequest(f"the request body is larger than the {limit} byte cap", 413)
                chunks.append(part.data)
            elif isinstance(part, h11.EndOfMessage):
                return event, b"".join(chunks)
            elif isinstance(part, h11.ConnectionClosed):
                return None, b""
            else:
                raise BadRequest("unexpected HTTP framing")

    async def _refuse_protocol(self, message: str, status: int) -> None:
        refusal = await self.engine.refuse(self.peer, "bad_request", message, status=status)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                await self._send(refusal.http_status, [], _json(refusal.json()), close=True)

    async def _send(self, status: int, headers: list[tuple[str, str]], body: bytes,
                    close: bool = False) -> None:
        hdrs = [(k.encode("ascii"), _header_bytes(v)) for k, v in headers
                if k.lower() not in ("content-length", "connection")]
        hdrs.append((b"Content-Length", str(len(body)).encode("ascii")))
        if close:
            hdrs.append((b"Connection", b"close"))
        out = self.conn.send(h11.Response(status_code=status, headers=hdrs))
        out += self.conn.send(h11.Data(data=body)) if body else b""
        out += self.conn.send(h11.EndOfMessage())
        self.writer.write(out)
        await self.writer.drain()

    async def _dispatch(self, request: h11.Request, body: bytes
                        ) -> tuple[int, list[tuple[str, str]], bytes]:
        target = request.target.decode("ascii", "replace")
        method = request.method.decode("ascii")
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            return await self._refusal("bad_request", "absolute URLs are not accepted")
        path = parts.path
        json_type = [("Content-Type", "application/json")]
        if path == "/v1/health" and method == "GET":
            return 200, json_type, _json(self.engine.health())
        if path == "/v1/whoami" and method == "GET":
            result = self.engine.whoami(self.peer)
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
            outcome = await self.engine.call(self.peer, call)
            return _envelope(outcome)
        if path.startswith("/v1/proxy/"):
            try:
                call = parse_proxy(method, target, request.headers, body)
            except BadRequest as e:
                return await self._refusal("bad_request", str(e))
            outcome = await self.engine.call(self.peer, call)
            return _raw(outcome)
        return await self._refusal("bad_request", f"no such endpoint: {method} {path} "
                                   f"(broker {__version__})", status=404)

    async def _refusal(self, code: str, message: str, status: int = 0
                       ) -> tuple[int, list[tuple[str, str]], bytes]:
        refusal = await self.engine.refuse(self.peer, code, message, status=status)
        return refusal.http_status, _refusal_headers(refusal), _json(refusal.json())


def _header_bytes(value: str) -> bytes:
    """An upstream header value back to bytes: h11 only encodes ASCII str itself.

    httpx decodes header bytes as ASCII, else UTF-8, else latin-1; latin-1 gives back
    the bytes of the last, and anything it cannot encode came from UTF-8.
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
    from broker.engine import Refusal

    if isinstance(outcome, Refusal):
        return outcome.http_status, _refusal_headers(outcome), _json(outcome.json())
    headers: dict[str, str] = {}
    for k, v in outcome.headers:
        key = k.lower()
        headers[key] = f"{headers[key]}, {v}" if key in headers else v
    result: dict[str, Any] = {"status": outcome.status, "headers": headers,
                              "audit_id": outcome.audit_id}
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
        except ValueError:
            pass
    return {"body": text}


def _raw(outcome: Answer | Refusal) -> tuple[int, list[tuple[str, str]], bytes]:
    from broker.engine import Refusal

    if isinstance(outcome, Refusal):
        return outcome.http_status, _refusal_headers(outcome), _json(outcome.json())
    headers = [(k, v) for k, v in outcome.headers if k.lower() != "content-length"]
    headers.append(("X-Outloop-Audit-Id", outcome.audit_id))
    return outcome.status, headers, outcome.body


def _check_header(name: str, value: str) -> None:
    if not HEADER_NAME_RE.fullmatch(name):
        # h11 would refuse it on the way out, after the attempt is audited, as upstream_error.
        raise BadRequest(f"header name {name[:40]!r} is not an HTTP token "
                         "(letters, digits and !#$%&'*+-.^_`|~)")
    if any(c in value for c in FORBIDDEN_VALUE_CHARS):
        raise BadRequest(f"header {name[:40]!r} holds a line break or NUL")
    if not value.isascii():
        # httpx sends ASCII header values only; anything else would fail after the audit.
        raise BadRequest(f"header {name[:40]!r} holds characters outside ASCII")


def parse_request_json(body: bytes) -> CallRequest:
    """Validate a /v1/request body into a CallRequest; raise BadRequest saying what is wrong."""
    from broker.engine import CallRequest

    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    for key in ("credential", "method", "path"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise BadRequest(f"'{key}' is required and must be a string")
    method = doc["method"].upper()
    if not method.isalpha() or len(method) > 20:
        raise BadRequest(f"'method' {doc['method'][:20]!r} is not an HTTP method")
    headers = doc.get("headers") or {}
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
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
    return CallRequest(doc["credential"], method, doc["path"], query, headers, content, tenant,
                       reason[:500])


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


def parse_proxy(method: str, target: str, raw_headers: Iterable[tuple[bytes, bytes]],
                body: bytes) -> CallRequest:
    """Turn `/v1/proxy/<credential>/<path>?q` into a CallRequest."""
    from broker.engine import CallRequest

    parts = urlsplit(target)
    rest = parts.path[len("/v1/proxy/"):]
    credential, _, path = rest.partition("/")
    credential = unquote(credential)
    if not credential:
        raise BadRequest("name the credential: /v1/proxy/<credential>/<path>")
    headers = {}
    reason = ""
    for name, value in raw_headers:
        k = name.decode("latin-1")
        v = value.decode("latin-1")
        if k.lower() == "x-outloop-reason":
            reason = v[:500]
        elif k.lower() not in ("host", "content-length", "connection", "transfer-encoding"):
            _check_header(k, v)
            headers[k] = v
    query = parse_qsl(parts.query, keep_blank_values=True)
    return CallRequest(credential, method.upper(), "/" + path, query, headers, body, None, reason)
