"""What the agent reads is redacted after the broker's last decode and re-encode (issue 15).

A real upstream on loopback (tests/support/upstream.py) writes the key with every
character as a JSON `\\uXXXX` escape; the broker's /v1/request envelope decodes the
JSON body and writes it out again, so redaction must see the envelope as sent.
"""

from __future__ import annotations

import json

from support.fixtures import BrokerThread, World

from outloop_tui.cmd_mcp import answer_text


def _request(path: str, **extra: object) -> dict[str, object]:
    return {"payload": {"credential": "api", "method": "GET", "path": path, **extra}}


def test_a_json_escaped_key_is_not_unescaped_into_the_envelope(world: World, broker: BrokerThread) -> None:
    results = world.agent(
        world.acme, [_request("/uescape/x"), _request("/uescape/x", query={"upper": "1"})]
    )  # asserts clean
    for result in results:
        assert result["status"] == 200
        envelope = json.loads(result["body"].encode("latin-1"))
        assert envelope["status"] == 200
        assert envelope["body"] == {"key": "[REDACTED:api]"}
        world.assert_clean(answer_text(envelope))  # what the MCP tool prints from it


def test_outloop_call_prints_no_json_escaped_key(world: World, broker: BrokerThread) -> None:
    ran = world.outloop("call", "api", "GET", "/uescape/cli", cwd=world.acme)
    assert ran.returncode == 0, ran.stderr
    world.assert_clean(ran.seen)
    assert "[REDACTED:api]" in ran.stdout
