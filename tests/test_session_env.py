"""What a session's command inherits: no real key from the operator's environment.

`outloop run -- env` runs for real (the console script, a real broker on the test's socket
and on 127.0.0.1) with every key variable of the catalog exported in the operator's own
environment, ANTHROPIC_AUTH_TOKEN among them (Claude Code and Anthropic's SDKs send it as
`Authorization: Bearer`, ahead of ANTHROPIC_API_KEY). What the command printed is its whole
environment: each of those variables is gone, holds the session token, or holds an
`outloop:` placeholder; no real value is anywhere in it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.fixtures import OUTLOOP, BrokerThread, World

from broker.calls.sessions import TOKEN_PREFIX
from broker.config import ConfigEditor
from broker.providers import KEY_VARIABLES
from broker.secrets import Secret, SecretStore

ANTHROPIC_KEY = "sk-ant-api03-acme-anthropic-Q9+zT4k/Lw7Hq2Pk81"


@pytest.fixture
def served(world: World) -> Iterator[BrokerThread]:
    """acme also has an Anthropic credential; the broker listens on loopback TCP."""
    editor = ConfigEditor(world.paths)
    editor.add_credential(
        "acme",
        "anthropic",
        {"base_url": f"{world.upstream.url}/anthropic", "auth": "header:x-api-key", "allow": ["POST /v1/messages"]},
    )
    editor.raw.setdefault("broker", {})["listen"] = "127.0.0.1:0"
    editor.save()
    SecretStore().set("acme", "anthropic", Secret(ANTHROPIC_KEY))
    world.keys[("acme", "anthropic")] = ANTHROPIC_KEY
    thread = BrokerThread(world.paths).start()
    try:
        yield thread
    finally:
        thread.stop()


def real_value(variable: str) -> str:
    """A key-shaped value of the operator's own, different for every variable."""
    return f"sk-operator-{variable.lower().replace('_', '-')}-Zq9Tr4Lw7Hq2Pk81"


def test_no_key_of_the_operators_environment_reaches_the_session(world: World, served: BrokerThread) -> None:
    assert "ANTHROPIC_AUTH_TOKEN" in KEY_VARIABLES and "GITHUB_TOKEN" in KEY_VARIABLES
    operator = {var: real_value(var) for var in sorted(KEY_VARIABLES)}
    operator["OPENAI_API_KEY"] = world.keys[("acme", "openai")]  # a managed secret exported by hand
    operator["ANTHROPIC_AUTH_TOKEN"] = "sk-ant-oat01-operator-login-Zq9Tr4Lw7Hq2Pk81"
    operator["STRIPE_SECRET_KEY"] = "outloop:acme/api"  # a placeholder is no key: it may stay
    ran = world.run([OUTLOOP, "run", "--", "env"], world.acme, env=world.env(**operator))
    assert ran.returncode == 0, ran.stderr
    world.assert_clean(ran.seen)
    agent = dict(line.split("=", 1) for line in ran.stdout.splitlines() if "=" in line)
    token = agent["OUTLOOP_SESSION"]
    assert token.startswith(TOKEN_PREFIX)
    for var, value in operator.items():
        assert value not in ran.seen or value.startswith("outloop:"), var
        assert agent.get(var) in (None, token, "outloop:acme/api"), var
    # The tenant's providers get the token and the broker; Claude Code's bearer variable is gone,
    # so it sends the token as x-api-key and the broker puts acme's Anthropic key in its place.
    assert agent["ANTHROPIC_API_KEY"] == token and agent["OPENAI_API_KEY"] == token
    assert agent["ANTHROPIC_BASE_URL"] == f"{served.engine.listen_url}/v1/proxy/anthropic"
    assert "ANTHROPIC_AUTH_TOKEN" not in agent
    assert "GITHUB_TOKEN" not in agent and "HF_TOKEN" not in agent and "CLAUDE_API_KEY" not in agent
    assert agent["STRIPE_SECRET_KEY"] == "outloop:acme/api"  # no SDK is pointed at the broker for it


def test_claude_codes_model_traffic_goes_through_the_broker_with_the_tenants_key(
    world: World, served: BrokerThread
) -> None:
    """What Claude Code does with that environment, with curl: POST $ANTHROPIC_BASE_URL/v1/messages
    with `x-api-key: $ANTHROPIC_API_KEY` reaches the upstream with acme's key, never the token,
    and the operator's ANTHROPIC_AUTH_TOKEN is not there to be sent instead."""
    script = (
        'test -z "$ANTHROPIC_AUTH_TOKEN" || exit 9; '
        'curl -sS -X POST "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" '
        "-H 'content-type: application/json' -d '{}' -o /dev/null -w '%{http_code}'"
    )
    operator = world.env(ANTHROPIC_AUTH_TOKEN="sk-ant-oat01-operator-login-Zq9Tr4Lw7Hq2Pk81")
    ran = world.run([OUTLOOP, "run", "--", "sh", "-c", script], world.acme, env=operator)
    assert ran.returncode == 0, ran.seen
    world.assert_clean(ran.seen)
    calls = [r for r in world.upstream.records if r.path.startswith("/anthropic/")]
    assert calls, [r.path for r in world.upstream.records]
    assert calls[-1].header("x-api-key") == ANTHROPIC_KEY
    for record in world.upstream.records:
        assert TOKEN_PREFIX not in str(record.headers) and "operator-login" not in str(record.headers)
