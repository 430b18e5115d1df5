"""Who is calling: peer credentials from the socket, then session → token → folder.

The tenant is never taken from the request alone. In this order (DESIGN §4, §10):

1. the caller's process tree holds the root of a live session: that session;
2. the request carries a live session token (`Authorization: Bearer`, `x-api-key`
   or `X-Outloop-Session`): that session, unless the caller's own tree or folder
   belongs to another tenant (`wrong_tenant`);
3. the folder rule: the caller's working folder maps to a workspace and so a
   tenant, and the caller's whole ancestor chain is read: any ancestor sitting in
   another tenant's workspace makes the call `wrong_tenant` (a subshell parked in
   `/` no longer hides the shell that started it). With `require_session` this
   step refuses instead (`no_session`).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from broker.config import Config, Tenant

if TYPE_CHECKING:
    from broker.calls.sessions import Session, Sessions

# Ancestors further up than this are not examined (a loop guard; real trees are shallow).
MAX_ANCESTORS = 64
_UID = os.getuid()  # the broker's own user; callers must run as it


@dataclass(frozen=True)
class Peer:
    """The process at the other end of one connection (pid 0: a TCP peer not found)."""

    pid: int
    uid: int
    transport: str = "unix"  # "unix" | "tcp"
    # Every process holding a TCP peer's socket (a fork after connect, an fd passed on),
    # `pid` among them; they must all be of one tenant (see holders_split).
    holders: tuple[int, ...] = field(default=(), compare=False)
    _lineage: list[tuple[tuple[int, int], ...]] = field(default_factory=list, compare=False, repr=False)

    def lineage(self, fresh: bool = False) -> tuple[tuple[int, int], ...]:
        """(pid, start time) of the caller and its ancestors, caller first, read once per connection.

        A process's ancestors can only exit, never be replaced by others, so the
        chain holds for the connection's life; what changes, the folders they are
        in, is read on every call. When one has exited, the chain is read again
        (`fresh`): its orphans now belong to a process further up (a session root,
        which is a subreaper, or init).
        """
        if fresh or not self._lineage:
            self._lineage[:] = [_lineage(self.pid)]
        return self._lineage[0]

    def ancestors(self, fresh: bool = False) -> tuple[int, ...]:
        """The caller's ancestors' pids, parent first."""
        return tuple(pid for pid, _ in self.lineage(fresh)[1:])


@dataclass(frozen=True)
class Caller:
    """A caller mapped to a tenant."""

    pid: int
    exe: str
    cwd: str  # resolved, as the kernel reports it
    tenant: Tenant
    workspace: Path
    session: Session | None = None
    identity: str = "folder"  # "session" | "token" | "folder"


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
        session: str | None = None,
        identity: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.pid = pid
        self.exe = exe
        self.cwd = cwd
        self.tenant = tenant
        self.workspace = workspace
        self.session = session
        self.identity = identity


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


UNKNOWN_UID = -1  # a TCP peer whose socket was not found (it hung up already)


def tcp_peer(local: tuple[str, int], remote: tuple[str, int]) -> Peer:
    """The process owning the other end of a loopback TCP connection the broker accepted.

    `local` is the broker's address of the connection, `remote` the peer's. On Linux
    the peer's socket is the row of /proc/net/tcp (or tcp6) whose local address is
    `remote` and whose remote address is `local`; the row gives its owner's uid and
    inode, and the process is the one with an fd linked to `socket:[inode]`. Only
    processes of the broker's own user are looked at (another user's fds cannot be
    read anyway); a peer of another user is given with its uid, pid 0. A peer that
    cannot be found is pid 0, and then only a session token identifies it.
    """
    if not _USE_PROC:  # pragma: no cover - macOS would use libproc
        return Peer(0, UNKNOWN_UID, "tcp")
    row = _tcp_row(local, remote)
    if row is None:
        return Peer(0, UNKNOWN_UID, "tcp")
    uid, inode = row
    if uid != _UID or inode == 0:
        return Peer(0, uid, "tcp")
    holders = _socket_holders(inode)
    return Peer(_deepest(holders), uid, "tcp", holders=tuple(holders))


def _hex_address(host: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} writes it: the bytes of each 32-bit word in host order."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    words = [packed[i : i + 4] for i in range(0, len(packed), 4)]
    text = "".join(struct.pack("=I", struct.unpack(">I", w)[0]).hex().upper() for w in words)
    return f"{text}:{port:04X}"


def _tcp_row(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int] | None:
    """(uid, inode) of the peer's socket in /proc/net/tcp or tcp6, or None."""
    host = remote[0]
    candidates = []
    if ":" in host:
        candidates.append(("tcp6", _hex_address(remote[0], remote[1]), _hex_address(local[0], local[1])))
        if host.startswith("::ffff:"):  # an IPv4 peer on a dual-stack listener
            v4 = host[len("::ffff:") :]
            candidates.append(("tcp", _hex_address(v4, remote[1]), _hex_address(local[0][7:], local[1])))
    else:
        candidates.append(("tcp", _hex_address(remote[0], remote[1]), _hex_address(local[0], local[1])))
    for table, mine, theirs in candidates:
        try:
            with open(f"{_PROC}/net/{table}", "rb") as f:
                lines = f.read().decode("ascii", "replace").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 10 and fields[1] == mine and fields[2] == theirs:
                return int(fields[7]), int(fields[9])
    return None


def _deepest(holders: list[int]) -> int:
    """Of several holders, the deepest: one whose ancestors hold it too is judged with them."""
    if not holders:
        return 0
    if len(holders) == 1:
        return holders[0]
    return max(holders, key=lambda pid: len(_lineage(pid)))


def _socket_holders(inode: int) -> list[int]:
    """Every process of this user holding `socket:[inode]` open.

    Reads every fd link of every process of this user: a few milliseconds, once per
    TCP connection.
    """
    target = f"socket:[{inode}]"
    holders: list[int] = []
    me = os.getpid()
    for name in os.listdir(_PROC):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me:
            continue
        folder = f"{_PROC}/{name}/fd"
        try:
            fds = os.listdir(folder)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{folder}/{fd}") == target:
                    holders.append(pid)
                    break
            except OSError:
                continue
    return holders


def holders_split(peer: Peer, config: Config, sessions: Sessions | None = None, token: str | None = None) -> str | None:
    """Why a TCP connection held by several processes must be refused (they are not all of
    one tenant: a socket passed from one client's agent to another's), or None."""
    if len(peer.holders) < 2:
        return None
    tenants: dict[str | None, list[int]] = {}
    for pid in peer.holders:
        try:
            tenant: str | None = identify(Peer(pid, peer.uid, "tcp"), config, sessions, token).tenant.id
        except IdentityError:
            tenant = None
        tenants.setdefault(tenant, []).append(pid)
    if len(tenants) < 2:
        return None
    held = "; ".join(f"{t or 'no tenant'}: {', '.join(map(str, pids))}" for t, pids in sorted(tenants.items(), key=str))
    return f"this TCP connection is held by processes of different tenants ({held})"


NO_SESSION = (
    "this broker serves only calls made inside an Outloop session (broker.require_session); "
    "the operator starts the agent with `outloop run -- <command>`"
)


def identify(peer: Peer, config: Config, sessions: Sessions | None = None, token: str | None = None) -> Caller:
    """Map a peer to its session or tenant and workspace, or raise IdentityError with the code."""
    if peer.uid != _UID and peer.uid != UNKNOWN_UID:
        raise IdentityError("wrong_tenant", "callers must run as the same OS user as the broker", pid=peer.pid)
    if peer.pid > 0 and (uids := _foreign_uids(peer.pid)) is not None:
        # The socket's credentials are only half the story: SO_PEERCRED gives the effective
        # uid at connect time, SCM_CREDENTIALS the real uid of each writer, /proc/net/tcp the
        # uid that made the socket. A setuid program (or one that changed its uids since)
        # is another user's process, even inside the operator's session tree.
        raise IdentityError(
            "wrong_tenant",
            f"callers must run as the same OS user as the broker; process {peer.pid} runs with "
            f"real, effective and saved uids {uids} (a setuid program?)",
            pid=peer.pid,
        )
    session: Session | None = None
    how = "folder"
    if sessions is not None and len(sessions) and peer.pid > 0:
        session = sessions.in_tree(peer.lineage())
        if session is not None:
            how = "session"
    if token is not None:
        found = sessions.by_token(token) if sessions is not None else None
        if found is None:
            raise IdentityError(
                "no_session",
                "the session token is not known to this broker; the operator starts a new session with `outloop run`",
                pid=peer.pid,
                identity="token",
            )
        if found.ended:
            raise IdentityError(
                "no_session",
                f"session {found.id} has ended ({found.ended}); the operator starts a new one with `outloop run`",
                pid=peer.pid,
                tenant=found.tenant,
                session=found.id,
                identity="token",
            )
        if session is not None and session.tenant != found.tenant:
            raise IdentityError(
                "wrong_tenant",
                f"a session token of tenant {found.tenant!r} was used from a process of tenant "
                f"{session.tenant!r}'s session {session.id}",
                pid=peer.pid,
                tenant=session.tenant,
                session=session.id,
                identity="session",
            )
        if session is None:
            if peer.pid > 0:
                other = _tree_tenant(peer, found.tenant, config)
                if other is not None:
                    raise IdentityError(
                        "wrong_tenant",
                        f"a session token of tenant {found.tenant!r} was used from a process of tenant {other!r}",
                        pid=peer.pid,
                        tenant=found.tenant,
                        session=found.id,
                        identity="token",
                    )
            session, how = found, "token"
    if session is not None:
        return _session_caller(peer, config, session, how)
    if sessions is not None and peer.pid > 0 and (ended := sessions.left_over(peer.lineage())) is not None:
        raise IdentityError(
            "no_session",
            f"this process was started in agent session {ended}, which has ended; it acts for no tenant now",
            pid=peer.pid,
            session=ended,
            identity="session",
        )
    if config.broker.require_session or peer.pid <= 0:
        message = (
            NO_SESSION
            if peer.pid > 0
            else (
                "the calling process could not be found from its connection, and it gave no session token; "
                "the operator starts agents with `outloop run`, which gives them one"
            )
        )
        raise IdentityError(
            "no_session", message, pid=peer.pid or None, exe=_exe(peer.pid) if peer.pid else "", identity="folder"
        )
    return identify_folder(peer, config)


def _session_caller(peer: Peer, config: Config, session: Session, how: str) -> Caller:
    tenant = config.tenants.get(session.tenant)
    exe = _exe(peer.pid) if peer.pid > 0 else ""
    if tenant is None:
        raise IdentityError(
            "unmapped_workspace",
            f"session {session.id}'s tenant {session.tenant!r} is no longer in the config",
            pid=peer.pid,
            exe=exe,
            tenant=session.tenant,
            session=session.id,
            identity=how,
        )
    cwd = ""
    if peer.pid > 0:
        try:
            cwd = _cwd(peer.pid)
        except (psutil.Error, OSError):
            cwd = ""
    return Caller(peer.pid, exe, cwd, tenant, Path(session.workspace), session, how)


def _tree_tenant(peer: Peer, tenant: str, config: Config) -> str | None:
    """A tenant other than `tenant` that the caller's folder, or an ancestor's, maps to, if any."""
    try:
        found = config.workspace_for(_cwd(peer.pid))
    except (psutil.Error, OSError):
        found = None
    if found is not None and found[0].id != tenant:
        return found[0].id
    other = _ancestor_tenant(peer.ancestors(), tenant, config)
    if other is _GONE:
        other = _ancestor_tenant(peer.ancestors(fresh=True), tenant, config, skip_gone=True)
    return other


def identify_folder(peer: Peer, config: Config) -> Caller:
    """The folder rule alone: the caller's folder decides, and no ancestor may be another tenant's."""
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
            f"{cwd} belongs to no tenant, so calls from here are refused until the operator maps it to one",
            pid=peer.pid,
            exe=exe,
            cwd=Path(cwd),
            identity="folder",
        )
    tenant, workspace = found
    other = _ancestor_tenant(peer.ancestors(), tenant.id, config)
    if other is _GONE:
        other = _ancestor_tenant(peer.ancestors(fresh=True), tenant.id, config, skip_gone=True)
    if other is not None:
        raise IdentityError(
            "wrong_tenant",
            f"the calling process tree spans tenants {tenant.id!r} and {other!r}",
            pid=peer.pid,
            exe=exe,
            cwd=Path(cwd),
            tenant=tenant.id,
            workspace=workspace,
            identity="folder",
        )
    return Caller(peer.pid, exe, cwd, tenant, workspace)


_GONE = "\0gone"  # an ancestor in the chain has exited


def _ancestor_tenant(
    ancestors: tuple[int, ...], tenant: str | None, config: Config, skip_gone: bool = False
) -> str | None:
    """The first other tenant found among all the ancestors' folders, if any (_GONE if an
    ancestor has exited, so the chain must be read again; with `skip_gone`, it is passed over).

    The whole chain is read: an ancestor outside every workspace (a subshell that
    did `cd /`) does not end the walk.
    """
    for parent in ancestors:
        try:
            cwd = _cwd(parent)
        except (psutil.Error, OSError):
            if skip_gone:
                continue
            return _GONE
        found = config.workspace_for(cwd)
        if found is not None and found[0].id != tenant:
            return found[0].id
    return None


def _lineage(pid: int) -> tuple[tuple[int, int], ...]:
    """(pid, start) of `pid`, its parent, grandparent, ... up to (not including) init."""
    chain: list[tuple[int, int]] = []
    try:
        current, started = pid, _started(pid)
        chain.append((current, int(started)))
        for _ in range(MAX_ANCESTORS):
            parent = _parent(current, started)
            if parent is None or parent[0] <= 1:
                break
            chain.append((parent[0], int(parent[1])))
            current, started = parent
    except (psutil.Error, OSError):
        pass
    return tuple(chain)


def descendants(roots: Iterable[int]) -> dict[int, list[tuple[int, int]]]:
    """(pid, start time) of every process below each root now, from one pass over the process table."""
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        children.setdefault(proc.info["ppid"] or 0, []).append(proc.pid)
    found: dict[int, list[tuple[int, int]]] = {}
    for root in roots:
        below, todo = [], list(children.get(root, ()))
        while todo:
            pid = todo.pop()
            start = process_start(pid)
            if start is not None:
                below.append((pid, start))
            todo.extend(children.get(pid, ()))
        found[root] = below
    return found


def process_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot on Linux), or None if it is gone.

    Two processes that had the same pid never have the same start time, so
    (pid, start) names one process for good.
    """
    if pid <= 0:
        return None
    try:
        if not _USE_PROC:  # pragma: no cover - non-Linux: microseconds since the epoch
            return int(psutil.Process(pid).create_time() * 1_000_000)
        return _stat(pid)[1]
    except (psutil.Error, OSError, ValueError, IndexError):
        return None


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


def _proc_head(pid: int, name: str) -> bytes:
    """The first 4 KiB of /proc/<pid>/<name>: all of `stat`, and the part of `status` that
    holds the uids. (os.open and one read: half the time of open() and its buffered file.)"""
    fd = os.open(f"{_PROC}/{pid}/{name}", os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _stat(pid: int) -> tuple[int, int]:
    """(parent pid, start time in clock ticks) from /proc/<pid>/stat."""
    data = _proc_head(pid, "stat")
    # The command name, in parentheses, may hold spaces and parentheses itself.
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _foreign_uids(pid: int) -> str | None:
    """The real, effective and saved uids of `pid` ("0/65534/65534") when any is not the
    broker's own, else None (also when the process is gone, or not on Linux: the socket's
    credentials then stand alone)."""
    if not _USE_PROC:  # pragma: no cover - non-Linux
        return None
    try:
        data = _proc_head(pid, "status")
    except OSError:
        return None
    start = data.find(b"\nUid:")
    if start < 0:
        return None
    fields = data[start + 5 : data.find(b"\n", start + 5)].split()
    uids = [int(u) for u in fields[:3]]
    if all(u == _UID for u in uids):
        return None
    return "/".join(map(str, uids))


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


def command_line(pid: int, limit: int = 400) -> str:
    """The process's command line as one string, cut to `limit` (shown to the operator on an ask).

    Read only when a call waits for approval: arguments can be long, and they are the
    operator's to read, not the audit's.
    """
    try:
        parts = psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return ""
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"
