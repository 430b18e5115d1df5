"""`outloop run --sandbox`: what an agent's sandbox shows and hides, as bwrap arguments or a Seatbelt profile.

The intent, on every OS: the session's workspace read-write, the rest of the
filesystem (the home included) read-only, the broker socket reachable, the network
on; and invisible: the keyring's files and the D-Bus session bus that serves it,
Outloop's config and state folders (the operator channel, state/operator.sock,
lives there), every other tenant's workspaces, and whatever `[sandbox] hide` adds.
`/tmp` and the user's runtime folder are private and empty, so the sockets other
programs keep there (the bus, ssh-agent, gpg-agent) are out of reach too.

Linux runs the command under bubblewrap, with its own pid namespace (the agent
sees no other process, so it can neither ptrace the broker nor read its /proc),
every capability dropped, and a seccomp filter refusing TIOCSTI (typing into the
terminal the sandbox was started from). The broker still sees host pids
(SO_PEERCRED is translated into the receiver's namespace), and the bwrap
processes are descendants of `outloop run`, so the session's process tree holds.

The plan is plain data and the argument builders are pure functions; `probe` and
`classify` are the only parts here that touch the system.
"""

from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Environment variables that point at the keyring or its bus: unset inside the sandbox.
CLEARED_ENV = ("DBUS_SESSION_BUS_ADDRESS", "GNOME_KEYRING_CONTROL", "GNOME_KEYRING_PID", "KDE_FULL_SESSION")


class SandboxError(Exception):
    """The sandbox cannot be set up as asked; the message says why and what the operator can do."""


@dataclass(frozen=True)
class Plan:
    """What one sandbox shows and hides. Every path is absolute and resolved."""

    workspace: Path  # read-write
    cwd: Path  # where the command starts (inside the workspace)
    socket: Path  # the broker socket, reachable inside
    hide_dirs: tuple[Path, ...] = ()  # invisible: an empty folder in their place
    hide_files: tuple[Path, ...] = ()  # invisible: an empty file in their place
    read_write: tuple[Path, ...] = ()  # extra folders the agent may write ([sandbox] read_write)
    private: tuple[Path, ...] = ()  # an empty private folder in their place (/tmp, the runtime folder)
    # What the command needs to run at all (Outloop's own Python, the command's folder): shown
    # read-only where a private folder would cover it (a venv or a checkout under /tmp).
    keep: tuple[Path, ...] = ()

    @property
    def socket_mount(self) -> Path:
        """What is bound in for the socket: its folder when the folder holds nothing else of ours, else the file.

        Binding the folder keeps a restarted broker (a new socket inode) reachable.
        """
        folder = self.socket.parent
        shared = {Path("/"), Path("/tmp"), Path.home(), *self.private}  # noqa: S108 - a path compared, not used
        if folder in shared or any(_within(p, folder) for p in (*self.hide_dirs, *self.hide_files, self.workspace)):
            return self.socket
        return folder


def _within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or below it."""
    return path == folder or folder in path.parents


def keyring_paths(environ: Mapping[str, str], home: Path) -> list[Path]:
    """The folders where the desktop keyrings keep their files (Secret Service, KWallet, keyrings.alt)."""
    data = Path(environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    found = [data / "keyrings", home / ".local/share/keyrings", data / "kwalletd", home / ".local/share/kwalletd"]
    found += [data / "python_keyring", home / ".local/share/python_keyring", home / ".kde/share/apps/kwallet"]
    return list(dict.fromkeys(found))


def bus_paths(address: str | None) -> list[Path]:
    """The socket files of a D-Bus address; SandboxError for a bus no mount can hide (abstract, TCP).

    The network stays on inside the sandbox, and abstract Unix sockets and TCP
    belong to the network namespace: the keyring would stay reachable.
    """
    paths: list[Path] = []
    for entry in (address or "").split(";"):
        transport, _, rest = entry.partition(":")
        keys = dict(kv.partition("=")[::2] for kv in rest.split(",") if "=" in kv)
        if transport == "unix" and "path" in keys:
            paths.append(Path(keys["path"]))
        elif transport == "unix" and "abstract" in keys or transport in ("tcp", "nonce-tcp"):
            raise SandboxError(
                f"the D-Bus session bus listens on {transport}:{'abstract' if transport == 'unix' else 'host'}=…, "
                "which a sandbox with the network on cannot hide, so the keyring would stay reachable; "
                "the operator can run the session bus on a socket file (systemd's user bus does)"
            )
    return paths


def runtime_dirs(environ: Mapping[str, str]) -> list[Path]:
    """The user's runtime folders: $XDG_RUNTIME_DIR and /run/user/<uid>."""
    found = [Path(environ["XDG_RUNTIME_DIR"])] if environ.get("XDG_RUNTIME_DIR") else []
    if hasattr(os, "getuid"):
        found.append(Path(f"/run/user/{os.getuid()}"))
    return found


def classify(
    *,
    workspace: Path,
    cwd: Path,
    socket: Path,
    hide: Iterable[Path],
    read_write: Iterable[Path] = (),
    private: Iterable[Path] = (),
    keep: Iterable[Path] = (),
) -> Plan:
    """A Plan from paths as configured: resolved, sorted into folders and files, the missing ones left out.

    Raises SandboxError when the workspace cannot be shown as asked: it is the
    root folder, or it lies inside a folder that must stay hidden.
    """
    ws = workspace.resolve()
    if ws == Path("/"):
        raise SandboxError("the workspace is the root folder, which a sandbox cannot make read-write alone")
    if not ws.is_dir():
        raise SandboxError(f"the workspace {ws} is not a folder the sandbox can bind")
    dirs: list[Path] = []
    files: list[Path] = []
    for raw in hide:
        p = raw.expanduser().resolve()
        if not p.exists():
            continue  # nothing to hide
        if _within(ws, p):
            raise SandboxError(
                f"the workspace {ws} lies inside {p}, which the sandbox hides; the operator can map a folder "
                "outside it or drop it from [sandbox] hide"
            )
        (dirs if p.is_dir() else files).append(p)
    own = [p.resolve() for p in private if p.is_dir()]
    rw = [p.expanduser().resolve() for p in read_write]
    missing = [p for p in rw if not p.is_dir()]
    if missing:
        raise SandboxError(f"[sandbox] read_write names {missing[0]}, which is not a folder; create it or remove it")
    return Plan(
        workspace=ws,
        cwd=cwd.resolve(),
        socket=socket.resolve() if socket.parent.exists() else socket,
        hide_dirs=tuple(dict.fromkeys(dirs)),
        hide_files=tuple(dict.fromkeys(files)),
        read_write=tuple(dict.fromkeys(rw)),
        private=tuple(dict.fromkeys(own)),
        keep=tuple(dict.fromkeys(p.resolve() for p in keep if p.is_dir())),
    )


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """`paths` without those that lie inside another of them."""
    unique = list(dict.fromkeys(paths))
    return [p for p in unique if not any(q != p and _within(p, q) for q in unique)]


def bwrap_args(
    plan: Plan, *, seccomp_fd: int | None = None, status_fd: int | None = None, new_session: bool = False
) -> list[str]:
    """bubblewrap's options for `plan` (the command follows them after `--`).

    Order matters: bwrap applies mounts in order, so the workspace and the extra
    read-write folders are bound before the hidden paths are covered (a hidden path
    inside the workspace stays hidden), and the socket is bound last (it may sit in
    a hidden folder).
    """
    args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for p in _outermost(plan.private):
        args += ["--tmpfs", str(p)]
    for p in _outermost(plan.keep):
        if any(_within(p, q) for q in plan.private):
            args += ["--ro-bind", str(p), str(p)]
    args += ["--bind", str(plan.workspace), str(plan.workspace)]
    for p in plan.read_write:
        args += ["--bind", str(p), str(p)]
    shown = (plan.workspace, *plan.read_write)
    hidden_dirs = _outermost(plan.hide_dirs)
    for p in hidden_dirs:
        # Under a private folder and not inside anything bound, it is gone already.
        if any(_within(p, q) for q in plan.private) and not any(_within(p, q) for q in shown):
            continue
        args += ["--tmpfs", str(p)]
    for p in plan.hide_files:
        if any(_within(p, q) for q in hidden_dirs):
            continue
        if any(_within(p, q) for q in plan.private) and not any(_within(p, q) for q in shown):
            continue
        args += ["--ro-bind", "/dev/null", str(p)]
    mount = plan.socket_mount
    args += ["--bind", str(mount), str(mount)]
    args += ["--chdir", str(plan.cwd)]
    args += ["--unshare-pid", "--unshare-ipc", "--die-with-parent", "--cap-drop", "ALL"]
    if new_session:  # no TIOCSTI filter on this architecture: leave the terminal's session instead
        args += ["--new-session"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    if status_fd is not None:
        args += ["--json-status-fd", str(status_fd)]
    return args


def sandbox_environ(env: Mapping[str, str], plan: Plan) -> dict[str, str]:
    """The command's environment inside: no pointer to the keyring's bus, the socket by its bound path."""
    inside = {k: v for k, v in env.items() if k not in CLEARED_ENV}
    inside["OUTLOOP_SOCKET"] = str(plan.socket)
    inside["OUTLOOP_SANDBOX"] = "1"
    return inside


# -- seccomp: refuse TIOCSTI and TIOCLINUX (typing into the terminal outside) ---------

# seccomp_data: nr (u32) at 0, arch (u32) at 4, args[6] (u64 each) from 16; args[1] low word at 24.
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | 1
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
_X32_BIT = 0x40000000
# machine -> (AUDIT_ARCH, ioctl's number, the 32-bit compat arch and its ioctl number)
_ARCHES = {
    "x86_64": (0xC000003E, 16, 0x40000003, 54),
    "aarch64": (0xC00000B7, 29, 0x40000028, 54),
}


def tiocsti_filter(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp program (for `bwrap --seccomp`) failing ioctl(TIOCSTI/TIOCLINUX) with EPERM.

    None on an architecture this does not know (the sandbox then starts a new
    terminal session instead: `--new-session`).
    """
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    native, native_ioctl, compat, compat_ioctl = arch

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    prog = [
        op(_BPF_LD_W_ABS, 4),  # 0: arch
        op(_BPF_JEQ_K, native, 0, 4),  # 1: native -> 2, else -> 6
        op(_BPF_LD_W_ABS, 0),  # 2: nr
        op(_BPF_JGE_K, _X32_BIT, 9, 0),  # 3: an x32 syscall (x86_64) -> 13 (refused)
        op(_BPF_JEQ_K, native_ioctl, 4, 0),  # 4: ioctl -> 9
        op(_BPF_RET_K, _RET_ALLOW),  # 5
        op(_BPF_JEQ_K, compat, 0, 5),  # 6: 32-bit compat -> 7, else -> 12
        op(_BPF_LD_W_ABS, 0),  # 7: nr
        op(_BPF_JEQ_K, compat_ioctl, 0, 3),  # 8: ioctl -> 9, else -> 12
        op(_BPF_LD_W_ABS, 24),  # 9: the request's low 32 bits (what the kernel compares)
        op(_BPF_JEQ_K, _TIOCSTI, 2, 0),  # 10: -> 13
        op(_BPF_JEQ_K, _TIOCLINUX, 1, 0),  # 11: -> 13
        op(_BPF_RET_K, _RET_ALLOW),  # 12
        op(_BPF_RET_K, _RET_EPERM),  # 13
    ]
    return b"".join(prog)


# -- the system's side ---------------------------------------------------------------


def find_bwrap(path: str | None = None) -> str:
    """bwrap's path on PATH; SandboxError when it is not installed."""
    found = shutil.which("bwrap", path=path)
    if found is None:
        raise SandboxError(
            "--sandbox needs bubblewrap (bwrap), which is not installed; nothing was run "
            "(Debian/Ubuntu: apt install bubblewrap; Fedora: dnf install bubblewrap)"
        )
    return found


def probe(path: str | None = None) -> tuple[bool, str]:
    """Whether bwrap can start a sandbox here (`bwrap --ro-bind / / true`), and why not."""
    if os.uname().sysname == "Darwin":
        if shutil.which("sandbox-exec", path=path):
            return True, "sandbox-exec is present (Outloop's Seatbelt profile is untested: docs/claude.md)"
        return False, "--sandbox needs sandbox-exec, which is not on PATH"
    if os.uname().sysname != "Linux":
        return False, "--sandbox needs Linux with bubblewrap, or macOS"
    try:
        bwrap = find_bwrap(path)
    except SandboxError as e:
        return False, str(e)
    try:
        ran = subprocess.run(  # noqa: S603 - a fixed argv
            [bwrap, "--ro-bind", "/", "/", "--unshare-pid", "--proc", "/proc", "--dev", "/dev", "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{bwrap} could not be started: {e}"
    if ran.returncode != 0:
        why = ran.stderr.strip().splitlines()[-1] if ran.stderr.strip() else f"exit status {ran.returncode}"
        return False, f"{bwrap} cannot create a sandbox here: {why}" + _userns_hint(why)
    return True, f"{bwrap} creates sandboxes here (pid, mount and IPC namespaces)"


def _userns_hint(why: str) -> str:
    if "namespace" in why.lower() or "permission" in why.lower():
        return (
            " (unprivileged user namespaces may be off: see sysctl kernel.unprivileged_userns_clone "
            "or, on Ubuntu, kernel.apparmor_restrict_unprivileged_userns)"
        )
    return ""


# -- macOS: a Seatbelt profile with the same intent (untested here) -------------------


def _sb_quote(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def seatbelt_profile(plan: Plan) -> str:
    """A `sandbox-exec -p` profile: everything readable, only the workspace (and extras) writable.

    The keyring (the Keychain files and the securityd services), Outloop's config and
    state and the other tenants' workspaces are denied; the broker socket is the
    only Unix socket the agent may connect to; the network is on. Untested: written
    from Apple's profile language as Chromium and Claude Code use it, never run here.
    """
    lines = [
        "(version 1)",
        "(allow default)",
        ";; Writes only in the workspace, the extra folders, and the temporary folders.",
        "(deny file-write*)",
        "(allow file-write*",
        f"  (subpath {_sb_quote(plan.workspace)})",
        *(f"  (subpath {_sb_quote(p)})" for p in plan.read_write),
        *(f"  (subpath {_sb_quote(p)})" for p in plan.private),
        '  (literal "/dev/null") (literal "/dev/tty") (regex #"^/dev/ttys[0-9]+$"))',
        ";; Hidden: the keyring, Outloop's config and state, the other tenants' folders.",
        "(deny file-read* file-write*",
        *(f"  (subpath {_sb_quote(p)})" for p in plan.hide_dirs),
        *(f"  (literal {_sb_quote(p)})" for p in plan.hide_files),
        ")",
        ";; The Keychain's daemons (reading a key asks them, not a file).",
        '(deny mach-lookup (global-name "com.apple.securityd") (global-name "com.apple.SecurityServer")',
        '  (global-name "com.apple.security.keychaind") (global-name "com.apple.secd"))',
        ";; Unix sockets: the broker's only. TCP stays on (agents need their model's API).",
        "(deny network-outbound (remote unix-socket))",
        f"(allow network-outbound (remote unix-socket (path-literal {_sb_quote(plan.socket)})))",
    ]
    return "\n".join(lines) + "\n"


def macos_hidden(home: Path) -> list[Path]:
    """Where macOS keeps keychains (hidden from the sandboxed agent)."""
    return [home / "Library/Keychains", Path("/Library/Keychains")]
