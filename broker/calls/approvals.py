"""Pending approvals: `ask` calls wait here until the operator answers or time runs out.

The headless half of approvals. An approver (the dashboard) attaches and answers
through `answer()`; with none attached, `ask` calls are refused at once.
"always" grants the same tenant + credential + method + rule for the rest of the
session, until its expiry.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.events import ApprovalRequested, ApprovalResolved, Event, PendingApproval

Decision = str  # "approved" | "always" | "denied" | "timeout" | "cancelled"
GrantKey = tuple[str, str, str, str]


@dataclass(frozen=True)
class Grant:
    key: GrantKey
    expires: float  # time.monotonic()


def grant_key(approval: PendingApproval) -> GrantKey:
    # Without a matched rule (a credential with no rules) the grant covers the exact path.
    return (
        approval.tenant,
        approval.credential,
        approval.method,
        approval.rule or f"{approval.method} {approval.path}",
    )


class Approvals:
    def __init__(self, publish: Callable[[Event], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._publish = publish
        self._clock = clock
        self._waiting: dict[str, tuple[PendingApproval, asyncio.Future[tuple[Decision, str]]]] = {}
        self._grants: dict[GrantKey, Grant] = {}
        self.attached = 0  # number of attached approvers

    def new(self, *, timeout: float, **fields: Any) -> PendingApproval:
        now = self._clock()
        return PendingApproval(
            id=uuid.uuid4().hex[:12], created=now, deadline=now + timeout, created_wall=time.time(), **fields
        )

    def granted(self, approval: PendingApproval) -> Grant | None:
        """The live "always" grant covering this call, if any."""
        grant = self._grants.get(grant_key(approval))
        if grant is None:
            return None
        if grant.expires <= self._clock():
            del self._grants[grant.key]
            return None
        return grant

    def now(self) -> float:
        """The clock grants and deadlines are on (time.monotonic unless a test gives another)."""
        return self._clock()

    def grants(self) -> list[Grant]:
        now = self._clock()
        return [g for g in self._grants.values() if g.expires > now]

    async def wait(self, approval: PendingApproval) -> tuple[Decision, str]:
        """Wait for the operator's answer; returns (decision, approver)."""
        future: asyncio.Future[tuple[Decision, str]] = asyncio.get_running_loop().create_future()
        self._waiting[approval.id] = (approval, future)
        self._publish(ApprovalRequested(approval))
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, approval.deadline - self._clock()))
        except TimeoutError:
            self._finish(approval.id, "timeout", "timeout")
            return "timeout", "timeout"
        except asyncio.CancelledError:
            # The caller hung up: nobody waits for this answer any more.
            self._finish(approval.id, "cancelled", "caller_gone")
            raise
        finally:
            self._waiting.pop(approval.id, None)

    def answer(
        self, approval_id: str, decision: Decision, approver: str = "operator", always_ttl: float = 3600.0
    ) -> bool:
        """Answer a pending approval: "approved", "always" or "denied". False if not pending."""
        if decision not in ("approved", "always", "denied"):
            raise ValueError(f"unknown decision {decision!r}")
        entry = self._waiting.get(approval_id)
        if entry is None or entry[1].done():
            return False
        approval = entry[0]
        if decision == "always":
            key = grant_key(approval)
            self._grants[key] = Grant(key, self._clock() + always_ttl)
        self._finish(approval_id, decision, approver)
        return True

    def _finish(self, approval_id: str, decision: Decision, approver: str) -> None:
        entry = self._waiting.get(approval_id)
        if entry is None:
            return
        approval, future = entry
        if not future.done():
            future.set_result((decision, approver))
            self._publish(ApprovalResolved(approval, decision, approver))

    def pending(self) -> list[PendingApproval]:
        """Waiting approvals, oldest first."""
        return sorted((a for a, f in self._waiting.values() if not f.done()), key=lambda a: a.created)

    def deny_all(self, decision: Decision = "cancelled", approver: str = "shutdown") -> int:
        """Refuse everything pending (on quit, or when the broker is locked)."""
        ids = [a.id for a in self.pending()]
        for approval_id in ids:
            self._finish(approval_id, decision, approver)
        return len(ids)

    def revoke_grants(self) -> None:
        self._grants.clear()

    def revoke_grant(self, key: GrantKey) -> bool:
        """End one "always" grant now; False when it had already gone."""
        return self._grants.pop(key, None) is not None
