"""What a call is and how it can end: the request, the redacted answer, the refusal.

The vocabulary shared by the socket server (which parses requests and writes
answers) and the engine (which decides them), drawn once here.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# Every refusal code an agent can be given, and its HTTP status (DESIGN §4 says when each applies).
REFUSAL_STATUS = {
    "unmapped_workspace": 403,
    "wrong_tenant": 403,
    "no_session": 403,  # require_session and the call came from outside a session; or a dead token
    "unknown_credential": 404,
    "denied_by_policy": 403,
    "denied_by_operator": 403,
    "approval_timeout": 403,
    "approval_unavailable": 403,
    "bad_request": 400,
    "upstream_error": 502,
    "caller_gone": 499,  # audited only: the caller hung up while its call waited, nobody reads this
    "audit_unavailable": 503,
    "session_limit": 429,  # broker.max_sessions sessions are open already
}


@dataclass
class CallRequest:
    """An agent's call, from /v1/request or /v1/proxy, already parsed."""

    credential: str
    method: str
    path: str
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    tenant_claim: str | None = None
    reason: str = ""
    token: str | None = None  # a session token from the request's headers (never forwarded)
    # Returns once the caller has hung up (the socket server's watch); awaited only while a
    # call waits for the operator, so an approval never outlives the agent that asked.
    hangup: Callable[[], Awaitable[None]] | None = field(default=None, repr=False, compare=False)
    stream: bool = False  # the answer may stream back as it arrives (/v1/proxy)


@dataclass(frozen=True)
class Refusal:
    """A call the broker did not make (or whose answer it withheld), and why."""

    code: str
    message: str
    audit_id: str | None
    status: int = 0

    @property
    def http_status(self) -> int:
        return self.status or REFUSAL_STATUS.get(self.code, 400)

    def json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "audit_id": self.audit_id}}


@dataclass(frozen=True)
class Answer:
    """The upstream's answer, already redacted."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    audit_id: str


@dataclass(frozen=True)
class StreamedAnswer:
    """The upstream's answer as it arrives: its head now, its body redacted chunk by chunk.

    Whoever takes it must run `chunks` to its end or close it (`aclose`): that ends
    the upstream call and audits its outcome.
    """

    status: int
    headers: list[tuple[str, str]]
    chunks: AsyncGenerator[bytes, None]
    audit_id: str
