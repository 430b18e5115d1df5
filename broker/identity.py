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
from dataclasses import dataclass
from pathlib import Path

import psutil

from broker.config import Config, Tenant

# Ancestors further up than this are not examined (a loop guard; real trees are shallow).
MAX_ANCESTORS = 64


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int


@dataclass(frozen=True)
class Caller:
    """A caller mapped to a tenant."""

    pid: int
    exe: str
    cwd: Path
    tenant: Tenant
    workspace: Path


class IdentityError(Exception):
    """The caller cannot be mapped; `code` is the DESIGN error code."""

    def __init__(self, code: str, message: str, *, pid: int | None = None, exe: str = "",
                 cwd: Path | None = None, tenant: str | None = None,
                 workspace: Path | None = None) -> None:
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
    if peer.uid != os.getuid():
        raise IdentityError("wrong_tenant", "callers must run as the same OS user as the broker",
                            pid=peer.pid)
    try:
        proc = psutil.Process(peer.pid)
        cwd = Path(proc.cwd())
        try:
            exe = proc.exe()
        except (psutil.AccessDenied, psutil.ZombieProcess, OSError):
            exe = ""
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        raise IdentityError("unmapped_workspace", "the calling process could not be examined",
                            pid=peer.pid) from None
    found = config.workspace_for(cwd)
    if found is None:
        raise IdentityError(
            "unmapped_workspace",
            f"{cwd} belongs to no tenant; map it with `outloop workspace add TENANT {cwd}`",
            pid=peer.pid, exe=exe, cwd=cwd,
        )
    tenant, workspace = found
    other = _ancestor_tenant(proc, tenant.id, config)
    if other is not None:
        raise IdentityError(
            "wrong_tenant",
            f"the calling process tree spans tenants {tenant.id!r} and {other!r}",
            pid=peer.pid, exe=exe, cwd=cwd, tenant=tenant.id, workspace=workspace,
        )
    return Caller(peer.pid, exe, cwd, tenant, workspace)


def _ancestor_tenant(proc: psutil.Process, tenant: str, config: Config) -> str | None:
    """The first other tenant found among the ancestors inside workspaces, if any."""
    current = proc
    for _ in range(MAX_ANCESTORS):
        try:
            parent = current.parent()
            if parent is None or parent.pid <= 1:
                return None
            cwd = Path(parent.cwd())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            return None
        found = config.workspace_for(cwd)
        if found is None:
            return None
        if found[0].id != tenant:
            return found[0].id
        current = parent
    return None
