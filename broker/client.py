"""A small client for the broker's HTTP-over-Unix-socket API, on the standard library.

`outloop call`, `outloop whoami`, `outloop doctor`, the hooks and the MCP server use
it. It speaks just enough HTTP/1.1 itself (one request per connection, the answer
read by its Content-Length, chunks or to the end) rather than import http.client,
whose email parser costs an agent-facing command more than its whole round trip.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: typing stays out of an agent command's start
    from typing import Any

# An `ask` call waits for the operator (120 s by default) and then for the upstream.
DEFAULT_TIMEOUT = 900.0
MAX_HEAD = 64 * 1024


class BrokerUnreachable(Exception):
    """Nothing answers on the broker socket."""


class Response:
    """One answer of the broker: status, headers in order, body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Response(status={self.status}, headers={self.headers!r}, body={self.body!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Response):
            return NotImplemented
        return (self.status, self.headers, self.body) == (other.status, other.headers, other.body)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


class BadResponse(OSError):
    """The broker's answer was not HTTP/1.1 as it sends it."""


def _read_response(sock: socket.socket) -> Response:
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise BadResponse("the broker closed the connection before answering")
        buf += chunk
        if len(buf) > MAX_HEAD and b"\r\n\r\n" not in buf[:MAX_HEAD]:
            raise BadResponse("the broker's answer has an oversized head")
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise BadResponse(f"the broker's answer does not start with a status line: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    resp = Response(int(parts[1]), headers, b"")
    body = bytearray(rest)
    length = resp.header("content-length")
    if length is not None:
        want = int(length)
        while len(body) < want:
            chunk = sock.recv(max(65536, want - len(body)))
            if not chunk:
                raise BadResponse("the broker closed the connection in the middle of its answer")
            body += chunk
        resp.body = bytes(body[:want])
    elif "chunked" in (resp.header("transfer-encoding") or "").lower():
        resp.body = _dechunk(sock, body)
    else:
        while chunk := sock.recv(65536):
            body += chunk
        resp.body = bytes(body)
    return resp


def _dechunk(sock: socket.socket, buf: bytearray) -> bytes:
    out = bytearray()
    while True:
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise BadResponse("the broker closed the connection in the middle of a chunk")
            buf += chunk
        line, _, rest = bytes(buf).partition(b"\r\n")
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        buf = bytearray(rest)
        while len(buf) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                if size == 0:
                    return bytes(out)
                raise BadResponse("the broker closed the connection in the middle of a chunk")
            buf += chunk
        if size == 0:
            return bytes(out)
        out += buf[:size]
        buf = buf[size + 2 :]


def request(
    sock_path: Path,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Response:
    """One HTTP request to the broker; raises BrokerUnreachable if it is not there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(sock_path))
        except OSError as e:
            raise BrokerUnreachable(
                f"no broker answers on {sock_path} ({e.strerror or type(e).__name__}); "
                "start `outloop` or `outloop broker`"
            ) from None
        hdrs = {"Host": "outloop", "Connection": "close"}
        if body is not None:
            hdrs["Content-Type"] = "application/json"
            hdrs["Content-Length"] = str(len(body))
        token = os.environ.get("OUTLOOP_SESSION")
        if token:  # inside `outloop run`: the broker checks the token against the process tree
            hdrs["X-Outloop-Session"] = token
        hdrs.update(headers or {})
        for name, value in hdrs.items():
            if any(c in name + value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} holds a line break")
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        sock.sendall(head.encode("latin-1") + (body or b""))
        return _read_response(sock)
    finally:
        sock.close()


def health(sock_path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """GET /v1/health."""
    result: dict[str, Any] = request(sock_path, "GET", "/v1/health", timeout=timeout).json()
    return result


def whoami(sock_path: Path) -> Response:
    """GET /v1/whoami, as the calling process."""
    return request(sock_path, "GET", "/v1/whoami", timeout=30.0)


def call(sock_path: Path, payload: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> Response:
    """POST /v1/request with the given JSON payload."""
    return request(sock_path, "POST", "/v1/request", body=json.dumps(payload).encode("utf-8"), timeout=timeout)


def __getattr__(name: str) -> Any:
    # A keep-alive http.client connection over the socket, for tests that hold one open;
    # built on first use so the agent's commands never import http.client.
    if name == "_UnixConnection":
        import http.client

        class _UnixConnection(http.client.HTTPConnection):
            def __init__(self, path: Path, timeout: float) -> None:
                super().__init__("outloop", timeout=timeout)
                self._path = path

            def connect(self) -> None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(str(self._path))
                except OSError:
                    sock.close()
                    raise
                self.sock = sock

        return _UnixConnection
    raise AttributeError(name)
