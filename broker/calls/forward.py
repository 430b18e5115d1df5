"""Putting a call on the wire: one connection pool, one lane of it per credential, the credential injected.

The upstream URL is the credential's base_url plus the normalised path. Client
headers that could carry a credential, and hop-by-hop headers, are dropped; the
credential goes in as the config says; redirects are never followed; request and
response sizes are capped.
"""

from __future__ import annotations

import base64
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import httpx2 as httpx

from broker import __version__
from broker.calls.transport import PooledTransport, ResponseTooLarge
from broker.config import Credential
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
class _Route:
    """Where a base URL's calls go: pool origin, path prefix and Host header, parsed once."""

    origin: tuple[bytes, bytes, int]
    prefix: bytes
    host: bytes


class Forwarder:
    """Sends calls upstream on one pool of connections (see broker/calls/transport.py),
    in which each credential has its own lane: a connection opened for one
    credential's calls never carries another's, so an upstream that desyncs (reads
    a GET's body as the next request) or answers late cannot hand one tenant's
    request or answer to another.

    httpx parses the base URL and encodes the query; the exchange goes straight to
    the pool's `fetch`, not through httpx's client layers, which cost more per
    call than the exchange itself (see the README's decisions). Nothing here keeps
    cookies, follows a redirect, or retries.
    """

    def __init__(self, *, timeout: float, max_response_bytes: int) -> None:
        self.timeout = timeout  # seconds for each of pool, connect, write and each read
        self.max_response_bytes = max_response_bytes
        self._pool = PooledTransport(max_connections=200, max_idle=64)
        self._routes: dict[str, _Route] = {}

    async def close(self) -> None:
        await self._pool.aclose()

    def _route(self, base_url: str) -> _Route:
        route = self._routes.get(base_url)
        if route is None:
            url = httpx.URL(base_url)  # IDNA host, percent-encoded path: httpx's rules
            scheme = url.raw_scheme
            port = url.port or (443 if scheme == b"https" else 80)
            route = _Route((scheme, url.raw_host, port), url.raw_path.rstrip(b"/"), url.netloc)
            self._routes[base_url] = route
        return route

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
        """Make the call; raise UpstreamError on network failure, timeout or oversize."""
        route = self._route(credential.base_url)
        target = route.prefix + path.encoded.encode("ascii")
        params = outgoing_query(query, credential, secret)
        if params:
            target += b"?" + str(httpx.QueryParams(params)).encode("ascii")
        try:
            sent = _request_headers(route.host, method, outgoing_headers(headers, credential, secret), len(body))
        except UnicodeEncodeError:
            # Its text could quote the key; say which kind of value it was instead.
            raise UpstreamError("a header value (or the credential) is not ASCII, so it cannot be sent", 502) from None
        start = time.perf_counter()
        try:
            fetched = await self._pool.fetch(
                route.origin,
                method.encode("ascii"),
                target,
                sent,
                body,
                timeout=self.timeout,
                max_bytes=self.max_response_bytes,
                lane=(credential.tenant, credential.name),
            )
            response_headers = [(_text(k), _text(v)) for k, v in fetched.headers]
            content = _decoded(fetched.body, response_headers, self.max_response_bytes, credential.host)
        except ResponseTooLarge:
            raise UpstreamError(self._too_big(), 502) from None
        except httpx.TimeoutException:
            raise UpstreamError(f"{credential.host} did not answer within {self.timeout:g} s", 504) from None
        except (httpx.HTTPError, OSError) as e:
            # The exception text may hold the URL, and with query auth the URL holds the key.
            raise UpstreamError(f"{credential.host} could not be reached ({type(e).__name__})", 502) from None
        ms = (time.perf_counter() - start) * 1000
        out_headers = [(k, v) for k, v in response_headers if k not in RESPONSE_DROP]
        if method == "HEAD" and not any(k == "content-encoding" for k, _ in response_headers):
            # The size GET would send: a HEAD answer's one use of Content-Length (with a
            # coding the broker undoes, that size is not what the agent would get).
            out_headers += [(k, v) for k, v in response_headers if k == "content-length"][:1]
        return UpstreamResponse(fetched.status, out_headers, content, ms)

    def _too_big(self) -> str:
        return f"the upstream response is larger than the {self.max_response_bytes} byte cap"


# The codings the broker asks for and can undo (zlib does both).
ACCEPT_ENCODING = b"gzip, deflate"
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
_DEFAULT_HEADERS = ((b"accept", b"Accept", b"*/*"), (b"user-agent", b"User-Agent", f"outloop/{__version__}".encode()))


def _request_headers(host: bytes, method: str, headers: dict[str, str], body_size: int) -> list[tuple[bytes, bytes]]:
    """Host, the call's headers, then what the broker adds (Accept-Encoding is its own)."""
    out = [(b"Host", host)]
    out.extend((k.encode("ascii"), v.encode("ascii")) for k, v in headers.items())
    present = {k.lower() for k, _ in out}
    out.extend((name, value) for key, name, value in _DEFAULT_HEADERS if key not in present)
    out.append((b"Accept-Encoding", ACCEPT_ENCODING))
    if body_size or method in ("POST", "PUT", "PATCH"):
        out.append((b"Content-Length", str(body_size).encode("ascii")))
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


def _decoded(body: bytes, headers: list[tuple[str, str]], cap: int, host: str) -> bytes:
    """The body with its content codings undone, at most `cap` bytes of it (`headers`:
    names in lower case, as `fetch` gives them).

    Only what ACCEPT_ENCODING offers is undone; anything else is refused, since
    bytes the broker cannot read could carry the key past redaction.
    """
    codings = [c.strip().lower() for k, v in headers if k == "content-encoding" for c in v.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding not in ("gzip", "x-gzip", "deflate"):
            # Named only if it is a known coding: the header is the upstream's text, and
            # this message reaches the agent and the audit log unredacted.
            name = coding if coding in KNOWN_CODINGS else "not a registered coding"
            raise UpstreamError(f"{host} answered in a content encoding the broker cannot read ({name})", 502)
        if body:  # HEAD, 204 and 304 answers name a coding but have no body to undo
            body = _inflate(body, coding, cap, host)
    return body


def _inflate(data: bytes, coding: str, cap: int, host: str) -> bytes:
    # gzip: the gzip wrapper; deflate: the zlib wrapper, or raw deflate from servers that
    # send that instead (as httpx and browsers accept).
    wbits = [zlib.MAX_WBITS | 16] if coding != "deflate" else [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    for bits in wbits:
        decoder = zlib.decompressobj(bits)
        try:
            out = decoder.decompress(data, cap + 1)  # a zip bomb stops at the cap
            if len(out) > cap:
                raise ResponseTooLarge(cap)
            if not decoder.eof:
                raise zlib.error("truncated")
            return out
        except zlib.error:
            continue
    raise UpstreamError(f"{host} sent a {coding} body that does not decode", 502)
