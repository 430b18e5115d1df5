"""A small client for the broker's HTTP-over-Unix-socket API, on the standard library.

`outloop call`, `outloop whoami`, `outloop doctor` and the MCP server use it; it
imports nothing heavy so an agent's call starts fast.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# An `ask` call waits for the operator (120 s by default) and then for the upstream.
DEFAULT_TIMEOUT = 900.0


class BrokerUnreachable(Exception):
    """Nothing answers on the broker socket."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


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


def request(
    sock_path: Path,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Response:
    """One HTTP request to the broker; raises BrokerUnreachable if it is not there."""
    conn = _UnixConnection(sock_path, timeout)
    try:
        try:
            conn.connect()
        except OSError as e:
            raise BrokerUnreachable(
                f"no broker answers on {sock_path} ({e.strerror or type(e).__name__}); "
                "start `outloop` or `outloop broker`"
            ) from None
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        token = os.environ.get("OUTLOOP_SESSION")
        if token:  # inside `outloop run`: the broker checks the token against the process tree
            hdrs["X-Outloop-Session"] = token
        hdrs.update(headers or {})
        conn.request(method, target, body=body, headers=hdrs)
        resp = conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


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
