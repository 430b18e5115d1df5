"""`outloop mcp`: a stdio MCP server that forwards tool calls to the broker socket.

The server holds no key and no config of its own: each tool call is one request on
the broker's Unix socket, made from this process, so the broker identifies the
caller (this process's working folder and its ancestors, i.e. the Claude Code
session that started it) exactly as it does for `outloop call`. MCP servers run
outside Claude Code's Bash sandbox, which is why this path works where a
sandboxed `outloop call` cannot reach the socket.

The `mcp` SDK is an optional extra (`outloop[mcp]`): it is imported only here,
only when the command runs.
"""

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from broker.client import BrokerUnreachable, Response, call, whoami
from broker.paths import Paths
from outloop_tui.cli import UserError

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

SERVER_NAME = "outloop"
REQUEST_TOOL = "outloop_request"
CREDENTIALS_TOOL = "outloop_credentials"

# How long one tool call may wait for the broker (operator approval plus upstream).
# The broker itself denies an unanswered approval after `approval_timeout` (120 s by
# default); this is the backstop that turns a stuck call into a clear tool error.
DEFAULT_CALL_TIMEOUT = 600.0
# While a call waits (usually for the operator), progress is reported this often so
# the client shows that something is happening and timeouts based on inactivity reset.
PROGRESS_EVERY = 5.0

INSTRUCTIONS = (
    "Outloop makes API calls for you with credentials you never see. Call "
    f"{CREDENTIALS_TOOL} to learn which credentials this workspace may use and which "
    f"method/path rules apply, then {REQUEST_TOOL} with a path relative to the "
    "credential's base URL and a short reason. Do not look for API keys in files or the "
    "environment: there are none to find, and reading .env files is blocked."
)

# What the agent should do next, for each DESIGN refusal code.
NEXT_STEP = {
    "unmapped_workspace": "this folder belongs to no Outloop tenant; tell the user, who decides whether to map it "
    "(do not try to map it yourself, and do not look for keys instead)",
    "wrong_tenant": f"this workspace may not use that credential; call {CREDENTIALS_TOOL} "
    "for the ones it may use, and do not try another tenant's",
    "unknown_credential": f"call {CREDENTIALS_TOOL} for the credential names this workspace may use",
    "denied_by_policy": "policy refuses this method and path; do not retry it, and ask the "
    "user if the call is really needed (they can change the rules)",
    "denied_by_operator": "the operator refused this call; do not retry it unless the user asks you to",
    "approval_timeout": "nobody answered in the Outloop dashboard in time; tell the user "
    "that a call is waiting for approval, then retry once",
    "approval_unavailable": "this call needs the operator's approval and no Outloop "
    "dashboard is open; ask the user to run `outloop`, then retry",
    "bad_request": "fix the request: the path is relative to the credential's base URL "
    "(no scheme, host or '..'), headers are names and values, the body is text or JSON",
    "upstream_error": "the API could not be reached or timed out; retry later",
    "audit_unavailable": "the broker cannot write its audit log and refuses every call; tell the user",
}


class ToolRefusal(Exception):
    """A refusal or failure, already phrased for the agent (no secret can be in it)."""


# -- the work, without the SDK (plain functions over the socket client) -----------


def refusal_text(resp: Response) -> str:
    """One message naming the DESIGN error code and what to do next."""
    try:
        error = resp.json()["error"]
        code, message = str(error["code"]), str(error.get("message", ""))
        audit = error.get("audit_id")
    except (ValueError, KeyError, TypeError):
        return f"refused: the broker answered HTTP {resp.status}"
    text = f"refused ({code}): {message.rstrip('.')}."
    if code in NEXT_STEP:
        text += f" Next: {NEXT_STEP[code]}."
    if audit:
        text += f" (audit id {audit})"
    return text


def unreachable_text(sock: Path) -> str:
    return (
        f"refused (broker_unreachable): no Outloop broker answers on {sock}. Next: ask "
        "the user to start `outloop` (the dashboard) or `outloop broker`, then retry."
    )


def build_payload(
    credential: str,
    method: str,
    path: str,
    query: dict[str, Any] | None,
    headers: dict[str, str] | None,
    body: Any,
    reason: str,
) -> dict[str, Any]:
    """The /v1/request payload for one tool call."""
    payload: dict[str, Any] = {"credential": credential, "method": method.upper(), "path": path}
    if query:
        payload["query"] = query
    if headers:
        payload["headers"] = headers
    if body is not None:
        payload["body"] = body
    if reason:
        payload["reason"] = reason
    return payload


def answer_text(envelope: dict[str, Any]) -> str:
    """The upstream answer as the agent sees it: status, content type, audit id, body."""
    status = envelope.get("status")
    headers = {str(k).lower(): v for k, v in (envelope.get("headers") or {}).items()}
    out: dict[str, Any] = {"status": status, "audit_id": envelope.get("audit_id")}
    for name in ("content-type", "location", "link", "retry-after", "x-ratelimit-remaining"):
        if name in headers:
            out.setdefault("headers", {})[name] = headers[name]
    body = envelope.get("body")
    if envelope.get("body_base64") and isinstance(body, str):
        out["body_base64"] = body
        out["body_bytes"] = len(base64.b64decode(body))
    else:
        out["body"] = body
    return json.dumps(out, indent=2, ensure_ascii=False)


def request_sync(sock: Path, payload: dict[str, Any], timeout: float) -> str:
    """One broker call; the answer text, or ToolRefusal with the reason."""
    try:
        resp = call(sock, payload, timeout=timeout)
    except BrokerUnreachable:
        raise ToolRefusal(unreachable_text(sock)) from None
    except TimeoutError:
        raise ToolRefusal(
            f"refused (timeout): the broker did not answer within {timeout:g} s; the call may "
            "still be waiting for approval in the Outloop dashboard. Next: tell the user, then "
            "retry once."
        ) from None
    except OSError as e:
        raise ToolRefusal(
            f"refused (broker_unreachable): the broker connection failed "
            f"({e.strerror or type(e).__name__}). Next: retry once."
        ) from None
    if resp.status != 200:
        raise ToolRefusal(refusal_text(resp))
    try:
        envelope = resp.json()
    except ValueError:
        raise ToolRefusal("refused (bad_response): the broker's answer was not JSON") from None
    return answer_text(envelope)


def credentials_sync(sock: Path) -> str:
    """What this workspace may use: tenant, credentials, base URLs and rules; never a secret."""
    try:
        resp = whoami(sock)
    except BrokerUnreachable:
        raise ToolRefusal(unreachable_text(sock)) from None
    if resp.status != 200:
        raise ToolRefusal(refusal_text(resp))
    info = resp.json()
    out: dict[str, Any] = {"tenant": info.get("tenant"), "workspace": info.get("workspace"), "credentials": []}
    rules = info.get("rules") or {}
    for name in info.get("credentials") or []:
        r = rules.get(name) or {}
        has_rules = any(r.get(k) for k in ("allow", "ask", "deny"))
        out["credentials"].append(
            {
                "name": name,
                "base_url": r.get("base_url"),
                "allow": r.get("allow", []),
                "ask": r.get("ask", []),
                "deny": r.get("deny", []),
                "note": "allow runs at once, ask waits for the operator, deny and anything unmatched is refused"
                if has_rules
                else "no rules: every call waits for the operator",
            }
        )
    return json.dumps(out, indent=2, ensure_ascii=False)


def call_timeout() -> float:
    value = os.environ.get("OUTLOOP_MCP_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_CALL_TIMEOUT
    except ValueError:
        return DEFAULT_CALL_TIMEOUT


# -- the MCP server ---------------------------------------------------------------


def _require_mcp() -> None:
    try:
        import mcp.server.mcpserver  # noqa: F401 - only whether it is there
    except ImportError:
        raise UserError(
            "the MCP server needs the optional `mcp` package; install it with `pip install 'outloop[mcp]'`"
        ) from None


def build_server(sock: Path | None = None) -> "MCPServer":
    """The MCP server with Outloop's tools, talking to the broker on `sock`."""
    _require_mcp()
    import anyio
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from pydantic import Field

    from broker import __version__

    sock_path = sock if sock is not None else _socket()
    server: MCPServer = MCPServer(SERVER_NAME, version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")

    # Plain text results: structured output would send every answer to the model twice.
    @server.tool(
        name=CREDENTIALS_TOOL,
        structured_output=False,
        description=(
            "List the API credentials this workspace may use through Outloop, with each one's "
            "base URL and allow/ask/deny rules. Never returns a secret."
        ),
    )
    async def outloop_credentials() -> str:
        try:
            return await anyio.to_thread.run_sync(credentials_sync, sock_path)
        except ToolRefusal as e:
            raise ToolError(str(e)) from None

    async def outloop_request(
        credential: Annotated[str, Field(description="credential name, from outloop_credentials")],
        method: Annotated[str, Field(description="HTTP method: GET, POST, PUT, PATCH, DELETE")],
        path: Annotated[
            str, Field(description="path relative to the credential's base URL, e.g. /repos/acme/web/issues")
        ],
        ctx: Context,
        query: Annotated[dict[str, str | list[str]] | None, Field(description="query parameters")] = None,
        headers: Annotated[
            dict[str, str] | None,
            Field(description="extra request headers (never an auth header: Outloop adds the credential)"),
        ] = None,
        body: Annotated[Any, Field(description="request body: a JSON value, or text")] = None,
        reason: Annotated[
            str,
            Field(
                description="one sentence on why you need this call; the "
                "operator sees it when approving, and it is "
                "audited"
            ),
        ] = "",
    ) -> str:
        payload = build_payload(credential, method, path, query, headers, body, reason)
        timeout = call_timeout()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["text"] = request_sync(sock_path, payload, timeout)
            except ToolRefusal as e:
                result["error"] = str(e)

        start = time.monotonic()
        async with anyio.create_task_group() as tg:
            done = anyio.Event()

            async def run() -> None:
                await anyio.to_thread.run_sync(work)
                done.set()

            tg.start_soon(run)
            while not done.is_set():
                with anyio.move_on_after(PROGRESS_EVERY):
                    await done.wait()
                if not done.is_set():  # most likely waiting for the operator
                    waited = time.monotonic() - start
                    try:
                        await ctx.report_progress(
                            waited,
                            None,
                            f"waiting for the broker ({waited:.0f} s): the call "
                            "may need the operator's approval in the Outloop dashboard",
                        )
                    except Exception:  # noqa: S110 - progress is a courtesy
                        pass
        if "error" in result:
            raise ToolError(result["error"])
        return str(result["text"])

    server.tool(
        name=REQUEST_TOOL,
        structured_output=False,
        description=(
            "Make an HTTP API call with an Outloop-managed credential. Outloop checks the "
            "workspace's tenant and the credential's rules, may wait for the operator to approve, "
            "injects the key itself and returns the upstream status and body with every secret "
            "redacted. Refusals are errors that name the reason and what to do next."
        ),
    )(outloop_request)
    return server


def _socket() -> Path:
    paths = Paths.from_env()
    paths.check_socket_path()
    return paths.socket


def run_mcp(args: argparse.Namespace) -> int:
    server = build_server()
    if sys.stdin.isatty():
        print(
            "outloop mcp speaks MCP on stdin/stdout; register it with "
            "`outloop claude install` rather than running it by hand",
            file=sys.stderr,
        )
    server.run("stdio")
    return 0
