"""The `outloop` command line.

Each command's work lives in a `cmd_*` module imported only when that command
runs, so `outloop call` never pays for textual, httpx or the keyring. The commands
an agent runs on every tool call (`outloop hook pre|post`, `outloop call`) are
dispatched before argparse is even imported (`_lean`): argparse, and the typing
and dataclasses machinery it drags in, cost more than a hook's whole work.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: typing and collections.abc stay out of a hook's start
    import argparse
    from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem the user can fix; printed as one sentence, no traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


USAGE_EXIT = 64  # EX_USAGE: a mistyped command is not a refusal (2) or an upstream error (1)


def _parser_class() -> type[argparse.ArgumentParser]:
    import argparse
    from typing import NoReturn

    class Parser(argparse.ArgumentParser):
        """argparse with usage errors exiting 64, so scripts can tell them from a broker refusal."""

        def error(self, message: str) -> NoReturn:
            if message.startswith("unrecognized arguments:"):
                # Never echo them: a secret typed on the command line would land in a log.
                message = "unrecognized arguments (not shown); a secret is read from a prompt or stdin, never argv"
            self.print_usage(sys.stderr)
            self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n")

    return Parser


def _cmd(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        result: int = getattr(importlib.import_module(f"outloop_tui.{module}"), func)(args)
        return result

    return run


def _operator_only(command: str, run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`run`, refused inside an agent session: the commands that change Outloop's policy are the operator's."""

    def guarded(args: argparse.Namespace) -> int:
        from outloop_tui.cmd_run import refuse_inside_session

        refuse_inside_session(command)
        return run(args)

    return guarded


def _rule_args(p: argparse.ArgumentParser) -> None:
    for kind, what in (
        ("allow", "runs without asking"),
        ("ask", "waits for the operator"),
        ("deny", "refused; checked first"),
    ):
        p.add_argument(
            f"--{kind}",
            action="append",
            default=[],
            metavar="RULE",
            help=f"'METHOD /path/glob' that {what} (repeatable)",
        )


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from broker import __version__

    Parser = _parser_class()
    parser = Parser(
        prog="outloop",
        description="Keep API keys out of coding agents' workspaces: agents call through a "
        "broker that checks tenant and policy, asks you when needed, and audits everything. "
        "With no command, opens the dashboard.",
    )
    parser.add_argument("--version", action="version", version=f"outloop {__version__}")
    parser.set_defaults(run=_operator_only("outloop", _cmd("app", "run_dashboard")))
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("demo", help="the dashboard on a throw-away home with sample data")
    p.set_defaults(run=_cmd("demo", "run_demo"))

    p = sub.add_parser("broker", help="headless broker and leak watcher in the foreground")
    p.add_argument("--verbose", action="store_true", help="also log every allowed call (attempt and outcome)")
    p.set_defaults(run=_operator_only("outloop broker", _cmd("cmd_broker", "run_broker")))

    p = sub.add_parser(
        "call",
        help="make an API call through the broker (the agent's client)",
        description="Prints the redacted response body. Exit 0 for 2xx, 1 for an "
        "upstream non-2xx, 2 for a broker refusal, 3 when the broker is unreachable.",
    )
    p.add_argument("credential", help="the credential's name (see `outloop whoami`)")
    p.add_argument("method", help="HTTP method: GET, POST, PUT, PATCH, DELETE, ...")
    p.add_argument("path", help="path below the credential's base URL, e.g. /repos/acme/web")
    body = p.add_mutually_exclusive_group()
    body.add_argument("-d", "--data", metavar="BODY", help="request body as text ('@file' reads a file, '@-' stdin)")
    body.add_argument("--json", metavar="BODY", dest="json_body", help="request body as JSON")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    p.add_argument("-q", "--query", action="append", default=[], metavar="k=v")
    p.add_argument("--reason", help="why the agent wants this (shown to the operator, audited)")
    p.add_argument("-i", "--include", action="store_true", help="print status and headers on stderr")
    p.set_defaults(run=_cmd("cmd_call", "run_call"))

    p = sub.add_parser("config", help="accept or reject config changes that wait for the operator")
    csub = p.add_subparsers(title="config commands", metavar="ACTION", required=True)
    for action, helptext in (
        ("accept", "enforce the staged config change (it widens access); run outside any agent session"),
        ("reject", "discard the staged config change: config.toml goes back to the enforced config"),
    ):
        q = csub.add_parser(action, help=helptext, description=helptext)
        q.add_argument("--json", action="store_true", help="print the outcome and the changes as JSON")
        q.set_defaults(run=_cmd("cmd_config", f"run_{action}"))

    p = sub.add_parser("whoami", help="the tenant, workspace and credentials the caller gets here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd("cmd_call", "run_whoami"))

    p = sub.add_parser("socket", help="the broker socket's path (for curl --unix-socket and SDKs)")
    p.set_defaults(run=_cmd("cmd_call", "run_socket"))

    p = sub.add_parser(
        "run",
        help="run a command (an agent) in a session of this folder's tenant",
        description="Opens a session of this folder's tenant and runs CMD in it, with OUTLOOP_SESSION and, "
        "per credential of a known provider, its SDK's base-URL and key variables (the key is the session "
        "token, never the real key). Exits with CMD's status.",
    )
    p.add_argument("--tenant", help="the tenant this folder must belong to")
    p.add_argument("--label", help="a name for the session in `outloop session list` (default: the command)")
    p.add_argument("--ttl", type=float, metavar="S", help="seconds the session lasts (default: broker.session_ttl)")
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="run CMD in an OS sandbox (Linux: bubblewrap): the workspace writable, the keyring, Outloop's "
        "config and state and other tenants' folders hidden; exit 4 when no sandbox can start",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(run=_cmd("cmd_run", "run_session"))

    p = sub.add_parser("session", help="list or revoke agent sessions")
    ssub = p.add_subparsers(title="session commands", metavar="ACTION", required=True)
    q = ssub.add_parser("list", help="the live sessions")
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_cmd("cmd_run", "run_session_list"))
    q = ssub.add_parser("revoke", help="end a session now")
    q.add_argument("id", metavar="ID")
    q.set_defaults(run=_cmd("cmd_run", "run_session_revoke"))

    p = sub.add_parser("tenant", help="add, remove or list tenants")
    tsub = p.add_subparsers(title="tenant commands", metavar="ACTION", required=True)
    q = tsub.add_parser("add", help="add a tenant")
    q.add_argument("tenant", metavar="NAME")
    q.add_argument("--name", dest="display", metavar="DISPLAY", help="display name")
    q.set_defaults(run=_operator_only("outloop tenant add", _cmd("cmd_manage", "tenant_add")))
    q = tsub.add_parser("rm", help="remove a tenant and its credentials' secrets (asks first)")
    q.add_argument("tenant", metavar="NAME")
    q.add_argument("-y", "--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    q.set_defaults(run=_operator_only("outloop tenant rm", _cmd("cmd_manage", "tenant_rm")))
    q = tsub.add_parser("list", help="list tenants")
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_cmd("cmd_manage", "tenant_list"))

    p = sub.add_parser("workspace", help="map folders to tenants")
    wsub = p.add_subparsers(title="workspace commands", metavar="ACTION", required=True)
    q = wsub.add_parser("add", help="map a folder to a tenant")
    q.add_argument("tenant", help="the tenant the folder belongs to")
    q.add_argument("path", help="the folder (it and everything below it)")
    q.set_defaults(run=_operator_only("outloop workspace add", _cmd("cmd_manage", "workspace_add")))
    q = wsub.add_parser("rm", help="unmap a folder")
    q.add_argument("path", help="a mapped folder, as `outloop workspace list` shows it")
    q.set_defaults(run=_operator_only("outloop workspace rm", _cmd("cmd_manage", "workspace_rm")))
    q = wsub.add_parser("list", help="every mapped folder and its tenant")
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_cmd("cmd_manage", "workspace_list"))

    p = sub.add_parser("credential", help="add, remove or list credentials")
    csub = p.add_subparsers(title="credential commands", metavar="ACTION", required=True)
    q = csub.add_parser(
        "add",
        help="add a credential; the secret comes from a hidden prompt or from stdin when stdin is not a terminal",
        description="The secret is read from a hidden prompt, or from standard "
        "input when it is not a terminal; never from the command line.",
    )
    q.add_argument("tenant", help="the tenant that owns the credential")
    q.add_argument("name", help="the credential's name, as agents call it (github, openai, ...)")
    q.add_argument("--base-url", metavar="URL", help="the API's root URL (the --provider's by default)")
    q.add_argument(
        "--provider",
        metavar="NAME",
        help="a known provider (openai, github, stripe, ...): fills base URL, auth and rules not given",
    )
    q.add_argument("--auth", help="bearer | basic:<user> | header:<Header-Name> | query:<param> (default: bearer)")
    _rule_args(q)
    q.set_defaults(run=_operator_only("outloop credential add", _cmd("cmd_manage", "credential_add")))
    q = csub.add_parser(
        "set-secret",
        help="rotate a credential's secret (base URL, auth and rules stay)",
        description="The new secret is read from a hidden prompt, or from standard input when it is "
        "not a terminal; never from the command line.",
    )
    q.add_argument("tenant", help="the tenant that owns the credential")
    q.add_argument("name", help="the credential's name")
    q.set_defaults(run=_operator_only("outloop credential set-secret", _cmd("cmd_manage", "credential_set_secret")))
    q = csub.add_parser(
        "edit",
        help="change a credential's base URL, auth or rules (the secret stays)",
        description="Each of --allow, --ask and --deny given replaces that list; --clear-rules empties all three.",
    )
    q.add_argument("tenant", help="the tenant that owns the credential")
    q.add_argument("name", help="the credential's name")
    q.add_argument("--base-url", metavar="URL")
    q.add_argument("--auth", help="bearer | basic:<user> | header:<Header-Name> | query:<param>")
    _rule_args(q)
    q.add_argument("--clear-rules", action="store_true", help="no rules: every call asks the operator")
    q.set_defaults(run=_operator_only("outloop credential edit", _cmd("cmd_manage", "credential_edit")))
    q = csub.add_parser("rm", help="remove a credential and its secret (asks first)")
    q.add_argument("tenant", help="the tenant that owns the credential")
    q.add_argument("name", help="the credential's name")
    q.add_argument("-y", "--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    q.set_defaults(run=_operator_only("outloop credential rm", _cmd("cmd_manage", "credential_rm")))
    q = csub.add_parser("list", help="list credentials (never their secrets)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_cmd("cmd_manage", "credential_list"))

    p = sub.add_parser("scan", help="one-shot leak scan; exit 1 when anything is found")
    p.add_argument("paths", nargs="*", metavar="PATH", help="default: the mapped workspaces")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--all-files", action="store_true", help="apply every rule to every text file, not only .env-like ones"
    )
    p.set_defaults(run=_cmd("cmd_scan", "run_scan"))

    p = sub.add_parser(
        "import",
        help="move the keys of a workspace's .env files into the keyring, leaving placeholders",
        description="Finds the keys in PATH's .env-like files (default: this folder), shows a plan (masked), "
        "and per file stores them in the keyring as credentials of the tenant, then rewrites the file with "
        "outloop:TENANT/CREDENTIAL in place of each key, every other byte unchanged.",
    )
    p.add_argument("path", nargs="?", metavar="PATH", help="a workspace folder or one .env file (default: .)")
    p.add_argument("--tenant", help="the tenant PATH must belong to")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.add_argument(
        "--base-url",
        action="append",
        default=[],
        metavar="VAR=URL",
        help="the API's base URL for the key in VAR, when its provider is not in the catalog (repeatable)",
    )
    p.add_argument(
        "--auth", action="append", default=[], metavar="VAR=KIND", help="auth for VAR's key (default: bearer)"
    )
    p.set_defaults(run=_cmd("cmd_import", "run_import"))

    p = sub.add_parser("alerts", help="current leak alerts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd("cmd_scan", "run_alerts"))

    p = sub.add_parser("audit", help="verify or follow the audit log")
    asub = p.add_subparsers(title="audit commands", metavar="ACTION", required=True)
    q = asub.add_parser("verify", help="check the whole hash chain; exit 1 if broken")
    q.add_argument("--json", action="store_true", help="the result as one JSON object")
    q.set_defaults(run=_cmd("cmd_audit", "run_verify"))
    q = asub.add_parser("tail", help="print recent audit records")
    q.add_argument("-f", "--follow", action="store_true")
    q.add_argument("--json", action="store_true")
    q.add_argument("-n", "--lines", type=int, default=20)
    q.set_defaults(run=_cmd("cmd_audit", "run_tail"))

    p = sub.add_parser("doctor", help="keyring backend, socket, config, watcher health")
    p.add_argument("--json", action="store_true", help="the checks as JSON")
    p.set_defaults(run=_cmd("cmd_manage", "doctor"))

    p = sub.add_parser("service", help="run the broker as a user service (systemd or launchd)")
    p.add_argument("action", choices=["install", "uninstall"], help="write (or remove) the service definition")
    p.add_argument("--now", action="store_true", help="also enable and start it")
    p.add_argument("--dry-run", action="store_true", help="print what would be written")
    p.add_argument("--force", action="store_true", help="replace a service file that differs")
    p.set_defaults(run=_operator_only("outloop service", _cmd("cmd_service", "run_service")))

    p = sub.add_parser("completion", help="print the shell completion script (bash, zsh or fish)")
    p.add_argument("shell", choices=["bash", "zsh", "fish"], help="eval its output in that shell's rc file")
    p.set_defaults(run=_cmd("cmd_completion", "run_completion"))

    p = sub.add_parser("mcp", help="stdio MCP server for Claude Code (extra outloop[mcp])")
    p.set_defaults(run=_cmd("cmd_mcp", "run_mcp"))

    p = sub.add_parser("hook", help="Claude Code hook commands (JSON on stdin)")
    p.add_argument("phase", choices=["pre", "post"], help="PreToolUse (pre) or PostToolUse (post)")
    p.set_defaults(run=_cmd("cmd_hook", "run_hook"))

    p = sub.add_parser(
        "claude",
        help="Claude Code in a session of this folder's tenant; or install|uninstall Outloop in it",
        usage="outloop claude [ARGS...] | outloop claude install|uninstall [--scope user|project] [--dry-run]",
        description="`outloop claude [ARGS...]` starts Claude Code (ARGS go to it) in a session of this "
        "folder's tenant, with Outloop's MCP server and hooks bound to the session. `install` and "
        "`uninstall` register or remove them in Claude Code's settings.",
    )
    p.add_argument("action", choices=["install", "uninstall"], help="register or remove Outloop's entries")
    p.add_argument("--scope", choices=["user", "project"], default="user")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(run=_operator_only("outloop claude install|uninstall", _cmd("cmd_claude", "run_claude")))
    return parser


# `outloop call` options the lean path reads itself; anything else (help, a typo, an
# abbreviation, a value that looks like a flag) goes to argparse and its messages.
_CALL_VALUE_FLAGS = {
    "-d": "data",
    "--data": "data",
    "--json": "json_body",
    "-H": "header",
    "--header": "header",
    "-q": "query",
    "--query": "query",
    "--reason": "reason",
}


def _lean_call_args(argv: Sequence[str]) -> object | None:
    """`outloop call` arguments as argparse would parse them, or None to let argparse do it."""
    from types import SimpleNamespace

    ns = SimpleNamespace(data=None, json_body=None, header=[], query=[], reason=None, include=False)
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg in ("-i", "--include"):
            ns.include = True
        elif name in _CALL_VALUE_FLAGS:
            if eq:
                value = inline
            else:
                i += 1
                if i >= len(argv):
                    return None
                value = argv[i]
            if value.startswith("-") and value != "-":
                return None
            dest = _CALL_VALUE_FLAGS[name]
            if dest in ("header", "query"):
                getattr(ns, dest).append(value)
            elif getattr(ns, dest) is not None:
                return None
            else:
                setattr(ns, dest, value)
        elif arg.startswith("-") and arg != "-":
            return None
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 3 or (ns.data is not None and ns.json_body is not None):
        return None
    ns.credential, ns.method, ns.path = positional
    return ns


def _lean(argv: Sequence[str]) -> Callable[[], int] | None:
    """The agent-facing commands, run without argparse; None for everything else."""
    if len(argv) == 2 and argv[0] == "hook" and argv[1] in ("pre", "post"):
        phase = argv[1]

        def hook() -> int:
            from outloop_tui.cmd_hook import run_phase

            return run_phase(phase)

        return hook
    if argv[:1] == ["claude"] and argv[1:2] not in (["install"], ["uninstall"], ["-h"], ["--help"]):
        claude_args = list(argv[1:])
        if claude_args[:1] == ["--"]:
            claude_args = claude_args[1:]

        def claude() -> int:
            from outloop_tui.cmd_claude import run_claude_code

            return run_claude_code(claude_args)

        return claude
    if argv[:1] == ["call"]:
        args = _lean_call_args(argv[1:])
        if args is not None:

            def call() -> int:
                from outloop_tui.cmd_call import run_call

                return run_call(args)  # type: ignore[arg-type]

            return call
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    run = None if "_ARGCOMPLETE" in os.environ else _lean(argv)
    if run is None:
        parser = build_parser()
        if "_ARGCOMPLETE" in os.environ:  # the shell is asking for completions, nothing runs
            import argcomplete

            argcomplete.autocomplete(parser)
        args = parser.parse_args(argv)

        def run() -> int:
            return int(args.run(args))

    debug = os.environ.get("OUTLOOP_DEBUG") == "1"
    try:
        return int(run())
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # one sentence for users; tracebacks only when debugging
        if debug:
            raise
        code = getattr(e, "code", 1)
        print(f"outloop: {_sentence(e)}", file=sys.stderr)
        return code if isinstance(code, int) and code > 0 else 1


def _sentence(e: Exception) -> str:
    from broker.config import ConfigError
    from broker.paths import PathError

    if isinstance(e, UserError | ConfigError | PathError):
        return str(e)
    # Broker errors whose messages are written for users (not imported: keep startup light).
    if type(e).__name__ in ("SecretStoreError", "SocketInUse", "AuditError"):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where}; set OUTLOOP_DEBUG=1 for details"
    return f"unexpected {type(e).__name__}; set OUTLOOP_DEBUG=1 for details"


if __name__ == "__main__":
    # Run as `python -m outloop_tui.cli`: use the importable module, so the command
    # modules and this entry point share one UserError class.
    from outloop_tui.cli import main as _main

    sys.exit(_main())
