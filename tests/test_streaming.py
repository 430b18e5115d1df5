"""Answers that stream through /v1/proxy: as they arrive, redacted, bounded, ended with the caller.

Real parts throughout: the broker serves on its socket in a thread, the agents are
subprocesses in acme's folder (an httpx2 client, the openai and anthropic SDKs),
the upstream is a real HTTP server on loopback whose gated streams send their next
chunk only when the test says so. "Arrived before the upstream sent the next" is then
a fact the test checks, not a timing.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from support.connect_proxy import ConnectProxy, Socks5Proxy
from support.fixtures import OUTLOOP, BrokerThread, World, wait_for
from support.upstream import Upstream

from broker.calls.sessions import TOKEN_PREFIX
from broker.config import ConfigEditor
from broker.secrets import Secret, SecretStore

STREAM_KEY = "sk-stream-Kq81ZmT4vXa9Lw2Rp7Ny3Hd"

# Streams one call over the socket and prints each piece of the body as it arrives (a
# JSON string per line), then "END <status>", or "BROKEN" if the stream did not end whole.
STREAM_AGENT = r"""
import json, sys
import httpx2 as httpx
client = httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1]), timeout=120)
method, target = sys.argv[2], sys.argv[3]
body = sys.argv[4].encode() if len(sys.argv) > 4 else None
with client.stream(method, "http://outloop" + target, content=body, headers={"Authorization": "Bearer dummy"}) as r:
    print(json.dumps({"status": r.status_code, "headers": dict(r.headers)}), flush=True)
    try:
        for piece in r.iter_raw():
            print(json.dumps(piece.decode("utf-8", "replace")), flush=True)
    except httpx.HTTPError as e:
        print("BROKEN " + type(e).__name__, flush=True)
        sys.exit(0)
print("END", flush=True)
"""


@pytest.fixture
def sworld(world: World) -> World:
    """The world plus acme's "stream" credential, on the upstream's gated routes."""
    editor = ConfigEditor(world.paths)
    editor.add_credential(
        "acme",
        "stream",
        {"base_url": f"{world.upstream.url}/gated", "auth": "bearer", "allow": ["GET /**", "POST /**"]},
    )
    editor.save()
    SecretStore().set("acme", "stream", Secret(STREAM_KEY))
    world.keys[("acme", "stream")] = STREAM_KEY
    return world


@pytest.fixture
def sbroker(sworld: World) -> Iterator[BrokerThread]:
    thread = BrokerThread(sworld.paths).start()
    try:
        yield thread
    finally:
        sworld.upstream.release()
        thread.stop()


class Agent:
    """A streaming agent process; `line()` is the next thing it printed."""

    def __init__(self, world: World, command: list[str]) -> None:
        self.world = world
        self.proc = subprocess.Popen(
            command,
            cwd=world.acme,
            env=world.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.seen: list[str] = []

    def line(self) -> str:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        assert text, f"the agent ended early: {self.proc.stderr.read() if self.proc.stderr else ''}"
        self.world.assert_clean(text)
        self.seen.append(text)
        return text.rstrip("\n")

    def rest(self) -> str:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out = self.proc.stdout.read()  # (not communicate(): it would skip what readline buffered)
        err = self.proc.stderr.read()
        self.proc.wait(120)
        self.world.assert_clean(out + err)
        self.seen.append(out)
        return out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def stream(world: World, method: str, target: str, body: str | None = None) -> Agent:
    argv = [sys.executable, "-c", STREAM_AGENT, str(world.socket), method, target]
    return Agent(world, argv if body is None else [*argv, body])


def sdk_outcome(world: World) -> dict[str, object]:
    """An SDK stops reading at the stream's last event and may hang up before the last
    chunk of the framing: then the call is client_gone, after a 200 answer sent whole."""
    rec = outcome(world)
    assert rec["status"] == 200 or (rec["status"] == "client_gone" and rec["upstream_status"] == 200), rec
    return rec


def outcome(world: World, status: object | None = None) -> dict[str, object]:
    """The last outcome record of acme's stream credential (waiting for it)."""

    def found() -> dict[str, object] | None:
        for rec in reversed(world.audit()):
            if rec.get("event") == "outcome" and rec.get("credential") == "stream":
                if status is None or rec.get("status") == status:
                    return rec
        return None

    return wait_for(found, 30, f"an outcome record with status {status}")


def test_each_event_reaches_the_agent_before_the_upstream_sends_the_next(sworld: World, sbroker: BrokerThread) -> None:
    up = sworld.upstream
    up.stream_parts = [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n"]
    agent = stream(sworld, "GET", "/v1/proxy/stream/sse")
    head = json.loads(agent.line())
    assert head["status"] == 200
    assert head["headers"]["transfer-encoding"] == "chunked" and "content-length" not in head["headers"]
    assert head["headers"]["x-outloop-audit-id"]
    assert json.loads(agent.line()) == "data: one\n\n"  # the upstream holds "two" until step()
    up.step()
    assert json.loads(agent.line()) == "data: two\n\n"
    up.step()
    assert json.loads(agent.line()) == "data: three\n\n"
    assert agent.line() == "END"
    rec = outcome(sworld, 200)
    assert rec["bytes"] == sum(len(p) for p in up.stream_parts)
    assert sworld.upstream.records[-1].header("Authorization") == f"Bearer {STREAM_KEY}"


def test_a_key_split_across_two_chunks_is_redacted_whole(sworld: World, sbroker: BrokerThread) -> None:
    up = sworld.upstream
    key = STREAM_KEY.encode()
    up.stream_parts = [b"data: ok\n\ndata: your token is " + key[:11], key[11:] + b" keep it safe\n\n"]
    agent = stream(sworld, "GET", "/v1/proxy/stream/sse")
    assert json.loads(agent.line())["status"] == 200
    # The complete event goes at once; the line holding half a key waits for its end.
    assert json.loads(agent.line()) == "data: ok\n\n"
    up.step()
    assert json.loads(agent.line()) == "data: your token is [REDACTED:stream] keep it safe\n\n"
    assert agent.line() == "END"
    sworld.assert_clean("".join(agent.seen))
    assert key[:11].decode() not in "".join(agent.seen)


def test_a_caller_that_hangs_up_ends_the_upstream_call(sworld: World, sbroker: BrokerThread) -> None:
    up = sworld.upstream
    up.stream_parts = [b"data: one\n\n", b"data: never sent\n\n"]
    agent = stream(sworld, "GET", "/v1/proxy/stream/sse")
    agent.line()
    assert json.loads(agent.line()) == "data: one\n\n"
    agent.kill()  # while the upstream is quiet: nothing to write, the broker must notice anyway
    assert up.disconnected.wait(30), "the broker kept the upstream call open after its caller left"
    rec = outcome(sworld, "client_gone")
    assert rec["upstream_status"] == 200 and rec["bytes"] == len(b"data: one\n\n")


def test_an_upstream_quiet_for_longer_than_stream_idle_timeout_is_cut(sworld: World) -> None:
    sworld.configure(stream_idle_timeout=1)
    thread = BrokerThread(sworld.paths).start()
    try:
        agent = stream(sworld, "GET", "/v1/proxy/stream/silent")
        assert json.loads(agent.line())["status"] == 200
        assert json.loads(agent.line()) == "data: first\n\n"
        assert agent.line().startswith("BROKEN")  # no last chunk: the client knows it is cut short
        rec = outcome(sworld, "upstream_error")
        assert "went quiet for 1 s" in str(rec["message"]) and "stream_idle_timeout" in str(rec["message"])
    finally:
        sworld.upstream.release()
        thread.stop()


def test_the_head_is_waited_for_upstream_timeout_not_stream_idle_timeout(sworld: World) -> None:
    sworld.configure(upstream_timeout=1)
    thread = BrokerThread(sworld.paths).start()
    try:
        agent = stream(sworld, "GET", "/v1/proxy/stream/hold")
        head = json.loads(agent.line())
        assert head["status"] == 504
        body = json.loads("".join(json.loads(x) for x in agent.rest().splitlines() if x.startswith('"')))
        assert body["error"]["code"] == "upstream_error"
        assert "did not answer within 1 s" in body["error"]["message"]
    finally:
        sworld.upstream.release()
        thread.stop()


def test_a_short_answer_still_goes_back_with_its_length(sworld: World, sbroker: BrokerThread) -> None:
    agent = stream(sworld, "GET", "/v1/proxy/stream/echo/x")
    head = json.loads(agent.line())
    assert head["status"] == 200 and "content-length" in head["headers"], head
    body = json.loads("".join(json.loads(x) for x in agent.rest().splitlines() if x.startswith('"')))
    assert body["echo"]["plain"] == "[REDACTED:stream]"


OPENAI_AGENT = r"""
import sys
import httpx2 as httpx
from openai import OpenAI
client = OpenAI(api_key="sk-dummy-not-a-key", base_url="http://outloop/v1/proxy/stream/v1", max_retries=0,
                http_client=httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1])))
chat = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
for event in chat:
    if event.choices and event.choices[0].delta.content is not None:
        print(repr(event.choices[0].delta.content), flush=True)
print("END", flush=True)
"""

ANTHROPIC_AGENT = r"""
import sys
import httpx2 as httpx
from anthropic import Anthropic
client = Anthropic(api_key="sk-ant-dummy", base_url="http://outloop/v1/proxy/stream", max_retries=0,
                   http_client=httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1])))
with client.messages.stream(model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as s:
    for text in s.text_stream:
        print(repr(text), flush=True)
print("END", flush=True)
"""


def test_the_openai_sdk_streams_through_the_proxy(sworld: World, sbroker: BrokerThread) -> None:
    up = sworld.upstream
    agent = Agent(sworld, [sys.executable, "-c", OPENAI_AGENT, str(sworld.socket)])
    assert agent.line() == repr("echo ")  # the upstream holds every later event until step()
    up.step()
    assert agent.line() == repr("[REDACTED:stream]")
    up.step(2)
    assert agent.line() == "END"
    (rec,) = up.records
    assert rec.header("Authorization") == f"Bearer {STREAM_KEY}" and "sk-dummy-not-a-key" not in rec.text
    sdk_outcome(sworld)


def test_the_anthropic_sdk_streams_through_the_proxy(sworld: World, sbroker: BrokerThread) -> None:
    up = sworld.upstream
    agent = Agent(sworld, [sys.executable, "-c", ANTHROPIC_AGENT, str(sworld.socket)])
    up.step(2)  # content_block_start, then the first text delta
    assert agent.line() == repr("echo ")
    up.step()
    assert agent.line() == repr("[REDACTED:stream]")
    up.step(3)
    assert agent.line() == "END"
    (rec,) = up.records
    assert rec.header("X-Api-Key") is None and rec.header("Authorization") == f"Bearer {STREAM_KEY}"
    sdk_outcome(sworld)


# -- HTTPS through a corporate proxy, with the operator's CA ----------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


CORP_KEY = "tls-key-Zx81Qp4Lm7Rt2Vb9"


@pytest.fixture
def corp(world: World, ca: trustme.CA) -> Iterator[Upstream]:
    """An HTTPS upstream on localhost whose certificate `ca` signed, and acme's "corp"
    credential on it (CORP_KEY in the keyring)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    with Upstream(tls=server_ctx) as https:
        editor = ConfigEditor(world.paths)
        port = https.url.rsplit(":", 1)[1]
        editor.add_credential(
            "acme", "corp", {"base_url": f"https://localhost:{port}", "auth": "bearer", "allow": ["GET /**"]}
        )
        editor.save()
        SecretStore().set("acme", "corp", Secret(CORP_KEY))
        world.keys[("acme", "corp")] = CORP_KEY
        yield https


def trust(world: World, ca: trustme.CA, folder: Path) -> Path:
    """`ca`'s certificate as a bundle file, and [broker] ca_bundle naming it."""
    bundle = folder / "corp-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    editor = ConfigEditor(world.paths)
    editor.raw.setdefault("broker", {})["ca_bundle"] = str(bundle)
    editor.save()
    return bundle


def call_corp(world: World) -> tuple[int, str]:
    """Status and body of GET /v1/proxy/corp/echo/x, through a broker started for it."""
    thread = BrokerThread(world.paths).start()
    try:
        agent = stream(world, "GET", "/v1/proxy/corp/echo/x")
        status = json.loads(agent.line())["status"]
        return status, "".join(json.loads(x) for x in agent.rest().splitlines() if x.startswith('"'))
    finally:
        thread.stop()


def test_https_through_a_connect_proxy_with_a_ca_bundle(
    world: World, ca: trustme.CA, corp: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust(world, ca, tmp_path)
    with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "")
        status, body = call_corp(world)
    assert status == 200 and json.loads(body)["echo"]["plain"] == "[REDACTED:corp]"
    assert proxy.tunnels == [f"localhost:{corp.url.rsplit(':', 1)[1]}"]  # through the proxy, as TLS
    (rec,) = corp.records
    assert rec.header("Authorization") == f"Bearer {CORP_KEY}"


def test_a_stream_through_a_socks5_proxy_from_all_proxy(sworld: World, monkeypatch: pytest.MonkeyPatch) -> None:
    up = sworld.upstream
    up.stream_parts = [b"data: one\n\n", b"data: your token is " + STREAM_KEY.encode() + b"\n\n"]
    with Socks5Proxy() as proxy:
        monkeypatch.setenv("ALL_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "")
        thread = BrokerThread(sworld.paths).start()
        try:
            agent = stream(sworld, "GET", "/v1/proxy/stream/sse")
            assert json.loads(agent.line())["status"] == 200
            assert json.loads(agent.line()) == "data: one\n\n"  # before the upstream sends the next
            up.step()
            assert json.loads(agent.line()) == "data: your token is [REDACTED:stream]\n\n"
            assert agent.line() == "END"
        finally:
            up.release()
            thread.stop()
    assert proxy.tunnels == [up.url.removeprefix("http://")]
    assert up.records[-1].header("Authorization") == f"Bearer {STREAM_KEY}"


@pytest.mark.parametrize("given", ["ca_bundle", "SSL_CERT_FILE"])
def test_an_https_upstream_signed_by_the_operators_ca_is_trusted(
    world: World, ca: trustme.CA, corp: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    bundle = trust(world, ca, tmp_path)
    if given == "SSL_CERT_FILE":
        editor = ConfigEditor(world.paths)
        del editor.raw["broker"]["ca_bundle"]
        editor.save()
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    status, body = call_corp(world)  # on the broker's own pool: no proxy
    assert status == 200 and json.loads(body)["echo"]["plain"] == "[REDACTED:corp]"
    (rec,) = corp.records
    assert rec.header("Authorization") == f"Bearer {CORP_KEY}"


def test_an_upstream_certificate_the_ca_bundle_does_not_vouch_for_is_refused(
    world: World, corp: Upstream, tmp_path: Path
) -> None:
    trust(world, trustme.CA(), tmp_path)  # another CA
    status, _ = call_corp(world)
    assert status == 502
    assert corp.records == []  # the handshake failed: no request, no key, was sent


def test_http2_when_the_operator_turns_it_on(world: World, ca: trustme.CA, tmp_path: Path) -> None:
    from support.h2_upstream import H2Upstream  # (h2 is a test dependency)

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    key = "h2-key-Zx81Qp4Lm7Rt2Vb9Nc"
    with H2Upstream(server_ctx) as h2up:
        editor = ConfigEditor(world.paths)
        editor.raw.setdefault("broker", {}).update(ca_bundle=str(bundle), http2=True)
        editor.add_credential(
            "acme", "h2", {"base_url": f"https://localhost:{h2up.port}/api", "auth": "bearer", "allow": ["GET /**"]}
        )
        editor.save()
        SecretStore().set("acme", "h2", Secret(key))
        world.keys[("acme", "h2")] = key
        thread = BrokerThread(world.paths).start()
        try:
            for target in ("/v1/proxy/h2/items", None):  # streamed path, then /v1/request (whole)
                if target is None:
                    (result,) = world.agent(
                        world.acme, [{"payload": {"credential": "h2", "method": "GET", "path": "/items"}}]
                    )
                    assert result["status"] == 200, result["body"][:300]
                    doc = json.loads(result["body"])["body"]
                else:
                    agent = stream(world, "GET", target)
                    assert json.loads(agent.line())["status"] == 200
                    doc = json.loads("".join(json.loads(x) for x in agent.rest().splitlines() if x.startswith('"')))
                assert doc == {"protocol": "h2", "auth": "Bearer [REDACTED:h2]"}
        finally:
            thread.stop()
    assert [(m, p) for m, p, _ in h2up.requests] == [("GET", "/api/items")] * 2
    assert all(a == f"Bearer {key}" for _, _, a in h2up.requests)


SESSION_OPENAI_AGENT = r"""
from openai import OpenAI
client = OpenAI(max_retries=0)  # OPENAI_BASE_URL and OPENAI_API_KEY come from outloop run
chat = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
for event in chat:
    if event.choices and event.choices[0].delta.content is not None:
        print(repr(event.choices[0].delta.content), flush=True)
print("END", flush=True)
"""


def test_an_sdk_in_a_session_streams_over_loopback_tcp(world: World) -> None:
    """`outloop run` sets OPENAI_BASE_URL to the broker's TCP listener and the key to the
    session token; the stream arrives event by event, redacted, the token never upstream."""
    up = world.upstream
    editor = ConfigEditor(world.paths)
    editor.raw["tenants"]["acme"]["credentials"]["openai"]["base_url"] = f"{up.url}/gated/v1"
    editor.raw.setdefault("broker", {})["listen"] = "127.0.0.1:0"
    editor.save()
    thread = BrokerThread(world.paths).start()
    try:
        agent = Agent(world, [OUTLOOP, "run", "--", sys.executable, "-c", SESSION_OPENAI_AGENT])
        assert agent.line() == repr("echo ")  # before the upstream sends the next event
        up.step()
        assert agent.line() == repr("[REDACTED:openai]")
        up.step(2)
        assert agent.line() == "END"
        agent.rest()
    finally:
        up.release()
        thread.stop()
    (rec,) = up.records
    assert rec.header("Authorization") == f"Bearer {world.keys[('acme', 'openai')]}"
    assert TOKEN_PREFIX not in rec.text  # the session token stayed with the broker
    calls = [r for r in world.audit() if r.get("event") == "outcome" and r.get("credential") == "openai"]
    assert calls and calls[-1].get("identity") == "session"
