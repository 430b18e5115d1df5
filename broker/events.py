"""Events the engine publishes to subscribers (the dashboard, `outloop broker`'s log).

Plain dataclasses: subscribers turn them into whatever they need (the TUI turns
them into Textual messages in one place). None of them ever carries a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PendingApproval:
    """An `ask` call waiting for the operator."""

    id: str
    created: float  # time.monotonic() when it started waiting
    deadline: float  # time.monotonic() when it is denied unanswered
    created_wall: float  # time.time(), for display
    tenant: str
    workspace: str
    pid: int
    exe: str
    credential: str
    method: str
    host: str
    path: str
    rule: str | None  # the ask rule that matched; None when the credential has no rules
    reason: str


@dataclass(frozen=True)
class ApprovalRequested:
    approval: PendingApproval


@dataclass(frozen=True)
class ApprovalResolved:
    approval: PendingApproval
    decision: str  # "approved" | "always" | "denied" | "timeout" | "cancelled"
    approver: str


@dataclass(frozen=True)
class AuditRecorded:
    record: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    """A refused call, raised separately so the dashboard can ring for wrong_tenant."""

    code: str
    tenant: str | None
    credential: str | None
    message: str


@dataclass(frozen=True)
class BrokerStateChanged:
    state: str  # "starting" | "listening" | "locked" | "stopped" | "error"
    detail: str = ""


@dataclass(frozen=True)
class ConfigReloaded:
    tenants: int


@dataclass(frozen=True)
class ConfigRejected:
    """config.toml changed but does not validate; the last good config stays in force."""

    message: str


Event = (
    ApprovalRequested
    | ApprovalResolved
    | AuditRecorded
    | Refused
    | BrokerStateChanged
    | ConfigReloaded
    | ConfigRejected
)
