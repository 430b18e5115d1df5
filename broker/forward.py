"""Putting a call on the wire: one shared httpx client, the credential injected.

The upstream URL is the credential's base_url plus the normalised path. Client
headers that could carry a credential, and hop-by-hop headers, are dropped; the
credential goes in as the config says; redirects are never followed; request and
response sizes are capped.
"""

from __future__ import annotations

import base64
import http.cookiejar
import time
from dataclasses import dataclass

import httpx2 as httpx

from broker.config import Credential
from broker.policy import NormalPath
from broker.secrets import Secret
from broker.transport import PooledTransport

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


class Forwarder:
    """Sends calls upstream with a shared connection pool."""

    def __init__(self, *, timeout: float, max_response_bytes: int) -> None:
        self.max_response_bytes = max_response_bytes
        # A jar that accepts no cookies: the pool is shared by every tenant.
        jar = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(timeout),
            transport=PooledTransport(max_connections=200, max_idle=64),
            cookies=jar,
            trust_env=False,
        )
        # The content codings httpx decodes are the ones it asks for by default.
        offered = self._client.headers.get("accept-encoding", "")
        self._decodable = frozenset({"identity"} | {
            e.strip().lower() for e in offered.split(",") if e.strip()})

    @property
    def timeout(self) -> float:
        """Seconds for each of connect, write and read (a config reload may change it)."""
        read = self._client.timeout.read
        return 0.0 if read is None else read

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._client.timeout = httpx.Timeout(seconds)

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
