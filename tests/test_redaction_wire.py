"""What the agent reads is redacted after the broker's last decode and re-encode, in
every form the key may take (issue 15).

A real upstream on loopback (tests/support/upstream.py) writes the key with every
character as a JSON `\\uXXXX` escape; the broker's /v1/request envelope decodes the
JSON body and writes it out again, so redaction must see the envelope as sent.
"""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from support.fixtures import KEYS, BrokerThread, World, secret_forms
from support.upstream import echoes

from broker.leaks.redact import with_leak_rules
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


@pytest.mark.parametrize("many", [False, True], ids=["one secret", "every secret (prefiltered)"])
def test_the_sweep_finds_every_encoded_form_of_every_key(many: bool) -> None:
    """Each key in every encoding the test upstream echoes, in text and in bytes that
    are not UTF-8, alone and with neighbours: no form of it (both lists computed in
    tests/support, not by broker/) is left."""
    for (tenant, name), key in KEYS.items():
        secrets = [(c, k) for (_t, c), k in KEYS.items()] if many else [(name, key)]
        redactor = with_leak_rules(secrets)
        forms = secret_forms(key)
        for label, echo in echoes(key).items():
            for text in (echo, f"x{echo}y", f'{{"v": "{echo}"}}\n', f"{echo} tail", json.dumps(echo)):
                out = redactor.text(text)
                blob = redactor.bytes(b"\xff\xfe" + text.encode("utf-8")).decode("latin-1")
                left = [f for f, form in forms.items() if form in out or form.encode("utf-8").decode("latin-1") in blob]
                assert not left, f"{tenant}/{name}: echoed as {label}, still found as {left}"


def test_a_key_in_a_header_name_is_redacted() -> None:
    key = KEYS[("acme", "api")]
    redactor = with_leak_rules([("api", key)])
    out = redactor.headers([(f"X-Named-{key.encode().hex()}", "v"), ("X-Plain", "ok")])
    assert out == [("X-Outloop-Redacted", "v"), ("X-Plain", "ok")]


def test_basic_auth_is_redacted_as_the_whole_user_and_key(world: World, broker: BrokerThread) -> None:
    item = {"payload": {"credential": "legacy", "method": "GET", "path": "/echo/b"}}
    (result,) = world.agent(world.acme, [item])
    envelope = json.loads(result["body"].encode("latin-1"))
    assert envelope["body"]["echo"]["b64_basic"] == "[REDACTED:legacy]"
    assert envelope["headers"]["x-echo-b64-basic"] == "[REDACTED:legacy]"


def test_a_gzip_or_zlib_body_that_does_not_say_so_is_redacted_inside(world: World, broker: BrokerThread) -> None:
    items = [
        {"method": "GET", "target": "/v1/proxy/api/sneaky/x"},
        {"method": "GET", "target": "/v1/proxy/api/sneaky/x?z=1"},
    ]
    gz, zl = world.agent(world.acme, items)
    for result, unpack in ((gz, gzip.decompress), (zl, zlib.decompress)):
        assert result["status"] == 200
        inner = unpack(result["body"].encode("latin-1"))  # still the upstream's packing
        world.assert_clean(inner)
        assert json.loads(inner)["echo"]["plain"] == "[REDACTED:api]"
