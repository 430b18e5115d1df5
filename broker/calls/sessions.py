"""Agent sessions: a tenant bound at launch that the agent cannot change afterwards.

`outloop run` asks the broker to open a session and becomes its root process. The
root is recorded as a pid plus that process's start time (so a reused pid is
never taken for it) and is a child subreaper, so every descendant, double-forked
or `nohup`'d, stays in its tree. A call whose process tree holds a live root is
that session's; a call presenting the session's token is too.

The token is 256 random bits. The broker keeps only its SHA-256 (in memory and in
the state file), so the state file grants nothing. Sessions end when their root
exits (a pidfd tells the event loop at once; without one, each lookup checks the
root's start time), at expiry, or when the operator revokes them. After a broker
restart a session is taken back only if its root is alive with the same start time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from broker.calls.identity import process_start
from broker.paths import atomic_write

TOKEN_PREFIX = "outloop_s_"  # noqa: S105 - a prefix, not a secret
# A token as it can appear anywhere (a header, a query string): the prefix and 43
# characters of URL-safe base64 (secrets.token_urlsafe(32)).
TOKEN_RE = re.compile(r"outloop_s_[A-Za-z0-9_-]{43}")
# Tokens of ended sessions remembered (by hash) so their use gets a clear refusal.
ENDED_MEMORY = 4096
# Processes remembered from sessions that have ended (a leftover is refused, not judged by its folder).
LEFTOVER_MEMORY = 16384


class SessionError(Exception):
    """A session cannot be opened; `code` is the refusal code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    """One agent session. `ended` is "" while it lasts, else why it ended."""

    id: str
    tenant: str
    workspace: str
    label: str
    started: float  # wall clock, seconds
    expires: float  # wall clock, seconds
    root_pid: int
    root_start: int  # the root's start time, in clock ticks since boot
    token_hash: str = field(repr=False)
    parent: str | None = None
    ended: str = ""
    _pidfd: int = field(default=-1, repr=False, compare=False)

    def public(self) -> dict[str, Any]:
        """What `outloop session list` shows (never the token, nor its hash)."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "workspace": self.workspace,
            "label": self.label,
            "started": self.started,
            "expires": self.expires,
            "root_pid": self.root_pid,
            "parent": self.parent,
        }


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def find_token(value: str) -> str | None:
    """The session token inside a header value (`Bearer <token>` or the bare token), if any."""
    if TOKEN_PREFIX not in value:
        return None
    match = TOKEN_RE.search(value)
    return match.group(0) if match else None


class Sessions:
    """The broker's live sessions, by root pid and by token hash, kept in a 0600 state file."""

    def __init__(self, state_file: Path, *, max_sessions: int = 1024) -> None:
        self.state_file = state_file
        self.max_sessions = max_sessions
        self._by_id: dict[str, Session] = {}
        self._by_root: dict[int, Session] = {}
        self._by_token: dict[str, Session] = {}
        self._ended: OrderedDict[str, Session] = OrderedDict()
        self._members: dict[str, set[tuple[int, int]]] = {}  # live session id -> descendants seen
        self._leftovers: OrderedDict[tuple[int, int], str] = OrderedDict()  # (pid, start) -> ended session
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_end: Callable[[Session], None] | None = None

    def __len__(self) -> int:
        return len(self._by_id)

    # -- lifecycle ----------------------------------------------------------------

    def load(self, *, write: bool = True) -> list[Session]:
        """Take back the sessions of the state file whose root still runs (same start time).

        `write=False` only reads (a command asking whether it runs inside a session).
        """
        try:
            doc = json.loads(self.state_file.read_text(encoding="utf-8"))
            rows = doc.get("sessions", []) if isinstance(doc, dict) else []
        except (OSError, ValueError):
            rows = []
        now = time.time()
        restored: list[Session] = []
        for row in rows:
            try:
                session = Session(**{k: v for k, v in row.items() if not k.startswith("_")})
            except TypeError:
                continue
            if session.expires <= now or process_start(session.root_pid) != session.root_start:
                continue
            self._add(session)
            restored.append(session)
        if write:
            self._save()
        return restored

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch each root with a pidfd on `loop`, so a session ends as soon as its root exits."""
        self._loop = loop
        for session in list(self._by_id.values()):
            self._watch(session)

    def detach(self) -> None:
        for session in self._by_id.values():
            self._unwatch(session)
        self._loop = None

    def open(
        self,
        *,
        tenant: str,
        workspace: str,
        label: str,
        ttl: float,
        root_pid: int,
        parent: Session | None = None,
    ) -> tuple[Session, str]:
        """A new session rooted at `root_pid`, and its token (shown once, never stored)."""
        if len(self._by_id) >= self.max_sessions:
            self.sweep()
            if len(self._by_id) >= self.max_sessions:
                raise SessionError(
                    "session_limit",
                    f"the broker already holds {self.max_sessions} sessions (broker.max_sessions); "
                    "the operator can end some with `outloop session revoke ID`",
                )
        start = process_start(root_pid)
        if start is None:
            raise SessionError("bad_request", "the process opening the session could not be examined")
        now = time.time()
        expires = now + ttl
        if parent is not None:
            expires = min(expires, parent.expires)  # a session inside another never outlives it
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        session = Session(
            id=secrets.token_hex(6),
            tenant=tenant,
            workspace=workspace,
            label=label,
            started=now,
            expires=expires,
            root_pid=root_pid,
            root_start=start,
            token_hash=token_hash(token),
            parent=parent.id if parent else None,
        )
        old = self._by_root.get(root_pid)
        if old is not None:  # the same process opening a second session replaces its first
            self.end(old.id, "replaced")
        self._add(session)
        self._watch(session)
        self._save()
        return session, token

    def end(self, session_id: str, reason: str) -> Session | None:
        """End a session (root exited, expired, revoked); returns it, or None if not live."""
        session = self._by_id.pop(session_id, None)
        if session is None:
            return None
        session.ended = reason
        self._unwatch(session)
        if self._by_root.get(session.root_pid) is session:
            del self._by_root[session.root_pid]
        self._by_token.pop(session.token_hash, None)
        for member in self._members.pop(session.id, ()):
            self._leftovers[member] = session.id
        while len(self._leftovers) > LEFTOVER_MEMORY:
            self._leftovers.popitem(last=False)
        self._ended[session.token_hash] = session
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        self._save()
        if self.on_end is not None:
            self.on_end(session)
        return session

    def sweep(self) -> list[Session]:
        """End every session past its expiry or whose root is gone."""
        now = time.time()
        ended = []
        for session in list(self._by_id.values()):
            reason = self._why_over(session, now)
            if reason:
                found = self.end(session.id, reason)
                if found is not None:
                    ended.append(found)
        return ended

    # -- lookups (on every call: dict lookups, and a clock read) -------------------------

    def live(self) -> list[Session]:
        return sorted(self._by_id.values(), key=lambda s: s.started)

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def in_tree(self, lineage: Iterable[tuple[int, int]]) -> Session | None:
        """The innermost live session whose root is in `lineage` ((pid, start time), caller first)."""
        if not self._by_root:
            return None
        for pid, start in lineage:
            session = self._by_root.get(pid)
            if session is not None and session.root_start == start and self._still_live(session):
                return session
        return None

    def note_members(self, session_id: str, members: Iterable[tuple[int, int]]) -> None:
        """Remember processes of a live session's tree ((pid, start time)), for after it ends."""
        if session_id in self._by_id:
            self._members.setdefault(session_id, set()).update(members)

    def left_over(self, lineage: Iterable[tuple[int, int]]) -> str | None:
        """The ended session a process (or one of its ancestors) was part of, if any.

        Killing the root ends the session but not what it started: those processes,
        and anything they start, stay that session's and are refused, rather than
        being judged by whatever folder they move to.
        """
        if not self._leftovers:
            return None
        for member in lineage:
            ended = self._leftovers.get(member)
            if ended is not None:
                return ended
        return None

    def by_token(self, token: str) -> Session | None:
        """The session of `token`: live, or ended (`ended` says why); None if never known here."""
        digest = token_hash(token)
        session = self._by_token.get(digest)
        if session is not None:
            self._still_live(session)
            return session
        return self._ended.get(digest)

    def _still_live(self, session: Session) -> bool:
        reason = self._why_over(session, time.time(), cheap=True)
        if reason:
            self.end(session.id, reason)
            return False
        return True

    def _why_over(self, session: Session, now: float, cheap: bool = False) -> str:
        if session.expires <= now:
            return "expired"
        # With a pidfd the loop is told when the root exits; without one, look.
        if cheap and session._pidfd >= 0:
            return ""
        if process_start(session.root_pid) != session.root_start:
            return "root exited"
        return ""

    # -- internals -------------------------------------------------------------------

    def _add(self, session: Session) -> None:
        self._by_id[session.id] = session
        self._by_root[session.root_pid] = session
        self._by_token[session.token_hash] = session

    def _watch(self, session: Session) -> None:
        if self._loop is None or session._pidfd >= 0 or not hasattr(os, "pidfd_open"):
            return
        try:
            fd = os.pidfd_open(session.root_pid)
        except OSError:
            return
        # The pidfd names the process that had this pid when it was opened: check it is the root.
        if process_start(session.root_pid) != session.root_start:
            os.close(fd)
            return
        session._pidfd = fd
        self._loop.add_reader(fd, self._root_exited, session.id)

    def _unwatch(self, session: Session) -> None:
        if session._pidfd < 0:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(session._pidfd)
        with contextlib.suppress(OSError):
            os.close(session._pidfd)
        session._pidfd = -1

    def _root_exited(self, session_id: str) -> None:
        self.end(session_id, "root exited")

    def _save(self) -> None:
        rows = []
        for session in self._by_id.values():
            row = asdict(session)
            row.pop("_pidfd", None)
            row.pop("ended", None)
            rows.append(row)
        atomic_write(self.state_file, json.dumps({"sessions": rows}, indent=1).encode("utf-8"))
