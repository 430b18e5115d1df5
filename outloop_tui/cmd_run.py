"""`outloop run` and `outloop session list|revoke`: agents started inside a session.

`outloop run` asks the broker for a session rooted at this very process, makes
itself a child subreaper (so double-forked and `nohup`'d descendants stay in its
tree), starts the command with the session's environment, forwards signals and
exits with the command's status. Standard library only: it starts on every
agent launch.

`outloop run --sandbox` starts the command under bubblewrap (broker/sandbox.py
says what it shows and hides), as a descendant of this process, so the session's
process tree still holds; it never falls back to running unsandboxed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from broker.client import BrokerUnreachable, Response, request
from broker.paths import Paths
from outloop_tui.cli import UserError

EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_NO_SANDBOX, EXIT_NOT_FOUND = 2, 3, 4, 127
PR_SET_CHILD_SUBREAPER = 36
# Signals passed on to the command. SIGINT and SIGQUIT from the terminal reach the
# command by themselves (it shares our process group), so those are passed on only
# when they did not come from the terminal.
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
FROM_TERMINAL = (signal.SIGINT, signal.SIGQUIT)


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _socket() -> Any:
    paths = Paths.from_env()
    paths.check_socket_path()
    return paths.socket


def _refused(resp: Response, what: str) -> int:
    try:
        error = resp.json()["error"]
        print(f"outloop: {what} refused ({error['code']}): {error['message']}", file=sys.stderr)
    except (ValueError, KeyError, TypeError):
        print(f"outloop: the broker answered HTTP {resp.status}", file=sys.stderr)
    return EXIT_REFUSED


def session_environ(info: dict[str, Any], base: dict[str, str]) -> dict[str, str]:
    """The command's environment: `base` without any provider key, plus the session's variables.

    Every key variable the broker names (`clear_env`) or the catalog knows
    (broker/providers.py KEY_VARIABLES, ANTHROPIC_AUTH_TOKEN among them) is removed,
    unless it holds an `outloop:` placeholder, which is no key (`_placeholders` then
    gives it the session token where the broker can serve it); the session's own
    variables, the token in the key variables of the tenant's providers, come on top.
    """
    from broker.placeholders import PLACEHOLDER_PREFIX
    from broker.providers import KEY_VARIABLES

    clear = KEY_VARIABLES | set(info.get("clear_env", ()))
    env = {k: v for k, v in base.items() if k not in clear or v.strip().startswith(PLACEHOLDER_PREFIX)}
    env.update(info.get("env") or {})
    env["OUTLOOP_SESSION"] = info["token"]
    env["OUTLOOP_SOCKET"] = info["socket"]
    return env


def run_session(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UserError("name the command to run: outloop run [--tenant T] [--label L] [--ttl S] -- CMD [ARGS...]", 2)
    if args.ttl is not None and args.ttl <= 0:
        raise UserError("--ttl takes a positive number of seconds", 2)
    if getattr(args, "sandbox", False):
        _check_sandbox(command)  # before the session opens: nothing starts when no sandbox can
    become_subreaper()  # before the session opens: no descendant can be born outside it
    payload = {"tenant": args.tenant, "label": args.label or os.path.basename(command[0]), "ttl": args.ttl}
    try:
        resp = request(_socket(), "POST", "/v1/sessions", body=json.dumps(payload).encode("utf-8"), timeout=30)
    except BrokerUnreachable as e:
        print(f"outloop: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if resp.status != 201:
        return _refused(resp, "the session was")
    info = resp.json()
    if info.get("listen") is None and not os.environ.get("OUTLOOP_QUIET"):
        print(
            f"outloop: session {info['id']} for {info['tenant']}; no [broker] listen address is configured, "
            'so SDK base-URL variables are not set (add listen = "127.0.0.1:7878" under [broker] in '
            "config.toml and restart the broker); `outloop call` and the MCP server work as they are",
            file=sys.stderr,
        )
    env = session_environ(info, dict(os.environ))
    env.update(_placeholders(info, env))
    if getattr(args, "sandbox", False):
        return _run_sandboxed(command, env, info)
    return _supervise(command, env)


def _placeholders(info: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """The session token for the `outloop:` placeholders of env and nearby .env files (broker/placeholders.py)."""
    from pathlib import Path

    from broker.placeholders import file_placeholders, folders_up_to, resolve

    cwd = Path.cwd()
    folders = folders_up_to(cwd, Path(info.get("workspace") or cwd))
    updates, notes = resolve(
        env,
        file_placeholders(folders),
        tenant=info["tenant"],
        token=info["token"],
        session_env=info.get("env") or {},
        listen=info.get("listen"),
    )
    if not os.environ.get("OUTLOOP_QUIET"):
        for note in notes:
            print(f"outloop: {note}", file=sys.stderr)
    return updates


def _supervise(
    command: list[str],
    env: dict[str, str],
    start: Callable[[], int] | None = None,
    targets: Callable[[int], list[int]] | None = None,
) -> int:
    """Start `command` (or call `start`), pass signals on, reap adopted orphans, return the command's exit status.

    Signals go to `targets(child)` when given (the command inside a sandbox), else to the child.
    """
    spawned: list[int] = []  # the child, once it exists

    def forward(signum: int, _frame: object) -> None:
        if not spawned:
            return  # not started yet: nothing to pass on, and the signal must not kill us instead
        for pid in targets(spawned[0]) if targets is not None else spawned:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def maybe_forward(signum: int, frame: object) -> None:
        if not _terminal_sent_it():
            forward(signum, frame)

    # Before the command starts: a signal sent the moment it is up (^C) must find them in place.
    for sig in FORWARDED:
        signal.signal(sig, forward)
    for sig in FROM_TERMINAL:
        signal.signal(sig, maybe_forward)
    try:
        child = start() if start is not None else os.posix_spawnp(command[0], command, env)
    except FileNotFoundError:
        print(f"outloop: command not found: {command[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except PermissionError:
        print(f"outloop: permission denied: {command[0]}", file=sys.stderr)
        return 126
    spawned.append(child)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # pragma: no cover - the command was reaped elsewhere
            return 0
        if pid == child:
            end_leftovers()
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.waitstatus_to_exitcode(status)
        # An adopted orphan: reaped, nothing more.


LEFTOVER_GRACE_SECONDS = 2.0


def end_leftovers(grace: float = LEFTOVER_GRACE_SECONDS) -> int:
    """End what the command left running (background jobs, double forks): SIGTERM, then SIGKILL.

    They are in the session's tree only while its root lives; left behind, they would act
    for whatever folder they sit in, outside any session. Returns how many there were.
    """
    import psutil

    try:
        left = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(left, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:  # reap what we adopted
            pass
    return len(left)


# Runs first inside the sandbox: bwrap is started with SIGINT and SIGQUIT ignored (else
# ^C at the terminal would kill bwrap, and the sandbox with it), and the command gets
# them back at their defaults.
DEFAULT_SIGNALS = (
    "import os, signal, sys\n"
    "for s in (signal.SIGINT, signal.SIGQUIT): signal.signal(s, signal.SIG_DFL)\n"
    "try:\n    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "except OSError as e:\n"
    "    print(f'outloop: cannot start {sys.argv[1]} in the sandbox: {e.strerror}', file=sys.stderr)\n"
    "    sys.exit(127)\n"
)


def _check_sandbox(command: list[str]) -> None:
    """Fail before anything starts when this machine cannot sandbox `command`."""
    import shutil

    from broker.sandbox import SandboxError, find_bwrap

    if sys.platform == "darwin":
        if shutil.which("sandbox-exec") is None:
            raise UserError("--sandbox needs sandbox-exec, which is not on PATH; nothing was run", EXIT_NO_SANDBOX)
    elif sys.platform.startswith("linux"):
        try:
            find_bwrap()
        except SandboxError as e:
            raise UserError(str(e), EXIT_NO_SANDBOX) from None
    else:
        raise UserError(f"--sandbox is not available on {sys.platform}; nothing was run", EXIT_NO_SANDBOX)
    if shutil.which(command[0]) is None:
        raise UserError(f"command not found: {command[0]}", EXIT_NOT_FOUND)


def _sandbox_plan(info: dict[str, Any], env: dict[str, str]) -> Any:
    """The session's sandbox: the broker's view (config, state, other tenants, [sandbox]) and this machine's keyring."""
    from pathlib import Path

    from broker import sandbox

    view = info.get("sandbox")
    if not isinstance(view, dict):
        raise sandbox.SandboxError(
            "the broker did not say what the sandbox must hide (it predates --sandbox); "
            "the operator can restart it; nothing was run"
        )
    paths = Paths.from_env()
    home = Path.home()
    hide = [Path(p) for p in view.get("hide", [])] + [paths.config_file.parent, paths.state_dir]
    hide += sandbox.keyring_paths(env, home)
    hide += sandbox.bus_paths(env.get("DBUS_SESSION_BUS_ADDRESS"))
    private = [Path("/tmp"), *sandbox.runtime_dirs(env)]  # noqa: S108 - replaced by an empty folder
    if sys.platform == "darwin":
        hide += sandbox.macos_hidden(home)
        private = [Path(p) for p in ("/tmp", "/private/tmp", "/private/var/folders", os.environ.get("TMPDIR", "/tmp"))]  # noqa: S108
    return sandbox.classify(
        workspace=Path(info["workspace"]),
        cwd=Path.cwd(),
        socket=Path(info["socket"]),
        hide=hide,
        read_write=[Path(p) for p in view.get("read_write", [])],
        private=private,
    )


def _programs(command: list[str], plan: Any) -> tuple[Any, ...]:
    """Folders the sandboxed command cannot run without: Outloop's Python, and the command's own."""
    import shutil
    from pathlib import Path

    import broker

    found = shutil.which(command[0]) if command else None
    # Outloop's own code too: an editable install runs from its checkout.
    folders = [Path(sys.prefix), Path(sys.base_prefix), Path(broker.__file__).resolve().parent.parent]
    if found:
        folders.append(Path(found).resolve().parent)
    return tuple(dict.fromkeys(p.resolve() for p in folders if p.is_dir()))


def _run_sandboxed(command: list[str], env: dict[str, str], info: dict[str, Any]) -> int:
    """Run `command` in the session's sandbox; a clear error, and nothing run, when it cannot start."""
    import subprocess

    from broker import sandbox

    try:
        plan = _sandbox_plan(info, env)
        plan = dataclasses.replace(plan, keep=_programs(command, plan))
        inside = sandbox.sandbox_environ(env, plan)
        if sys.platform == "darwin":  # untested here: see broker/sandbox.py
            profile = sandbox.seatbelt_profile(plan)
            return _supervise(["sandbox-exec", "-p", profile, *command], inside)
        bwrap = sandbox.find_bwrap()
        seccomp = sandbox.tiocsti_filter()
        trial = subprocess.run(  # noqa: S603 - our own argv: does the sandbox start at all?
            [bwrap, *sandbox.bwrap_args(plan, new_session=seccomp is None), "--", "true"],
            env=inside,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if trial.returncode != 0:
            lines = trial.stderr.strip().splitlines() or [f"exit status {trial.returncode}"]
            raise sandbox.SandboxError(f"the sandbox could not start ({lines[-1]}); nothing was run")
    except sandbox.SandboxError as e:
        print(f"outloop: {e}", file=sys.stderr)
        return EXIT_NO_SANDBOX
    init: list[int] = []
    status_r, status_w = os.pipe()
    filter_r = -1
    if seccomp is not None:
        filter_r, filter_w = os.pipe()
        os.write(filter_w, seccomp)  # a few hundred bytes: within the pipe's buffer
        os.close(filter_w)
        os.set_inheritable(filter_r, True)
    os.set_inheritable(status_w, True)
    options = sandbox.bwrap_args(
        plan, seccomp_fd=filter_r if seccomp is not None else None, status_fd=status_w, new_session=seccomp is None
    )
    argv = [bwrap, *options, "--", sys.executable, "-I", "-S", "-c", DEFAULT_SIGNALS, *command]

    def start() -> int:
        saved = {s: signal.signal(s, signal.SIG_IGN) for s in FROM_TERMINAL}
        try:
            child = os.posix_spawn(bwrap, argv, inside)
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)
            os.close(status_w)
            if filter_r >= 0:
                os.close(filter_r)
        first = b""  # bwrap's first line names its namespace's init (a host pid)
        while b"\n" not in first and (chunk := os.read(status_r, 4096)):
            first += chunk
        first = first.split(b"\n", 1)[0]
        try:
            init.append(int(json.loads(first)["child-pid"]))
        except (ValueError, KeyError, TypeError):
            pass
        return child

    def targets(child: int) -> list[int]:
        """The command inside: the children of the sandbox's init (host pids), else bwrap itself."""
        if init:
            try:
                with open(f"/proc/{init[0]}/task/{init[0]}/children") as f:
                    inner = [int(p) for p in f.read().split()]
                if inner:
                    return inner
            except OSError:
                pass
        return [child]

    try:
        return _supervise(argv, inside, start, targets)
    finally:
        os.close(status_r)


# -- policy is the operator's ---------------------------------------------------------


def session_around_me() -> str | None:
    """Which agent session this process runs in, if any: the broker's own test (token, or a session root in its tree).

    Read from the broker's state file, so it holds when the broker is down too.
    """
    from broker.calls.identity import Peer
    from broker.calls.sessions import Sessions

    paths = Paths.from_env()
    sessions = Sessions(paths.state_dir / "sessions.json")
    sessions.load(write=False)
    found = sessions.in_tree(Peer(os.getpid(), os.getuid()).lineage())
    token = os.environ.get("OUTLOOP_SESSION")
    if found is None and token:
        found = sessions.by_token(token)
        if found is None:
            return "a process holding a session token"
    if found is None and os.environ.get("OUTLOOP_SANDBOX"):
        return "a process inside an Outloop sandbox"
    if found is None:
        return None
    return f"a process inside tenant {found.tenant!r}'s session {found.id}"


def refuse_inside_session(command: str) -> None:
    """UserError when this process runs inside an agent session: changing policy is the operator's."""
    who = session_around_me()
    if who is not None:
        raise UserError(
            f"{who} cannot act as the operator: `{command}` is for the operator, outside every agent session",
            EXIT_REFUSED,
        )


def _terminal_sent_it() -> bool:
    """Whether a SIGINT/SIGQUIT most likely came from our terminal (we are its foreground group)."""
    for fd in (0, 1, 2):
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


def run_session_list(args: argparse.Namespace) -> int:
    try:
        resp = request(_socket(), "GET", "/v1/sessions", timeout=30)
    except BrokerUnreachable as e:
        print(f"outloop: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if resp.status != 200:
        return _refused(resp, "listing sessions was")
    sessions = resp.json()["sessions"]
    if args.json:
        print(json.dumps(sessions, indent=2))
        return 0
    if not sessions:
        print("no live sessions")
        return 0
    print(f"{'ID':<13} {'TENANT':<16} {'PID':>7}  {'EXPIRES':<16} {'LABEL':<16} WORKSPACE")
    for s in sessions:
        expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["expires"]))
        print(
            f"{s['id']:<13} {s['tenant']:<16} {s['root_pid']:>7}  {expires:<16} {s['label'][:16]:<16} {s['workspace']}"
        )
    return 0


def run_session_revoke(args: argparse.Namespace) -> int:
    try:
        resp = request(_socket(), "DELETE", f"/v1/sessions/{args.id}", timeout=30)
    except BrokerUnreachable as e:
        print(f"outloop: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if resp.status != 200:
        return _refused(resp, "revoking the session was")
    print(f"session {args.id} revoked")
    return 0
