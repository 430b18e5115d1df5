"""Putting a call on the wire: one shared httpx client, the credential injected.

The upstream URL is the credential's base_url plus the normalised path. Client
headers that could carry a credential, and hop-by-hop headers, are dropped; the
credential goes in as the config says; redirects are never followed; request and
response sizes are capped.
"""

from __future__ import annotations

import base64
import contextlib
import http.cookiejar
import select
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpcore2
import httpx2 as httpx

from broker.config import Credential
from broker.policy import NormalPath
from broker.secrets import Secret

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length", "expect",
})
CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "x-auth-token",
    "x-goog-api-key", "private-token", "x-access-token",
})
# The broker must read every response to redact it, so the agent may not pick an
# encoding (bzip2, br, zstd, ...) that the broker cannot decode but the agent can.
BROKER_OWNED = frozenset({"accept-encoding"})
# Not passed back: framing is ours, and cookies could carry a session minted from the key.
RESPONSE_DROP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "content-length", "content-encoding", "set-cookie", "set-cookie2",
})


class UpstreamError(Exception):
    """The upstream could not be reached, timed out, or answered too much."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status  # 502 or 504


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    ms: float


def outgoing_headers(client_headers: dict[str, str], credential: Credential,
                     secret: Secret) -> dict[str, str]:
    """Client headers minus hop-by-hop and credential-bearing ones, plus the credential."""
    drop = HOP_BY_HOP | CREDENTIAL_HEADERS | BROKER_OWNED
    if credential.auth.kind == "header":
        drop = drop | {credential.auth.arg.lower()}
    headers = {k: v for k, v in client_headers.items() if k.lower() not in drop}
    auth = credential.auth
    if auth.kind == "bearer":
        headers["Authorization"] = f"Bearer {secret.reveal()}"
    elif auth.kind == "basic":
        token = base64.b64encode(f"{auth.arg}:{secret.reveal()}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    elif auth.kind == "header":
        headers[auth.arg] = secret.reveal()
    return headers


def outgoing_query(query: list[tuple[str, str]], credential: Credential,
                   secret: Secret) -> list[tuple[str, str | int | float | bool | None]]:
    out: list[tuple[str, str | int | float | bool | None]] = []
    name = credential.auth.arg if credential.auth.kind == "query" else None
    out.extend((k, v) for k, v in query if k != name)
    if name is not None:
        out.append((name, secret.reveal()))
    return out


class _Readiness:
    """Answers the pool's "is this idle socket readable?" probes with one poll(2) per pass.

    Before every request, and again when each response is closed, httpcore runs
    one synchronous pass over its connections and probes every idle one. With
    32 connections to one upstream that was a poll(2) per connection, twice per
    call. During a pass (`begin()` .. `end()`) the first probe polls every
    pooled socket at once and the others read its answer: the same answers,
    taken microseconds apart as before, in one system call. Outside a pass a
    probe polls its own socket, as before.
    """

    def __init__(self) -> None:
        self._poller = select.poll()
        self._in_pass = False
        self._ready: set[int] | None = None

    def register(self, fd: int) -> None:
        self._poller.register(fd, select.POLLIN)

    def unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(fd)

    def begin(self) -> None:
        self._in_pass = True
        self._ready = None

    def end(self) -> None:
        self._in_pass = False
        self._ready = None

    def readable(self, fd: int, own: select.poll) -> bool:
        if not self._in_pass:
            return bool(own.poll(0))
        if self._ready is None:
            # Any event counts, as with the single-socket poll: POLLIN, POLLHUP, POLLERR.
            self._ready = {ready for ready, _ in self._poller.poll(0)}
        return fd in self._ready


class _Stream(httpcore2.AsyncNetworkStream):
    """A pooled connection's stream that answers the pool's liveness probe cheaply.

    Before every request, and again when each response is closed, httpcore asks
    each idle pooled connection whether its socket is readable (the server
    hung up). The AnyIO stream answers through `extra()`, which rebuilds a dict
    of attributes and calls getpeername() each time: with 32 idle connections
    to one upstream that was a quarter of the broker's CPU under load. The
    answer here is the same poll(2) on the same socket, without the detour
    (and, within a pool pass, one poll(2) for all sockets: `_Readiness`).
    """

    def __init__(self, inner: httpcore2.AsyncNetworkStream, readiness: _Readiness | None = None) -> None:
        self._inner = inner
        self._sock: socket.socket | None = inner.get_extra_info("socket")
        self._fd = -1 if self._sock is None else self._sock.fileno()
        self._poller = select.poll()
        self._readiness = readiness if self._fd >= 0 else None
        if self._fd >= 0:
            self._poller.register(self._fd, select.POLLIN)
            if self._readiness is not None:
                self._readiness.register(self._fd)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        self._forget()  # before the fd is closed and can be reused by another socket
        await self._inner.aclose()

    def _forget(self) -> None:
        if self._readiness is not None:
            self._readiness.unregister(self._fd)
            self._readiness = None

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore2.AsyncNetworkStream:  # noqa: ASYNC109
        readiness, self._readiness = self._readiness, None  # the TLS stream takes the socket over
        if readiness is not None:
            readiness.unregister(self._fd)
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout), readiness)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._sock is not None:
            # The fd is ours while the socket object still holds it open.
            if self._sock.fileno() != self._fd or self._fd < 0:
                self._forget()
                return True  # closed: let the pool drop it, as a hang-up would
            if self._readiness is None:
                return bool(self._poller.poll(0))
            return self._readiness.readable(self._fd, self._poller)
        return self._inner.get_extra_info(info)


class _Backend(httpcore2.AsyncNetworkBackend):
    """httpcore's own backend, with its streams wrapped in `_Stream`."""

    def __init__(self, inner: httpcore2.AsyncNetworkBackend, readiness: _Readiness | None = None) -> None:
        self._inner = inner
        self._readiness = readiness

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._inner.connect_tcp(host, port, timeout, local_address,
                                                     socket_options), self._readiness)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Any = None) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._inner.connect_unix_socket(path, timeout, socket_options),
                       self._readiness)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    # httpx does not take a network backend; set the pool's before its first
    # connection. Should the attribute move in a later httpx2, the stock
    # backend simply stays (slower, same behaviour).
    pool = getattr(transport, "_pool", None)
    inner = getattr(pool, "_network_backend", None)
    assign = getattr(pool, "_assign_requests_to_connections", None)
    if isinstance(inner, httpcore2.AsyncNetworkBackend):
        readiness = _Readiness() if callable(assign) else None
        pool._network_backend = _Backend(inner, readiness)  # type: ignore[union-attr]
        if readiness is not None and assign is not None:
            # Mark the pool's synchronous pass over its connections, so its probes
            # share one poll(2) (see _Readiness). Same answers, fewer system calls.
            def assign_in_one_pass() -> Any:
                readiness.begin()
                try:
                    return assign()
                finally:
                    readiness.end()

            pool._assign_requests_to_connections = assign_in_one_pass  # type: ignore[union-attr]
    return transport


class Forwarder:
    """Sends calls upstream with a shared connection pool."""

    def __init__(self, *, timeout: float, max_response_bytes: int) -> None:
        self.max_response_bytes = max_response_bytes
        self.timeout = timeout
        # A jar that accepts no cookies: the pool is shared by every tenant.
        jar = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(timeout),
            transport=_transport(httpx.Limits(max_connections=200, max_keepalive_connections=64)),
            cookies=jar,
            trust_env=False,
        )
        # The content codings httpx decodes are the ones it asks for by default.
        offered = self._client.headers.get("accept-encoding", "")
        self._decodable = frozenset({"identity"} | {
            e.strip().lower() for e in offered.split(",") if e.strip()})

    async def close(self) -> None:
        await self._client.aclose()

    async def send(self, credential: Credential, secret: Secret, method: str, path: NormalPath,
                   query: list[tuple[str, str]], headers: dict[str, str],
                   body: bytes) -> UpstreamResponse:
        """Make the call; raise UpstreamError on network failure, timeout or oversize."""
        url = credential.base_url + path.encoded
        params = outgoing_query(query, credential, secret)
        request = self._client.build_request(
            method, url,
            # None when empty: an empty QueryParams costs a second URL parse for nothing
            # (base_url and the normalised path carry no query).
            params=httpx.QueryParams(params) if params else None,
            headers=outgoing_headers(headers, credential, secret),
            content=body if body else None,
            timeout=httpx.Timeout(self.timeout),  # per call: a config reload may change it
        )
        start = time.perf_counter()
        try:
            response = await self._client.send(request, stream=True)
            try:
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_response_bytes:
                    raise UpstreamError(self._too_big(), 502)
                codings = response.headers.get_list("content-encoding", split_commas=True)
                unknown = [c for c in codings if c.strip().lower() not in self._decodable]
                if unknown:
                    # Undecoded bytes could carry the key past redaction.
                    raise UpstreamError(f"{credential.host} answered in a content encoding "
                                        f"the broker cannot read ({unknown[0][:20]})", 502)
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_response_bytes:
                        raise UpstreamError(self._too_big(), 502)
                    chunks.append(chunk)
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            raise UpstreamError(
                f"{credential.host} did not answer within {self.timeout:g} s", 504) from None
        except (httpx.HTTPError, OSError) as e:
            # The exception text may hold the URL, and with query auth the URL holds the key.
            raise UpstreamError(f"{credential.host} could not be reached ({type(e).__name__})",
                                502) from None
        ms = (time.perf_counter() - start) * 1000
        out_headers = [(k, v) for k, v in response.headers.multi_items()
                       if k.lower() not in RESPONSE_DROP]
        return UpstreamResponse(response.status_code, out_headers, b"".join(chunks), ms)

    def _too_big(self) -> str:
        return f"the upstream response is larger than the {self.max_response_bytes} byte cap"
