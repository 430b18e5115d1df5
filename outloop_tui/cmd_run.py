"""`outloop run` and `outloop session list|revoke`: agents started inside a session.

`outloop run` asks the broker for a session rooted at this very process, makes
itself a child subreaper (so double-forked and `nohup`'d descendants stay in its
tree), starts the command with the session's environment, forwards signals and
exits with the command's status. Standard library only: it starts on every
agent launch.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
from typing import Any

from broker.client import BrokerUnreachable, Response, request
from broker.paths import Paths
from outloop_tui.cli import UserError

EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_NOT_FOUND = 2, 3, 127
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
    """The command's environment: `base` without any provider key, plus the session's variables."""
    env = {k: v for k, v in base.items() if k not in set(info.get("clear_env", ()))}
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
    return _supervise(command, env)


def _supervise(command: list[str], env: dict[str, str]) -> int:
    """Start `command`, pass signals on, reap adopted orphans, return the command's exit status."""
    try:
        child = os.posix_spawnp(command[0], command, env)
    except FileNotFoundError:
        print(f"outloop: command not found: {command[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except PermissionError:
        print(f"outloop: permission denied: {command[0]}", file=sys.stderr)
        return 126

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    def maybe_forward(signum: int, frame: object) -> None:
        if not _terminal_sent_it():
            forward(signum, frame)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    for sig in FROM_TERMINAL:
        signal.signal(sig, maybe_forward)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # pragma: no cover - the command was reaped elsewhere
            return 0
        if pid == child:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.waitstatus_to_exitcode(status)
        # An adopted orphan: reaped, nothing more.


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
