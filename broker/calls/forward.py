"""Putting a call on the wire: one httpx client per credential, the credential injected, the answer streamed.

The upstream URL is the credential's base_url plus the normalised path. Client
headers that could carry a credential, and hop-by-hop headers, are dropped; the
credential goes in as the config says; redirects are never followed; request and
response sizes are capped.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import ssl
import time
import urllib.request
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx

from broker import __version__
from broker.calls.transport import PooledTransport, ResponseTooLarge
from broker.config import BrokerSettings, Credential
from broker.policy import NormalPath
from broker.secrets import Secret

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-auth-token",
        "x-goog-api-key",
        "private-token",
        "x-access-token",
        "x-outloop-session",
    }
)
# Headers that ask a server (or a framework in front of it) to treat the request as
# another method or path than the one policy judged, or to believe it came from
# elsewhere: never forwarded. X-Forwarded-* goes too (FORWARDED_PREFIX).
REWRITING = frozenset(
    {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-override-url",
        "x-original-method",
        "forwarded",
        "x-real-ip",
        "x-original-host",
        "x-host",
        "x-client-ip",
        "true-client-ip",
    }
)
FORWARDED_PREFIX = "x-forwarded-"
# The broker must read every response to redact it, so the agent may not pick an
# encoding (bzip2, br, zstd, ...) that the broker cannot decode but the agent can.
BROKER_OWNED = frozenset({"accept-encoding"})
# Not passed back: framing is ours, and cookies could carry a session minted from the key.
RESPONSE_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "set-cookie",
        "set-cookie2",
    }
)


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


# An answer's head as a transport gives it: status, headers, the raw body, and how to end it.
_Head = tuple[int, list[tuple[str, str]], AsyncIterator[bytes], Callable[[], Awaitable[None]]]


def outgoing_headers(client_headers: dict[str, str], credential: Credential, secret: Secret) -> dict[str, str]:
    """Client headers minus hop-by-hop and credential-bearing ones, plus the credential."""
    drop = HOP_BY_HOP | CREDENTIAL_HEADERS | BROKER_OWNED | REWRITING | connection_listed(client_headers.items())
    if credential.auth.kind == "header":
        drop = drop | {credential.auth.arg.lower()}
    headers = {k: v for k, v in client_headers.items() if k.lower() not in drop and not forwarding_header(k)}
    auth = credential.auth
    if auth.kind == "bearer":
        headers["Authorization"] = f"Bearer {secret.reveal()}"
    elif auth.kind == "basic":
        token = base64.b64encode(f"{auth.arg}:{secret.reveal()}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    elif auth.kind == "header":
        headers[auth.arg] = secret.reveal()
    return headers


def connection_listed(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The header names a Connection header lists: hop-by-hop, so never forwarded."""
    return frozenset(
        token.strip().lower()
        for k, v in headers
        if k.lower() == "connection"
        for token in v.split(",")
        if token.strip()
    )


def forwarding_header(name: str) -> bool:
    """X-Forwarded-For, -Host, -Proto, -Prefix, ...: where a proxy says the call came from."""
    return name.lower().startswith(FORWARDED_PREFIX)


def outgoing_query(
    query: list[tuple[str, str]], credential: Credential, secret: Secret
) -> list[tuple[str, str | int | float | bool | None]]:
    out: list[tuple[str, str | int | float | bool | None]] = []
    name = credential.auth.arg if credential.auth.kind == "query" else None
    out.extend((k, v) for k, v in query if k != name)
    if name is not None:
        out.append((name, secret.reveal()))
    return out


@dataclass(frozen=True)
class UpstreamSettings:
    """How calls go upstream: the [broker] settings the forwarder uses."""

    timeout: float = 30.0  # connect, write, the wait for the head, each silence of a whole answer
    idle_timeout: float = 300.0  # each silence of a streamed answer
    max_response_bytes: int = 10 * 1024 * 1024
    ca_bundle: str | None = None
    http2: bool = False

    @classmethod
    def of(cls, broker: BrokerSettings) -> UpstreamSettings:
        return cls(
            broker.upstream_timeout,
            broker.stream_idle_timeout,
            broker.max_response_bytes,
            broker.ca_bundle,
            broker.http2,
        )

    @property
    def client_key(self) -> tuple[object, ...]:
        """What an httpx client is made with (timeouts and the cap apply per call)."""
        return (self.ca_bundle, self.http2)


class Forwarder:
    """Sends calls upstream with one httpx client per credential: a connection opened
    for one credential's calls never carries another's, so an upstream that desyncs
    (reads a GET's body as the next request) or answers late cannot hand one
    tenant's request or answer to another.

    The clients honour the broker's proxy environment (HTTPS_PROXY, NO_PROXY,
    ALL_PROXY), trust `ca_bundle` (else SSL_CERT_FILE / SSL_CERT_DIR, else the
    system's store), speak HTTP/2 where asked and the server agrees, keep no
    cookies, follow no redirect and retry nothing.

    See UpstreamSettings for the timeouts and the cap.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings  # replaced when [broker] changes: from the next call
        self._clients: dict[tuple[str, str], tuple[UpstreamSettings, httpx.AsyncClient]] = {}
        self._urls: dict[str, httpx.URL] = {}
        self._closing: set[asyncio.Future[None]] = set()
        self._pool: PooledTransport | None = None
        self._pool_key: tuple[object, ...] = ()
        self._proxy_of: dict[str, bool] = {}

    def _retire(self, closing: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(closing)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        clients, self._clients = self._clients, {}
        for _settings, client in clients.values():
            await client.aclose()

    def _client(self, credential: Credential) -> httpx.AsyncClient:
        settings = self.settings
        key = (credential.tenant, credential.name)
        held = self._clients.get(key)
        if held is not None and held[0].client_key == settings.client_key:
            return held[1]
        if held is not None:  # [broker] settings changed: the next calls get a new client
            self._retire(held[1].aclose())
        client = httpx.AsyncClient(
            headers=DEFAULT_HEADERS,
            verify=_verify(settings.ca_bundle),
            http2=settings.http2,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=30.0),
            follow_redirects=False,
            trust_env=True,
        )
        self._clients[key] = (settings, client)
        return client

    def _base(self, base_url: str) -> httpx.URL:
        base = self._urls.get(base_url)
        if base is None:
            base = self._urls[base_url] = httpx.URL(base_url)  # IDNA host, encoded path
        return base

    def _target(self, credential: Credential, path: NormalPath, query: list[tuple[str, str]], secret: Secret) -> bytes:
        """The request target: the base URL's path, the call's path and its query."""
        base = self._base(credential.base_url)
        target = base.raw_path.split(b"?", 1)[0].rstrip(b"/") + path.encoded.encode("ascii")
        params = outgoing_query(query, credential, secret)
        if params:
            target += b"?" + str(httpx.QueryParams(params)).encode("ascii")
        return target

    async def open(
        self,
        credential: Credential,
        secret: Secret,
        method: str,
        path: NormalPath,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        body: bytes,
        *,
        whole: bool = False,
    ) -> UpstreamStream:
        """Make the call and wait for the answer's head; raise UpstreamError on network
        failure, timeout, or an encoding the broker cannot read.

        A body read `whole` may go quiet for `timeout` at a time, a streamed one for
        `idle_timeout` (a reasoning model's long pause mid-stream).

        Plain HTTP/1.1 goes on the broker's own pool (broker/calls/transport.py: a
        fraction of httpx's cost per call, which decides the broker's throughput); a
        call through a proxy, or with HTTP/2 on, goes through httpx.
        """
        settings = self.settings
        idle = settings.timeout if whole else settings.idle_timeout
        host = credential.host
        try:
            sent = outgoing_headers(headers, credential, secret)
        except UnicodeEncodeError:
            raise _not_ascii() from None
        start = time.perf_counter()
        try:
            async with asyncio.timeout(settings.timeout):
                if settings.http2 or self._proxied(credential.base_url):
                    head = await self._open_httpx(credential, secret, method, path, query, sent, body, idle)
                else:
                    head = await self._open_pooled(credential, secret, method, path, query, sent, body, idle)
        except UpstreamError:
            raise
        except (TimeoutError, httpx.TimeoutException):
            raise UpstreamError(f"{host} did not answer within {settings.timeout:g} s", 504) from None
        except ResponseTooLarge:
            raise _too_large(settings.max_response_bytes) from None
        except (httpx.HTTPError, OSError) as e:
            # The exception text may hold the URL, and with query auth the URL holds the key.
            raise UpstreamError(f"{host} could not be reached ({type(e).__name__})", 502) from None
        ms = (time.perf_counter() - start) * 1000
        status, received, raw, close = head
        try:
            codings = _codings(received, host)
        except UpstreamError:
            await close()
            raise
        declared = next((v for k, v in received if k == "content-length"), None)
        return UpstreamStream(
            status,
            _answer_headers(received, method, codings),
            codings,
            raw,
            close,
            host=host,
            cap=settings.max_response_bytes,
            idle_timeout=idle,
            whole=whole,
            ms=ms,
            declared=int(declared) if declared is not None and declared.isdigit() and not codings else None,
        )

    async def _open_httpx(
        self,
        credential: Credential,
        secret: Secret,
        method: str,
        path: NormalPath,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        body: bytes,
        idle: float,
    ) -> _Head:
        client = self._client(credential)
        t = self.settings.timeout
        headers["Accept-Encoding"] = ACCEPT_ENCODING
        try:
            request = client.build_request(
                method,
                self._base(credential.base_url).copy_with(raw_path=self._target(credential, path, query, secret)),
                headers=headers,
                content=body if body or method in ("POST", "PUT", "PATCH") else None,
                timeout=httpx.Timeout(connect=t, write=t, pool=t, read=idle),
            )
        except UnicodeEncodeError:
            raise _not_ascii() from None
        response = await client.send(request, stream=True)
        # Each header decoded on its own, as the pool does (httpx picks one charset for all).
        received = [(_text(k).lower(), _text(v)) for k, v in response.headers.raw]
        return response.status_code, received, response.aiter_raw(), response.aclose

    async def _open_pooled(
        self,
        credential: Credential,
        secret: Secret,
        method: str,
        path: NormalPath,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        body: bytes,
        idle: float,
    ) -> _Head:
        settings = self.settings
        pool = self._pool_for(settings)
        base = self._base(credential.base_url)
        port = base.port or (443 if base.raw_scheme == b"https" else 80)
        # (not through httpx.URL: parsing one again cost 0.1 ms a call)
        target = self._target(credential, path, query, secret)
        try:
            sent = _request_headers(base.netloc, method, headers, len(body))
        except UnicodeEncodeError:
            raise _not_ascii() from None
        answer = await pool.open(
            (base.raw_scheme, base.raw_host, port),
            method.encode("ascii"),
            target,
            sent,
            body,
            timeout=settings.timeout,
            max_bytes=settings.max_response_bytes,
            lane=(credential.tenant, credential.name),
        )

        async def raw() -> AsyncIterator[bytes]:
            while data := await answer.read(idle):
                yield data

        async def close() -> None:
            answer.close()

        received = [(_text(k), _text(v)) for k, v in answer.headers]
        return answer.status, received, raw(), close

    async def send(
        self,
        credential: Credential,
        secret: Secret,
        method: str,
        path: NormalPath,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        body: bytes,
    ) -> UpstreamResponse:
        """Make the call and read its answer whole; raise UpstreamError as `open` does,
        and when the body is larger than the cap or does not decode."""
        stream = await self.open(credential, secret, method, path, query, headers, body, whole=True)
        content = await stream.read()
        return UpstreamResponse(stream.status, stream.headers, content, stream.ms)

    def _proxied(self, base_url: str) -> bool:
        """Whether the broker's environment sends calls to `base_url` through a proxy."""
        proxied = self._proxy_of.get(base_url)
        if proxied is None:
            url = httpx.URL(base_url)
            proxies = urllib.request.getproxies_environment()
            bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # (not in typeshed)
            proxied = bool(proxies.get(url.scheme) or proxies.get("all")) and not bypass(url.host)
            self._proxy_of[base_url] = proxied
        return proxied

    def _pool_for(self, settings: UpstreamSettings) -> PooledTransport:
        if self._pool is None or self._pool_key != settings.client_key:
            if self._pool is not None:
                self._retire(self._pool.aclose())
            verify = _verify(settings.ca_bundle)
            self._pool = PooledTransport(
                max_connections=64, max_idle=64, ssl_context=verify if isinstance(verify, ssl.SSLContext) else None
            )
            self._pool_key = settings.client_key
        return self._pool


class UpstreamStream:
    """An answer whose head has arrived: status and headers now, the body as it comes,
    its content codings undone, at most `cap` bytes of it."""

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]],
        codings: list[str],
        raw: AsyncIterator[bytes],
        close: Callable[[], Awaitable[None]],
        *,
        host: str,
        cap: int,
        idle_timeout: float,
        whole: bool,
        ms: float,
        declared: int | None,
    ) -> None:
        self.whole = whole  # read whole: quiet for at most upstream_timeout
        self.status = status
        self.headers = headers
        self.ms = ms  # until the head arrived
        self.declared = declared  # the body's length, when the upstream said and nothing is to be undone
        self.received = 0  # body bytes as sent (before decoding)
        self._raw = raw
        self._close = close
        self._decoders = [_Inflater(c, host) for c in reversed(codings)]
        self._host = host
        self._cap = cap
        self._idle = idle_timeout
        self._size = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for raw in self._raw:
                self.received += len(raw)
                for data in self._decoded(raw, 0):
                    self._size += len(data)
                    if self._size > self._cap:
                        raise TooLarge
                    if data:
                        yield data
            for decoder in self._decoders:
                decoder.finish()
        except (TooLarge, ResponseTooLarge):
            raise _too_large(self._cap) from None
        except httpx.TimeoutException:
            raise UpstreamError(
                f"{self._host} went quiet for {self._idle:g} s in the middle of its answer "
                f"([broker] {'upstream_timeout' if self.whole else 'stream_idle_timeout'})",
                504,
            ) from None
        except (httpx.HTTPError, OSError) as e:
            raise UpstreamError(f"{self._host} broke off its answer ({type(e).__name__})", 502) from None
        finally:
            await self._close()

    def _decoded(self, data: bytes, stage: int) -> Iterator[bytes]:
        """What `data` unpacks to through the codings from `stage` on, a piece at a time."""
        if stage == len(self._decoders):
            yield data
            return
        for piece in self._decoders[stage].feed(data):
            yield from self._decoded(piece, stage + 1)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        await self._close()


def _not_ascii() -> UpstreamError:
    # Its text could quote the key; say which kind of value it was instead.
    return UpstreamError("a header value (or the credential) is not ASCII, so it cannot be sent", 502)


def _too_large(cap: int) -> UpstreamError:
    return UpstreamError(f"the upstream response is larger than the {cap} byte cap", 502)


def _answer_headers(received: list[tuple[str, str]], method: str, codings: list[str]) -> list[tuple[str, str]]:
    """The upstream's headers that go back to the agent (names in lower case)."""
    drop = RESPONSE_DROP | connection_listed(received)
    out = [(k, v) for k, v in received if k not in drop]
    if method == "HEAD" and not codings:
        # The size GET would send: a HEAD answer's one use of Content-Length (with a
        # coding the broker undoes, that size is not what the agent would get).
        out += [(k, v) for k, v in received if k == "content-length"][:1]
    return out


def _text(raw: bytes) -> str:
    """A header name or value as httpx shows it: ASCII, else UTF-8, else latin-1."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")


def _request_headers(host: bytes, method: str, headers: dict[str, str], body_size: int) -> list[tuple[bytes, bytes]]:
    """Host, the call's headers, then what the broker adds (Accept-Encoding is its own)."""
    out = [(b"Host", host)]
    out.extend((k.encode("ascii"), v.encode("ascii")) for k, v in headers.items())
    present = {k.lower() for k, _ in out}
    out.extend(
        (k.encode("ascii"), v.encode("ascii")) for k, v in DEFAULT_HEADERS.items() if k.lower().encode() not in present
    )
    out.append((b"Accept-Encoding", ACCEPT_ENCODING.encode("ascii")))
    if body_size or method in ("POST", "PUT", "PATCH"):
        out.append((b"Content-Length", str(body_size).encode("ascii")))
    return out


def _verify(ca_bundle: str | None) -> ssl.SSLContext | bool:
    """What upstream certificates are checked against: `[broker] ca_bundle`, else the
    SSL_CERT_FILE / SSL_CERT_DIR of the broker's environment, else the system's store."""
    cafile = ca_bundle or os.environ.get("SSL_CERT_FILE") or None
    capath = None if ca_bundle else os.environ.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        return True
    return _context(cafile, capath)


@functools.lru_cache(maxsize=8)
def _context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile, capath=capath)


# The codings the broker asks for and can undo (zlib does both).
ACCEPT_ENCODING = "gzip, deflate"
# IANA's HTTP content codings, and bzip2 (common, unregistered): names safe to quote.
KNOWN_CODINGS = frozenset(
    {
        "aes128gcm",
        "br",
        "bzip2",
        "compress",
        "dcb",
        "dcz",
        "deflate",
        "exi",
        "gzip",
        "identity",
        "pack200-gzip",
        "x-compress",
        "x-gzip",
        "zstd",
    }
)
DEFAULT_HEADERS = {"Accept": "*/*", "User-Agent": f"outloop/{__version__}"}


def _codings(headers: list[tuple[str, str]], host: str) -> list[str]:
    """The content codings of an answer the broker will undo, in the order applied;
    UpstreamError for one it cannot (bytes the broker cannot read could carry the key
    past redaction). `headers`: names in lower case."""
    codings = [c.strip().lower() for k, v in headers if k == "content-encoding" for c in v.split(",") if c.strip()]
    for coding in codings:
        if coding not in ("identity", "gzip", "x-gzip", "deflate"):
            # Named only if it is a known coding: the header is the upstream's text, and
            # this message reaches the agent and the audit log unredacted.
            name = coding if coding in KNOWN_CODINGS else "not a registered coding"
            raise UpstreamError(f"{host} answered in a content encoding the broker cannot read ({name})", 502)
    return [c for c in codings if c != "identity"]


# The most an upstream's content coding unpacks to at a time.
PIECE = 64 * 1024


class TooLarge(Exception):
    """The answer passed the [broker] max_response_bytes cap."""


class _Inflater:
    """Undoes one content coding as the body arrives, a piece at a time.

    gzip: the gzip wrapper; deflate: the zlib wrapper, or raw deflate from servers that
    send that instead (as httpx and browsers accept).
    """

    def __init__(self, coding: str, host: str) -> None:
        self._coding = coding
        self._host = host
        self._raw_next = coding == "deflate"  # zlib first; raw deflate if that fails at once
        self._decoder = zlib.decompressobj(zlib.MAX_WBITS if coding == "deflate" else zlib.MAX_WBITS | 16)
        self._seen = b""  # what was fed before the first output, for the raw deflate retry
        self._fed = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        """What `data` unpacks to, in pieces of at most PIECE bytes: a zip bomb is
        unpacked only as far as its reader goes (the reader stops at the cap)."""
        self._fed = self._fed or bool(data)
        try:
            out = self._decoder.decompress(data, PIECE)
        except zlib.error:
            if not self._raw_next:
                raise self._broken() from None
            self._raw_next = False
            self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
            yield from self.feed(self._seen + data)
            return
        if self._raw_next:
            self._seen += data
            if out:
                self._raw_next, self._seen = False, b""
        yield out
        while self._decoder.unconsumed_tail:
            try:
                out = self._decoder.decompress(self._decoder.unconsumed_tail, PIECE)
            except zlib.error:
                raise self._broken() from None
            yield out

    def finish(self) -> None:
        # HEAD, 204 and 304 answers name a coding but have no body to undo.
        if self._fed and not self._decoder.eof:
            raise self._broken()

    def _broken(self) -> UpstreamError:
        return UpstreamError(f"{self._host} sent a {self._coding} body that does not decode", 502)
