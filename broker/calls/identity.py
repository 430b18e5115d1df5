"""Who is calling: peer credentials from the socket, then folder → workspace → tenant.

The tenant is never taken from the request. The caller's working folder decides
it, and the caller's ancestors are walked (up to the first one outside every
workspace) so that a process started in one client's folder cannot borrow another
client's tenant by `cd`-ing there.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from broker.config import Config, Tenant

# Ancestors further up than this are not examined (a loop guard; real trees are shallow).
MAX_ANCESTORS = 64
_UID = os.getuid()  # the broker's own user; callers must run as it


@dataclass(frozen=True)
class Peer:
    """The process at the other end of one socket connection."""

    pid: int
    uid: int
    _lineage: list[tuple[int, ...]] = field(default_factory=list, compare=False, repr=False)

    def ancestors(self, fresh: bool = False) -> tuple[int, ...]:
        """The caller's ancestors, parent first, read on the first call of a connection.

        A process's ancestors can only exit, never be replaced by others, so the
        chain holds for the connection's life; what changes, the folders they are
        in, is read on every call. When one has exited, the chain is read again
        (`fresh`): its orphans now belong to a process further up.
        """
        if fresh or not self._lineage:
            self._lineage[:] = [_ancestors(self.pid)]
        return self._lineage[0]


@dataclass(frozen=True)
class Caller:
    """A caller mapped to a tenant."""

    pid: int
    exe: str
    cwd: str  # resolved, as the kernel reports it
    tenant: Tenant
    workspace: Path


class IdentityError(Exception):
    """The caller cannot be mapped; `code` is the DESIGN error code."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        pid: int | None = None,
        exe: str = "",
        cwd: Path | None = None,
        tenant: str | None = None,
        workspace: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.pid = pid
        self.exe = exe
        self.cwd = cwd
        self.tenant = tenant
        self.workspace = workspace


def peer_of(sock: socket.socket) -> Peer:
    """The pid and uid of the process at the other end of a Unix socket."""
    if sys.platform.startswith("linux"):
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", data)
        return Peer(pid, uid)
    if sys.platform == "darwin":  # pragma: no cover - exercised on macOS only
        sol_local, local_peercred, local_peerpid = 0, 0x001, 0x002
        pid = struct.unpack("i", sock.getsockopt(sol_local, local_peerpid, 4))[0]
        # struct xucred: u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]
        xucred = sock.getsockopt(sol_local, local_peercred, 76)
        uid = struct.unpack_from("I", xucred, 4)[0]
        return Peer(pid, uid)
    raise OSError(f"peer credentials are not supported on {sys.platform}")


def identify(peer: Peer, config: Config) -> Caller:
    """Map a peer to its tenant and workspace, or raise IdentityError with the DESIGN code."""
    if peer.uid != _UID:
        raise IdentityError("wrong_tenant", "callers must run as the same OS user as the broker", pid=peer.pid)
    try:
        cwd = _cwd(peer.pid)
    except (psutil.Error, OSError):
        raise IdentityError("unmapped_workspace", "the calling process could not be examined", pid=peer.pid) from None
    exe = _exe(peer.pid)  # every call: a socket can outlive an exec
    found = config.workspace_for(cwd)
    if found is None:
        raise IdentityError(
            "unmapped_workspace",
            f"{cwd} belongs to no tenant; map it with `outloop workspace add TENANT {cwd}`",
            pid=peer.pid,
            exe=exe,
            cwd=Path(cwd),
        )
    tenant, workspace = found
    other = _ancestor_tenant(peer.ancestors(), tenant.id, config)
    if other is _GONE:
        other = _ancestor_tenant(peer.ancestors(fresh=True), tenant.id, config)
        if other is _GONE:  # another exited just now: the walk stops there, as it always did
            other = None
    if other is not None:
        raise IdentityError(
            "wrong_tenant",
            f"the calling process tree spans tenants {tenant.id!r} and {other!r}",
            pid=peer.pid,
            exe=exe,
            cwd=Path(cwd),
            tenant=tenant.id,
            workspace=workspace,
        )
    return Caller(peer.pid, exe, cwd, tenant, workspace)


_GONE = "\0gone"  # an ancestor in the chain has exited


def _ancestor_tenant(ancestors: tuple[int, ...], tenant: str, config: Config) -> str | None:
    """The first other tenant found among the ancestors inside workspaces, if any
    (_GONE if an ancestor has exited, so the chain must be read again)."""
    for parent in ancestors:
        try:
            cwd = _cwd(parent)
        except (psutil.Error, OSError):
            return _GONE
        found = config.workspace_for(cwd)
        if found is None:
            return None
        if found[0].id != tenant:
            return found[0].id
    return None


def _ancestors(pid: int) -> tuple[int, ...]:
    """Parent, grandparent, ... up to (not including) init, at most MAX_ANCESTORS."""
    chain: list[int] = []
    try:
        current, started = pid, _started(pid)
        for _ in range(MAX_ANCESTORS):
            parent = _parent(current, started)
            if parent is None or parent[0] <= 1:
                break
            chain.append(parent[0])
            current, started = parent
    except (psutil.Error, OSError):
        pass
    return tuple(chain)


# Reading a process. psutil does this everywhere; on Linux the broker reads
# /proc itself, because psutil.Process() reads and parses /proc/<pid>/stat to
# identify the process before every query, and that was a tenth of the broker's
# CPU per call. The answers are the same: readlink of cwd and exe (as psutil
# does on Linux), and the parent only if it started no later than the child
# (psutil's guard against a recycled pid).

_PROC = "/proc"
_USE_PROC = sys.platform.startswith("linux") and os.path.isdir(f"{_PROC}/self")


def _readlink(pid: int, name: str) -> str:
    path = os.readlink(f"{_PROC}/{pid}/{name}").split("\x00")[0]
    if path.endswith(" (deleted)") and not os.path.exists(path):
        path = path[: -len(" (deleted)")]
    return path


def _stat(pid: int) -> tuple[int, int]:
    """(parent pid, start time in clock ticks) from /proc/<pid>/stat."""
    with open(f"{_PROC}/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name, in parentheses, may hold spaces and parentheses itself.
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _cwd(pid: int) -> str:
    if _USE_PROC:
        return _readlink(pid, "cwd")
    return psutil.Process(pid).cwd()  # pragma: no cover - non-Linux


def _exe(pid: int) -> str:
    try:
        if _USE_PROC:
            return _readlink(pid, "exe")
        return psutil.Process(pid).exe()  # pragma: no cover - non-Linux
    except (psutil.Error, OSError):
        return ""


def _started(pid: int) -> float:
    if not _USE_PROC:  # pragma: no cover - non-Linux
        return psutil.Process(pid).create_time()
    return _stat(pid)[1]


def _parent(pid: int, started: float) -> tuple[int, float] | None:
    """(pid, start time) of the parent of `pid` (which started at `started`), or None
    when it is gone (or its pid was reused since)."""
    if not _USE_PROC:  # pragma: no cover - non-Linux
        parent = psutil.Process(pid).parent()
        return None if parent is None else (parent.pid, parent.create_time())
    ppid = _stat(pid)[0]
    if ppid <= 0:
        return None
    try:
        _, parent_started = _stat(ppid)
    except OSError:
        return None
    return (ppid, parent_started) if parent_started <= started else None
