"""`outloop mcp`, driven by the MCP SDK's own client against a real broker and upstream.

In memory: the server runs in this process, whose working folder the test moves
into a workspace, so the broker identifies this process as the caller. Over stdio:
`outloop mcp` runs as a subprocess started in a workspace folder, as Claude Code
starts it. Every tool result is checked for every test secret in every encoding.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters  # the mcp extra: the README's test command installs it
from support.fixtures import OUTLOOP, BrokerThread, World

from broker.config import ConfigEditor
from broker.secrets import Secret, SecretStore
from outloop_tui.cmd_mcp import CREDENTIALS_TOOL, REQUEST_TOOL, build_server


def text_of(result: Any) -> str:
    parts = [getattr(c, "text", "") for c in result.content]
    if result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


async def call(client: Client, world: World, **arguments: Any) -> tuple[bool, str]:
    result = await client.call_tool(REQUEST_TOOL, arguments)
    world.assert_clean(text_of(result))
    assert result.structured_content is None  # one copy of the answer, as text
    return bool(result.is_error), result.content[0].text


async def wait_pending(broker: BrokerThread, timeout: float = 30.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        pending = broker.call(broker.engine.pending)
        if pending:
            return pending[0].id
        await asyncio.sleep(0.02)
    raise AssertionError("no approval became pending")


@pytest.fixture
def in_acme(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.chdir(world.acme)
    return world


# -- in memory ---------------------------------------------------------------------------


async def test_tools_listed_with_schemas(in_acme: World, broker: BrokerThread) -> None:
    async with Client(build_server(in_acme.socket)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {REQUEST_TOOL, CREDENTIALS_TOOL}
    props = tools[REQUEST_TOOL].input_schema["properties"]
    assert {"credential", "method", "path", "query", "headers", "body", "reason"} <= set(props)
    assert set(tools[REQUEST_TOOL].input_schema["required"]) == {"credential", "method", "path"}


async def test_credentials_tool_lists_rules_never_secrets(in_acme: World, broker: BrokerThread) -> None:
    async with Client(build_server(in_acme.socket)) as client:
        result = await client.call_tool(CREDENTIALS_TOOL, {})
    text = text_of(result)
    in_acme.assert_clean(text)
    assert not result.is_error
    info = json.loads(result.content[0].text)
    assert info["tenant"] == "acme"
    names = {c["name"]: c for c in info["credentials"]}
    assert set(names) == {"api", "openai", "search", "legacy"}
    assert "POST /ask/**" in names["api"]["ask"]
    assert "DELETE /**" in names["api"]["deny"]
    assert names["api"]["base_url"].endswith("/acme")


async def test_allowed_call_returns_redacted_answer(in_acme: World, broker: BrokerThread) -> None:
    async with Client(build_server(in_acme.socket)) as client:
        is_error, text = await call(
            client,
            in_acme,
            credential="api",
            method="get",
            path="/echo/hello",
            query={"nonce": "n-1"},
            reason="check the echo",
        )
    assert not is_error
    answer = json.loads(text)
    assert answer["status"] == 200
    assert answer["audit_id"]
    assert answer["body"]["nonce"] == "n-1"
    assert "[REDACTED:api]" in json.dumps(answer["body"])
    # The key went on the wire, and the reason into the audit.
    assert in_acme.upstream.records[-1].header("Authorization") == f"Bearer {in_acme.keys[('acme', 'api')]}"
    assert any(r.get("reason") == "check the echo" for r in in_acme.audit())


async def test_json_body_and_upstream_status(in_acme: World, broker: BrokerThread) -> None:
    async with Client(build_server(in_acme.socket)) as client:
        is_error, text = await call(
            client, in_acme, credential="api", method="POST", path="/status/404", body={"title": "x"}
        )
    assert not is_error  # an upstream 404 is an answer, not a refusal
    answer = json.loads(text)
    assert answer["status"] == 404
    assert json.loads(answer["body"]["body"]) == {"title": "x"}


@pytest.mark.parametrize(
    ("arguments", "code"),
    [
        ({"credential": "nope", "method": "GET", "path": "/x"}, "unknown_credential"),
        ({"credential": "crm", "method": "GET", "path": "/x"}, "wrong_tenant"),
        ({"credential": "api", "method": "DELETE", "path": "/repos/x"}, "denied_by_policy"),
        ({"credential": "api", "method": "GET", "path": "/admin/users"}, "denied_by_policy"),
        ({"credential": "api", "method": "PUT", "path": "/anything"}, "denied_by_policy"),
        ({"credential": "api", "method": "GET", "path": "/a/../../etc"}, "bad_request"),
        ({"credential": "api", "method": "GET", "path": "http://evil.example/x"}, "bad_request"),
        ({"credential": "api", "method": "POST", "path": "/ask/x"}, "approval_unavailable"),
    ],
)
async def test_refusals_are_tool_errors_naming_the_code(
    in_acme: World, broker: BrokerThread, arguments: dict[str, Any], code: str
) -> None:
    if code == "approval_unavailable":
        in_acme.configure(approval_timeout=0.3)  # nobody attaches: it waits this long first
    async with Client(build_server(in_acme.socket)) as client:
        is_error, text = await call(client, in_acme, **arguments)
    assert is_error
    assert f"refused ({code})" in text
    assert "Next:" in text
    assert not in_acme.upstream.records


async def test_unmapped_workspace(world: World, broker: BrokerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world.unmapped)
    async with Client(build_server(world.socket)) as client:
        is_error, text = await call(client, world, credential="api", method="GET", path="/x")
        listed = await client.call_tool(CREDENTIALS_TOOL, {})
    assert is_error and "refused (unmapped_workspace)" in text
    assert "operator" in text and "outloop workspace add" not in text  # never how to give itself access
    assert listed.is_error and "unmapped_workspace" in text_of(listed)


async def test_upstream_error(in_acme: World, broker: BrokerThread) -> None:
    editor = ConfigEditor(in_acme.paths)
    editor.add_credential("acme", "down", {"base_url": "http://127.0.0.1:9", "auth": "bearer", "allow": ["GET /**"]})
    editor.save()
    SecretStore().set("acme", "down", Secret("down-secret-value-123456"))
    in_acme.keys[("acme", "down")] = "down-secret-value-123456"
    async with Client(build_server(in_acme.socket)) as client:
        is_error, text = await call(client, in_acme, credential="down", method="GET", path="/x")
    assert is_error and "refused (upstream_error)" in text


async def test_broker_unreachable(in_acme: World, tmp_path: Path) -> None:
    async with Client(build_server(tmp_path / "nothing.sock")) as client:
        is_error, text = await call(client, in_acme, credential="api", method="GET", path="/x")
    assert is_error and "broker_unreachable" in text and "outloop" in text


async def test_ask_then_approved(in_acme: World, broker: BrokerThread) -> None:
    broker.call(broker.engine.attach_approver)
    async with Client(build_server(in_acme.socket)) as client:
        task = asyncio.create_task(
            call(
                client,
                in_acme,
                credential="api",
                method="POST",
                path="/ask/deploy",
                body={"v": 1},
                reason="deploy the fix",
            )
        )
        approval_id = await wait_pending(broker)
        pending = broker.call(broker.engine.pending)[0]
        assert pending.reason == "deploy the fix"  # what the operator sees
        assert not in_acme.upstream.records  # nothing sent before the answer
        assert broker.call(broker.engine.answer, approval_id, "approved")
        is_error, text = await task
    assert not is_error
    assert json.loads(text)["status"] == 200
    assert in_acme.upstream.records[-1].path.endswith("/ask/deploy")


async def test_ask_then_denied_by_operator(in_acme: World, broker: BrokerThread) -> None:
    broker.call(broker.engine.attach_approver)
    async with Client(build_server(in_acme.socket)) as client:
        task = asyncio.create_task(call(client, in_acme, credential="api", method="POST", path="/ask/deploy"))
        approval_id = await wait_pending(broker)
        broker.call(broker.engine.answer, approval_id, "denied")
        is_error, text = await task
    assert is_error and "refused (denied_by_operator)" in text


async def test_ask_unanswered_times_out(in_acme: World, broker: BrokerThread) -> None:
    in_acme.configure(approval_timeout=0.3)
    broker.call(broker.engine.attach_approver)
    async with Client(build_server(in_acme.socket)) as client:
        is_error, text = await call(client, in_acme, credential="api", method="POST", path="/ask/deploy")
    assert is_error and "refused (approval_timeout)" in text


async def test_long_wait_reports_progress(
    in_acme: World, broker: BrokerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    import outloop_tui.cmd_mcp as cmd_mcp

    monkeypatch.setattr(cmd_mcp, "PROGRESS_EVERY", 0.05)
    broker.call(broker.engine.attach_approver)
    seen: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message)

    async with Client(build_server(in_acme.socket)) as client:
        task = asyncio.create_task(
            client.call_tool(
                REQUEST_TOOL, {"credential": "api", "method": "POST", "path": "/ask/x"}, progress_callback=on_progress
            )
        )
        approval_id = await wait_pending(broker)
        while not seen:
            await asyncio.sleep(0.02)
        broker.call(broker.engine.answer, approval_id, "approved")
        result = await task
    assert not result.is_error
    assert any(m and "approval" in m for m in seen)


async def test_client_side_deadline_is_reported(
    in_acme: World, broker: BrokerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTLOOP_MCP_TIMEOUT", "0.3")
    broker.call(broker.engine.attach_approver)
    async with Client(build_server(in_acme.socket)) as client:
        is_error, text = await call(client, in_acme, credential="api", method="POST", path="/ask/x")
    assert is_error and "refused (timeout)" in text and "approval" in text


# -- over stdio, as Claude Code runs it ------------------------------------------------------


def stdio_params(world: World, cwd: Path) -> StdioServerParameters:
    return StdioServerParameters(command=OUTLOOP, args=["mcp"], cwd=str(cwd), env=world.env())


async def test_stdio_server_in_a_workspace(world: World, broker: BrokerThread) -> None:
    broker.call(broker.engine.attach_approver)
    async with Client(stdio_params(world, world.acme)) as client:
        listed = await client.call_tool(CREDENTIALS_TOOL, {})
        world.assert_clean(text_of(listed))
        assert json.loads(listed.content[0].text)["tenant"] == "acme"

        is_error, text = await call(client, world, credential="openai", method="GET", path="/models")
        assert not is_error
        assert json.loads(text)["body"]["data"][0]["owned_by"] == "[REDACTED:openai]"

        is_error, text = await call(client, world, credential="crm", method="GET", path="/x")
        assert is_error and "refused (wrong_tenant)" in text

        task = asyncio.create_task(
            call(client, world, credential="api", method="POST", path="/ask/release", reason="release 1.2")
        )
        approval_id = await wait_pending(broker)
        pending = broker.call(broker.engine.pending)[0]
        assert pending.reason == "release 1.2"
        assert pending.workspace == str(world.acme)
        broker.call(broker.engine.answer, approval_id, "approved")
        is_error, text = await task
        assert not is_error and json.loads(text)["status"] == 200


async def test_stdio_server_in_another_tenant(world: World, broker: BrokerThread) -> None:
    async with Client(stdio_params(world, world.globex)) as client:
        is_error, text = await call(client, world, credential="api", method="GET", path="/echo/x")
        assert not is_error
        assert "[REDACTED:api]" in text
        assert world.upstream.records[-1].header("Authorization") == f"Bearer {world.keys[('globex', 'api')]}"
        is_error, text = await call(client, world, credential="openai", method="GET", path="/models")
        assert is_error and "refused (wrong_tenant)" in text


async def test_stdio_server_in_unmapped_folder(world: World, broker: BrokerThread) -> None:
    async with Client(stdio_params(world, world.unmapped)) as client:
        is_error, text = await call(client, world, credential="api", method="GET", path="/x")
    assert is_error and "refused (unmapped_workspace)" in text


def test_missing_mcp_package_is_one_sentence(world: World) -> None:
    # A python whose `mcp` import fails: the command names the extra to install.
    code = (
        "import sys; sys.modules['mcp'] = None; sys.modules['mcp.server'] = None\n"
        "sys.modules['mcp.server.mcpserver'] = None\n"
        "from outloop_tui.cli import main; sys.exit(main(['mcp']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=world.acme,
        env=world.env(),
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "pip install 'outloop[mcp]'" in proc.stderr
    assert "Traceback" not in proc.stderr
