"""`outloop hook pre|post`: Claude Code's PreToolUse and PostToolUse hook commands.

Claude Code runs the command with one JSON object on stdin (`session_id`,
`transcript_path`, `cwd`, `hook_event_name`, `tool_name`, `tool_input`, and
`tool_response` after the tool ran).

pre   refuses (exit 2, the reason on stderr, which Claude reads) reading or editing
      `.env`-like, private key and credential files and Outloop's own config and
      state, and shell commands that print them or dump the environment. The
      reason points the agent at the Outloop MCP tool. Everything else: exit 0,
      no output.
post  looks for managed secrets and high-confidence provider keys in the tool's
      output (also hex- or base64-encoded, and in the file Claude Code keeps a
      large output in) and replaces the output with a redacted copy before the
      model sees it: `updatedMCPToolOutput` for an MCP tool, `updatedToolOutput`
      for a built-in one. A built-in tool's finding is also a leak alert (the
      dashboard shows it), and Claude is told once that the value is compromised.

Both stay on the standard library plus broker/ (no textual, no mcp), so a hook
costs one short Python start.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from broker.claude.guard import Protected, tool_refusal
from broker.paths import Paths

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: typing stays out of a hook's start
    import argparse
    from typing import Any, Literal

EXIT_ALLOW, EXIT_BLOCK = 0, 2
MCP_SERVER = "outloop"
REQUEST_TOOL = f"mcp__{MCP_SERVER}__outloop_request"
CREDENTIALS_TOOL = f"mcp__{MCP_SERVER}__outloop_credentials"
# Input keys of third-party MCP tools that name a file (a filesystem server's read_file).
MCP_PATH_KEYS = ("path", "file_path", "filepath", "filename", "file")

ADVICE = (
    "API keys are not kept in files or the environment here. To call an API, use the "
    f"`{REQUEST_TOOL}` tool (`{CREDENTIALS_TOOL}` lists the credentials this workspace "
    "may use), or run `outloop call CREDENTIAL METHOD PATH` in the shell. Do not try "
    "another way to read the file or the variable."
)


def read_event(stream: Any = None) -> dict[str, Any]:
    """The hook input, or ValueError when it is not a JSON object."""
    data = json.load(stream or sys.stdin)
    if not isinstance(data, dict):
        raise ValueError("hook input is not a JSON object")
    return data


def protected_folders(paths: Paths | None = None) -> Protected:
    """Outloop's own folders: its config folder (or OUTLOOP_HOME) and its state folder."""
    p = paths or Paths.from_env()
    folders = {p.config_file.parent.absolute(), p.state_dir.absolute()}
    for f in list(folders):
        try:
            folders.add(f.resolve())
        except OSError:
            pass
    return Protected(tuple(sorted(folders)))


def pre_decision(event: dict[str, Any], protected: Protected | None = None) -> str | None:
    """Why this tool call must not run (the message for Claude), or None to let it run."""
    tool = str(event.get("tool_name") or "")
    tool_input = event.get("tool_input")
    if not isinstance(tool_input, dict):
        return None
    cwd = Path(str(event.get("cwd") or Path.cwd()))
    prot = protected or protected_folders()
    if tool.startswith("mcp__"):
        if tool.startswith(f"mcp__{MCP_SERVER}__"):
            return None
        why = None
        for key, value in tool_input.items():
            if key.lower() in MCP_PATH_KEYS and isinstance(value, str):
                why = why or tool_refusal("Read", {"file_path": value}, cwd, prot)
    else:
        why = tool_refusal(tool, tool_input, cwd, prot)
    if why is None:
        return None
    return f"Outloop blocked this {tool or 'tool'} call: {why}. {ADVICE}"


def run_pre(event: dict[str, Any]) -> int:
    reason = pre_decision(event)
    if reason is None:
        return EXIT_ALLOW
    print(reason, file=sys.stderr)
    return EXIT_BLOCK


# -- post: what came out of the tool ------------------------------------------------------


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON value (tool responses nest them in objects and lists)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


class PostContext:
    """What the post hook needs from Outloop: the caller's tenant and the managed secrets."""

    def __init__(self, event: dict[str, Any], paths: Paths | None = None) -> None:
        from broker.config import ConfigError, load_config
        from broker.secrets import SecretStore, SecretStoreError

        self.paths = paths or Paths.from_env()
        self.tenant: str | None = None
        self.workspace: Path | None = None
        self.secrets: dict[tuple[str, str], str] = {}
        try:
            config = load_config(self.paths)
        except ConfigError:
            return
        cwd = Path(str(event.get("cwd") or Path.cwd()))
        try:
            found = config.workspace_for(cwd.resolve())
        except OSError:
            found = None
        if found is not None:
            self.tenant, self.workspace = found[0].id, found[1]
        keys = [(c.tenant, c.name) for c in config.credentials()]
        try:
            self.secrets = {k: v.reveal() for k, v in SecretStore().managed(keys).items()}
        except SecretStoreError:
            self.secrets = {}


# Claude Code keeps the first 30,000 characters of a large output in the hook input and
# the whole output in this file; the rest is scanned from there (up to this much).
PERSISTED_KEY = "persistedOutputPath"
MAX_PERSISTED_BYTES = 16 * 1024 * 1024


def _persisted(value: Any) -> list[Path]:
    """Files named by `persistedOutputPath` anywhere in a tool response."""
    if isinstance(value, dict):
        found = [Path(v) for k, v in value.items() if k == PERSISTED_KEY and isinstance(v, str) and v]
        return found + [p for v in value.values() for p in _persisted(v)]
    if isinstance(value, list):
        return [p for v in value for p in _persisted(v)]
    return []


def _read_persisted(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_PERSISTED_BYTES).decode("utf-8", "replace")
    except OSError:
        return ""


def post_output(event: dict[str, Any], ctx: PostContext | None = None) -> dict[str, Any] | None:
    """The hook's JSON answer for one finished tool call, or None when the output is clean.

    The output comes back redacted before the model sees it: `updatedMCPToolOutput`
    for an MCP tool, `updatedToolOutput` (the same shape as `tool_response`) for a
    built-in one. What a built-in tool printed came from this machine (a file, a
    command), so it also becomes a leak alert. Claude is told once, in
    `additionalContext`.

    The broker is asked first (`POST /v1/scan`): it holds the managed secrets and
    the compiled rules, so this process loads neither the config, the keyring nor
    the rules. With no broker (or a `ctx` given), the hook scans by itself.
    """
    response = event.get("tool_response")
    persisted = _persisted(response)
    extra = [_read_persisted(p) for p in persisted]
    if not any(_strings(response)) and not any(extra):
        return None
    transcript = event.get("transcript_path")
    cwd = str(event.get("cwd") or Path.cwd())
    asked = _ask_broker(response, extra, str(transcript) if transcript else None, cwd) if ctx is None else None
    found: Found | None
    if asked is False:
        return None
    if asked is not None:
        paths, found = Paths.from_env(), asked
    else:
        found, paths = _scan_here(event, response, extra, ctx)
    if found is None:
        return None
    findings, redacted, where = found
    tool = str(event.get("tool_name") or "")
    rules = sorted({f.rule for f in findings})
    count = f"{len(findings)} credential value(s) ({', '.join(rules)})"
    if tool.startswith("mcp__"):
        return {
            "hookSpecificOutput": {
                "hookEventName": "PostToolUse",
                "updatedMCPToolOutput": redacted,
                "additionalContext": f"Outloop redacted {count} from this tool's output.",
            }
        }
    record_alerts(paths, findings, where)
    also = (
        f" The full output, in {', '.join(map(str, persisted))}, holds them too: do not read it." if persisted else ""
    )
    warning = (
        f"Outloop redacted {count} from the output of this {tool or 'tool'} call. They are live "
        "keys that were readable on this machine: treat them as compromised, do not try to "
        "recover, repeat or use them, and tell the user the credential must be rotated (Outloop "
        f"has raised a leak alert in its dashboard).{also} For API calls use the `{REQUEST_TOOL}` "
        "tool, which never shows a key."
    )
    return {
        "hookSpecificOutput": {
            "hookEventName": "PostToolUse",
            "updatedToolOutput": redacted,
            "additionalContext": warning,
        }
    }


if TYPE_CHECKING:
    Found = tuple[list[Any], Any, Path]  # findings, the redacted response, where they were seen
SCAN_TIMEOUT = 30.0


def _ask_broker(response: Any, extra: list[str], where: str | None, cwd: str) -> Found | None | Literal[False]:
    """The broker's findings for this output: (findings, redacted, where), False when it
    found nothing, None when it cannot answer (not running, too large, no keyring)."""
    from broker.client import BrokerUnreachable, request

    body = json.dumps({"response": response, "extra": extra, "where": where, "cwd": cwd}).encode("utf-8")
    try:
        resp = request(Paths.from_env().socket, "POST", "/v1/scan", body=body, timeout=SCAN_TIMEOUT)
        if resp.status != 200:
            return None
        answer = resp.json()
        if not answer.get("findings"):
            return False
        from broker.claude.output import finding_from_json

        findings = [finding_from_json(f) for f in answer["findings"]]
        return findings, answer["redacted"], Path(answer["where"])
    except (BrokerUnreachable, OSError, ValueError, KeyError, TypeError):
        return None


def _scan_here(
    event: dict[str, Any], response: Any, extra: list[str], ctx: PostContext | None
) -> tuple[Found | None, Paths]:
    """The same scan as the broker's, in this process: config, keyring and rules loaded here."""
    from broker.claude.output import inspect_output
    from broker.leaks.redact import with_leak_rules
    from broker.leaks.scan import managed_from

    ctx = ctx or PostContext(event)
    transcript = event.get("transcript_path")
    where = Path(str(transcript)) if transcript else (ctx.workspace or Path.cwd())
    found = inspect_output(
        response,
        extra,
        where,
        tenant=ctx.tenant,
        workspace=ctx.workspace,
        managed=managed_from(ctx.secrets),
        redactor=lambda: with_leak_rules([(c, v) for (_t, c), v in ctx.secrets.items()]),
    )
    if found is None:
        return None, ctx.paths
    return (found[0], found[1], where), ctx.paths


def record_alerts(paths: Paths, findings: list[Any], where: Path) -> None:
    """Open alerts in state/alerts.jsonl for what a tool printed.

    The alert's file is the session transcript, where Claude Code stores the output
    verbatim; the transcript watcher finds the same value there and agrees on the
    alert's id, so the dashboard shows one alert whichever process saw it first.
    """
    from broker.claude.transcripts import record_findings
    from broker.leaks.alerts import AlertStore
    from broker.leaks.scan import Finding
    from broker.paths import ensure_private_dir

    ensure_private_dir(paths.state_dir)
    store = AlertStore(paths.alerts_file)
    record_findings(
        store,
        where,
        [Finding(f.tenant, f.workspace, where, f.line, f.rule, f.severity, f.preview, f.fingerprint) for f in findings],
    )


def run_post(event: dict[str, Any]) -> int:
    output = post_output(event)
    if output is not None:
        sys.stdout.write(json.dumps(output) + "\n")
    return EXIT_ALLOW


def run_hook(args: argparse.Namespace) -> int:
    return run_phase(args.phase)


def run_phase(phase: str) -> int:
    try:
        event = read_event()
    except ValueError:
        # Fail closed before a tool runs; after it ran there is nothing left to stop.
        print("outloop hook: the hook input was not the JSON object Claude Code sends", file=sys.stderr)
        return EXIT_BLOCK if phase == "pre" else 1
    if phase == "pre":
        return run_pre(event)
    return run_post(event)
