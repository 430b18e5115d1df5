"""The broker end to end, on real parts (DESIGN §2-§6).

A real upstream on loopback (tests/upstream.py) records what it receives and echoes
the credential back in every encoding; the broker serves on a real Unix socket; the
callers are real subprocesses started in the acme workspace, the globex workspace, an
unmapped folder, and under an acme agent whose child shell `cd`s into globex.
"""

from __future__ import annotations

import base64
import bz2
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.fixtures import OUTLOOP, BrokerThread, World, wait_for  # noqa: E402

from broker.events import ApprovalRequested, ApprovalResolved, ConfigRejected, ConfigReloaded  # noqa: E402


def req(credential: str, method: str, path: str, **extra: Any) -> dict[str, Any]:
    """An agent item posting to /v1/request."""
    return {"payload": {"credential": credential, "method": method, "path": path, **extra}}


def envelope(result: dict[str, Any]) -> dict[str, Any]:
    assert result["status"] == 200, result["body"][:300]
    doc: dict[str, Any] = json.loads(result["body"].encode("latin-1"))  # the agent read bytes as latin-1
    return doc


def error_of(result: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(result["body"].encode("latin-1"))
    error: dict[str, Any] = doc["error"]
    return error


def audit_by_id(world: World, audit_id: str) -> dict[str, Any]:
    found = [r for r in world.audit() if r["id"] == audit_id]
    assert found, f"no audit record {audit_id}"
    return found[0]


# -- the right credential, and no secret in anything the agent sees ----------------------


def test_each_tenant_gets_its_own_credential_and_sees_no_secret(world: World, broker: BrokerThread) -> None:
    items = [req("api", "GET", f"/{kind}/x", headers={"X-Nonce": kind}) for kind in ("echo", "text", "binary")]
    items.append(req("api", "POST", "/echo/posted", body={"hello": "world"}))
    items.append({"method": "GET", "target": "/v1/proxy/api/text/raw"})
    items.append({"method": "GET", "target": "/v1/proxy/api/binary/raw"})
    items.append({"method": "GET", "target": "/v1/proxy/api/compressed/gz", "headers": {"Accept-Encoding": "gzip"}})
    for tenant, folder in (("acme", world.acme), ("globex", world.globex)):
        world.upstream.clear()
        results = world.agent(folder, items)  # asserts stdout/stderr hold no secret
        key = world.keys[(tenant, "api")]
        received = world.upstream.records
        assert len(received) == len(items)
        for rec in received:
            assert rec.path.startswith(f"/{tenant}/")
            assert rec.header("Authorization") == f"Bearer {key}"
        for result in results:
            assert result["status"] == 200
            for name, _value in result["headers"]:
                assert name.lower() != "set-cookie"
        doc = envelope(results[0])
        assert doc["status"] == 200
        assert doc["body"]["path"] == f"/{tenant}/echo/x"
        assert doc["body"]["echo"]["plain"] == "[REDACTED:api]"
        assert doc["headers"]["x-echo-plain"] == "[REDACTED:api]"
        assert doc["headers"]["x-nonce"] == "echo"
        assert json.loads(envelope(results[3])["body"]["body"]) == {"hello": "world"}
        proxied = results[4]
        assert "plain=[REDACTED:api]" in proxied["body"]
        assert "X-Outloop-Audit-Id" in dict(proxied["headers"])
        # A header value outside ASCII passes through as the upstream sent it.
        assert dict((k.lower(), v) for k, v in proxied["headers"])["x-filename"] == "caf\u00e9.txt"
        assert doc["headers"]["x-filename"] == "caf\u00e9.txt"


def test_every_auth_kind_is_injected_and_redacted(world: World, broker: BrokerThread) -> None:
    results = world.agent(
        world.acme, [req("search", "GET", "/echo/q", query={"key": "agent-supplied"}), req("legacy", "GET", "/echo/b")]
    )
    results += world.agent(world.globex, [req("crm", "GET", "/echo/h", headers={"X-Api-Key": "dummy"})])
    search, legacy, crm = world.upstream.records
    assert dict(search.query)["key"] == world.keys[("acme", "search")]
    assert [k for k, _ in search.query].count("key") == 1  # the agent's own key= is dropped
    token = base64.b64encode(f"user:{world.keys[('acme', 'legacy')]}".encode()).decode()
    assert legacy.header("Authorization") == f"Basic {token}"
    assert crm.header("X-Api-Key") == world.keys[("globex", "crm")]
    assert crm.header("Authorization") is None
    for result in results:
        assert envelope(result)["status"] == 200


def test_outloop_call_prints_a_redacted_body(world: World, broker: BrokerThread) -> None:
    for path in ("/echo/cli", "/text/cli", "/binary/cli"):
        ran = world.outloop("call", "api", "GET", path, "-H", "X-Nonce: n1", "--include", cwd=world.acme)
        assert ran.returncode == 0, ran.stderr
        world.assert_clean(ran.seen)
    assert world.upstream.records[0].header("Authorization") == f"Bearer {world.keys[('acme', 'api')]}"


def test_the_agent_cannot_pick_an_encoding_the_broker_cannot_read(world: World, broker: BrokerThread) -> None:
    """A body compressed in a way the broker cannot decode would carry the key past redaction."""
    results = world.agent(
        world.acme, [{"method": "GET", "target": "/v1/proxy/api/compressed/x", "headers": {"Accept-Encoding": "bzip2"}}]
    )
    assert results[0]["status"] == 200
    body = results[0]["body"].encode("latin-1")
    with contextlib.suppress(OSError):
        body = bz2.decompress(body)
    world.assert_clean(body)
    assert world.upstream.records[0].header("Accept-Encoding") != "bzip2"
    # An upstream that compresses anyway, in a coding the broker cannot read, is an error.
    (forced,) = world.agent(world.acme, [{"method": "GET", "target": "/v1/proxy/api/compressed/x?force=bzip2"}])
    assert forced["status"] == 502
    assert error_of(forced)["code"] == "upstream_error"


def test_a_redirect_to_another_host_goes_back_to_the_agent(world: World, broker: BrokerThread) -> None:
    target = f"{world.other_host.url}/landed"
    results = world.agent(
        world.acme,
        [
            req("api", "GET", "/redirect", query={"to": target}),
            {"method": "GET", "target": f"/v1/proxy/api/redirect?to={target}"},
        ],
    )
    doc = envelope(results[0])
    assert doc["status"] == 302
    assert doc["headers"]["location"].startswith(target + "?token=")
    assert "[REDACTED:api]" in doc["headers"]["location"]
    proxied = results[1]
    assert proxied["status"] == 302
    assert dict((k.lower(), v) for k, v in proxied["headers"])["location"].startswith(target)
    assert world.other_host.records == []
    assert len(world.upstream.records) == 2
    ran = world.outloop("call", "api", "GET", "/redirect", "-q", f"to={target}", cwd=world.acme)
    assert ran.returncode == 1  # an upstream non-2xx
    assert world.other_host.records == []


def test_huge_and_slow_upstreams_are_upstream_errors_with_live_limits(world: World, broker: BrokerThread) -> None:
    (fine,) = world.agent(world.acme, [req("api", "GET", "/huge", query={"n": "20000"})])
    assert envelope(fine)["status"] == 200
    world.configure(max_response_bytes=10000, upstream_timeout=0.3)  # while the broker runs
    huge, slow = world.agent(
        world.acme, [req("api", "GET", "/huge", query={"n": "20000"}), req("api", "GET", "/slow", query={"s": "3"})]
    )
    assert (huge["status"], error_of(huge)["code"]) == (502, "upstream_error")
    assert (slow["status"], error_of(slow)["code"]) == (504, "upstream_error")
    outcomes = [r for r in world.audit() if r.get("event") == "outcome"]
    assert [r["status"] for r in outcomes[-2:]] == ["upstream_error", "upstream_error"]
    ran = world.outloop("call", "api", "GET", "/slow", "-q", "s=3", cwd=world.acme)
    assert ran.returncode == 2 and "upstream_error" in ran.stderr


# -- refusals: right code, audited, never upstream ----------------------------------------

RAW_MALFORMED = [
    "GARBAGE\r\n\r\n",
    "GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    "POST /v1/request HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + "\x00" * 40,  # a TLS hello
    "GET /v1/proxy/api/echo/x HTTP/1.1\r\nHost: x\r\nX-A: b\rX-Injected: 1\r\n\r\n",
    "GET /v1/proxy/api/echo/x HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
]

REFUSALS: list[tuple[str, str, dict[str, Any], str]] = [
    # (id, folder, item, code)
    ("wrong-tenant-credential", "acme", req("crm", "GET", "/echo/x"), "wrong_tenant"),
    ("wrong-tenant-claim", "acme", req("api", "GET", "/echo/x", tenant="globex"), "wrong_tenant"),
    ("wrong-tenant-proxy", "globex", {"method": "GET", "target": "/v1/proxy/openai/models"}, "wrong_tenant"),
    ("unmapped", "unmapped", req("api", "GET", "/echo/x"), "unmapped_workspace"),
    ("unmapped-proxy", "unmapped", {"method": "GET", "target": "/v1/proxy/api/echo/x"}, "unmapped_workspace"),
    ("unknown-credential", "acme", req("nope", "GET", "/echo/x"), "unknown_credential"),
    ("deny-rule", "acme", req("api", "DELETE", "/echo/x"), "denied_by_policy"),
    ("deny-rule-lowercase", "acme", req("api", "delete", "/echo/x"), "denied_by_policy"),
    ("deny-rule-admin", "acme", req("api", "GET", "/admin/users"), "denied_by_policy"),
    ("no-rule", "acme", req("api", "PUT", "/echo/x"), "denied_by_policy"),
    ("no-rule-proxy", "acme", {"method": "PATCH", "target": "/v1/proxy/api/echo/x", "body": "{}"}, "denied_by_policy"),
    ("dotdot", "acme", req("api", "GET", "/echo/../admin/x"), "bad_request"),
    ("dotdot-encoded", "acme", req("api", "GET", "/echo/%2e%2e/admin/x"), "bad_request"),
    ("dotdot-encoded-upper", "acme", req("api", "GET", "/echo/%2E%2E/admin"), "bad_request"),
    ("dotdot-encoded-slash", "acme", req("api", "GET", "/echo/..%2fadmin"), "bad_request"),
    ("dotdot-proxy", "acme", {"method": "GET", "target": "/v1/proxy/api/echo/../../admin/x"}, "bad_request"),
    ("dotdot-proxy-encoded", "acme", {"method": "GET", "target": "/v1/proxy/api/echo/%2e%2e/%2e%2e/x"}, "bad_request"),
    ("absolute-url-path", "acme", req("api", "GET", "http://evil/x"), "bad_request"),
    ("absolute-form-target", "acme", {"method": "GET", "target": "http://evil/x"}, "bad_request"),
    ("absolute-form-proxy", "acme", {"method": "GET", "target": "http://evil/v1/proxy/api/echo/x"}, "bad_request"),
    (
        "absolute-form-request",
        "acme",
        {
            "method": "POST",
            "target": "http://evil/v1/request",
            "body": json.dumps(req("api", "GET", "/echo/x")["payload"]),
        },
        "bad_request",
    ),
    ("other-host-path", "acme", req("api", "GET", "//evil/x"), "bad_request"),
    ("other-host-proxy", "acme", {"method": "GET", "target": "/v1/proxy/api//evil/x"}, "bad_request"),
    ("url-in-proxy-path", "acme", {"method": "GET", "target": "/v1/proxy/api/http://evil/x"}, "bad_request"),
    ("query-in-path", "acme", req("api", "GET", "/echo/x?key=mine"), "bad_request"),
    ("crlf-header-value", "acme", req("api", "GET", "/echo/x", headers={"X-A": "b\r\nX-Injected: 1"}), "bad_request"),
    ("crlf-header-name", "acme", req("api", "GET", "/echo/x", headers={"X-A\r\nX-Injected": "1"}), "bad_request"),
    ("space-in-header-name", "acme", req("api", "GET", "/echo/x", headers={"X A": "1"}), "bad_request"),
    ("newline-after-header-name", "acme", req("api", "GET", "/echo/x", headers={"X-A\n": "1"}), "bad_request"),
    ("non-ascii-header-value", "acme", req("api", "GET", "/echo/x", headers={"X-A": "café"}), "bad_request"),
    (
        "non-ascii-proxy-header",
        "acme",
        {"raw": "GET /v1/proxy/api/echo/x HTTP/1.1\r\nHost: x\r\nX-A: caf\xe9\r\n\r\n"},
        "bad_request",
    ),
    ("malformed-json", "acme", {"method": "POST", "target": "/v1/request", "body": "{not json"}, "bad_request"),
    ("json-not-object", "acme", {"method": "POST", "target": "/v1/request", "body": "[1, 2]"}, "bad_request"),
    (
        "json-missing-path",
        "acme",
        {"method": "POST", "target": "/v1/request", "body": '{"credential": "api", "method": "GET"}'},
        "bad_request",
    ),
    ("json-bad-method", "acme", req("api", "GET /x HTTP/1.1\r\n", "/echo/x"), "bad_request"),
    *[(f"malformed-http-{i}", "acme", {"raw": raw}, "bad_request") for i, raw in enumerate(RAW_MALFORMED)],
]


def _exchange(path: Path, data: bytes, *, hang_up: bool = True) -> bytes:
    """Send raw bytes on the broker socket and read until the broker closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(data)
        if hang_up:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_expect_100_continue_is_answered_before_the_body(world: World, broker: BrokerThread) -> None:
    doc = json.dumps({"credential": "api", "method": "GET", "path": "/echo/x"}).encode()
    head = b"POST /v1/request HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(doc)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(world.socket))
        s.sendall(head)
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"  # asked for, before the body
        s.sendall(doc)
        s.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    # This caller's folder maps to no tenant: the body was read and the call judged.
    assert answer.startswith(b"HTTP/1.1 403 ") and b"unmapped_workspace" in answer
    # A body declared over the cap is refused at once, without asking for it.
    over = head.replace(b"Content-Length: %d" % len(doc), b"Content-Length: 999999999")
    refused = _exchange(world.socket, over)
    assert refused.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in refused


def test_the_socket_speaks_http_1_1_as_clients_expect(world: World, broker: BrokerThread) -> None:
    health = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    # Pipelined requests are answered in order.
    assert _exchange(world.socket, health * 3).count(b"HTTP/1.1 200 OK\r\n") == 3
    # An HTTP/1.0 caller without keep-alive is answered, and the broker closes.
    old = _exchange(world.socket, b"GET /v1/health HTTP/1.0\r\n\r\n", hang_up=False)
    assert old.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in old
    # HEAD: the length of the answer, not the answer.
    head, _, body = _exchange(world.socket, health.replace(b"GET", b"HEAD")).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 0" not in head and body == b""
    # A chunked body is read whole (this caller's folder maps to no tenant: it got that far).
    doc = json.dumps({"credential": "api", "method": "GET", "path": "/echo/x"}).encode()
    chunked = (
        b"POST /v1/request HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(doc), doc)
    )
    answer = _exchange(world.socket, chunked)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"X-Outloop-Error: unmapped_workspace" in answer
    # A head too large to be a request, and a protocol upgrade, are refused and audited.
    huge = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
    too_big = _exchange(world.socket, huge)
    assert too_big.startswith(b"HTTP/1.1 431 ") and b"bad_request" in too_big
    endless = _exchange(world.socket, huge[:-4] + b"a" * 100_000)  # a head that never ends
    assert endless.startswith(b"HTTP/1.1 431 ")
    upgrade = _exchange(
        world.socket, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert upgrade.startswith(b"HTTP/1.1 400 ") and b"upgrades are not supported" in upgrade
    assert world.upstream.records == []


def test_trailers_and_chunk_extensions_are_capped_like_a_head(world: World, broker: BrokerThread) -> None:
    """What a chunked body carries besides its data is not buffered without end."""
    chunked = b"POST /v1/request HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n"
    for rest in (
        b"0\r\nX-Trailer: " + b"a" * 150_000,  # a trailer that never ends
        b"0\r\n" + b"X-Trailer: a\r\n" * 12_000,  # trailers without end
        b"1;ext=" + b"a" * 150_000,
    ):  # a chunk extension that never ends
        answer = _exchange(world.socket, chunked + rest)
        assert answer.startswith(b"HTTP/1.1 431 ") and b"bad_request" in answer, answer[:200]


def test_whole_requests_read_with_a_malformed_one_are_answered_first(world: World, broker: BrokerThread) -> None:
    health = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    upgrade = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    for bad in (b"GARBAGE\r\n\r\n", upgrade):
        answers = _exchange(world.socket, health + bad)
        assert answers.startswith(b"HTTP/1.1 200 OK\r\n"), answers[:200]
        assert answers.count(b"HTTP/1.1 200 ") == 1
        refusal = json.loads(answers[answers.index(b"HTTP/1.1 400 ") :].partition(b"\r\n\r\n")[2])
        assert audit_by_id(world, refusal["error"]["audit_id"])["decision"] == "bad_request"


def test_a_kept_alive_connection_gets_the_body_cap_of_the_next_call(world: World, broker: BrokerThread) -> None:
    """[broker] limits apply from the next call, on a connection opened before the change too."""

    def call(s: socket.socket, reason: str) -> bytes:
        doc = json.dumps({"credential": "api", "method": "GET", "path": "/echo/x", "reason": reason})
        s.sendall(b"POST /v1/request HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(doc), doc.encode()))
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0])
        while len(body) < length:
            body += s.recv(65536)
        return head

    doc = json.dumps({"credential": "api", "method": "GET", "path": "/echo/x"}).encode()
    world.configure(max_request_bytes=2048)
    _exchange(
        world.socket, b"POST /v1/request HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(doc), doc)
    )  # a call: the broker reads the cap of 2048
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(world.socket))
        world.configure(max_request_bytes=20_000)
        assert call(s, "").startswith(b"HTTP/1.1 403 ")  # this folder maps to no tenant
        assert call(s, "r" * 5000).startswith(b"HTTP/1.1 403 ")


def test_proxy_headers_are_read_as_h11_read_them(world: World, broker: BrokerThread) -> None:
    """Whitespace around a value is not part of it; trailers are not headers (RFC 9110 §5.5, §6.5)."""
    raw = (
        "POST /v1/proxy/api/echo/ws HTTP/1.1\r\nHost: x\r\nX-Nonce: padded \t\r\n"
        "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    (result,) = world.agent(world.acme, [{"raw": raw}])
    assert result["status"] == 200, result["body"][:300]
    (received,) = world.upstream.records
    assert received.header("X-Nonce") == "padded" and received.header("X-Trailer") is None


def test_refusals_are_coded_audited_and_never_reach_upstream(world: World, broker: BrokerThread) -> None:
    """Every case of REFUSALS, one agent process per folder (a process per case is slow)."""
    folders = {"acme": world.acme, "globex": world.globex, "unmapped": world.unmapped}
    problems: list[str] = []
    for folder, cwd in folders.items():
        cases = [(name, item, code) for name, where, item, code in REFUSALS if where == folder]
        results = world.agent(cwd, [item for _, item, _ in cases])
        for (name, _item, code), result in zip(cases, results, strict=True):
            if not 400 <= result["status"] < 500:
                problems.append(f"{name}: HTTP {result['status']}")
                continue
            error = error_of(result)
            if error["code"] != code:
                problems.append(f"{name}: {error['code']} instead of {code}")
            elif not error["audit_id"]:
                problems.append(f"{name}: not audited")
            elif audit_by_id(world, error["audit_id"])["decision"] != code:
                problems.append(f"{name}: audited with another decision")
    assert not problems
    assert world.upstream.records == []
    world.assert_clean(world.audit_bytes())


def test_an_oversized_body_is_refused(world: World, broker: BrokerThread) -> None:
    world.configure(max_request_bytes=2048)
    big = "x" * 5000
    items = [
        req("api", "POST", "/echo/big", body=big),
        {"method": "POST", "target": "/v1/proxy/api/echo/big", "body": big},
    ]
    for result in world.agent(world.acme, items):
        assert result["status"] == 413
        error = error_of(result)
        assert error["code"] == "bad_request"
        assert audit_by_id(world, error["audit_id"])["decision"] == "bad_request"
    assert world.upstream.records == []
    # Just under the cap still goes through.
    (ok,) = world.agent(world.acme, [req("api", "POST", "/echo/small", body="y" * 1000)])
    assert envelope(ok)["status"] == 200


def test_a_child_shell_that_cds_into_another_tenant_is_refused(world: World, broker: BrokerThread) -> None:
    """An agent started in acme runs a shell that cds into globex: the tree spans two tenants."""
    agent = (
        "import subprocess, sys\n"
        "r = subprocess.run(['bash', '-c', sys.argv[1]], capture_output=True, text=True)\n"
        "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); sys.exit(r.returncode)\n"
    )
    ran = world.python(agent, f"cd ../globex && {OUTLOOP} call api GET /echo/x", cwd=world.acme)
    assert ran.returncode == 2, ran.seen
    assert "wrong_tenant" in ran.stderr
    world.assert_clean(ran.seen)
    ran = world.python(agent, f"cd ../globex && {OUTLOOP} whoami", cwd=world.acme)
    assert ran.returncode == 2
    assert "wrong_tenant" in ran.stderr
    assert world.upstream.records == []
    records = [r for r in world.audit() if r.get("decision") == "wrong_tenant"]
    assert records and records[-1]["tenant"] == "globex"
    # The same shell started in acme and staying there is fine.
    ran = world.python(agent, f"cd . && {OUTLOOP} call api GET /echo/x", cwd=world.acme)
    assert ran.returncode == 0, ran.seen


# -- audit ------------------------------------------------------------------------------


def _verify(world: World, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = world.env()
    if home is not None:
        env["OUTLOOP_HOME"] = str(home)
    return subprocess.run(
        [OUTLOOP, "audit", "verify"], cwd=world.unmapped, env=env, capture_output=True, text=True, timeout=60
    )


def _tampered_copy(world: World, tmp_path: Path, name: str, change: Any) -> Path:
    home = tmp_path / f"copy-{name}"
    shutil.copytree(world.paths.state_dir, home / "state")
    (day,) = sorted((home / "state" / "audit").glob("audit-*.jsonl"))
    lines = day.read_bytes().splitlines(keepends=True)
    day.write_bytes(b"".join(change(lines)))
    return home


def test_audit_verifies_after_traffic_and_finds_any_tampering(
    world: World, broker: BrokerThread, tmp_path: Path
) -> None:
    world.agent(
        world.acme,
        [
            req("api", "GET", "/echo/a"),
            req("api", "DELETE", "/echo/a"),
            req("crm", "GET", "/echo/a"),
            req("api", "GET", "/text/a"),
        ],
    )
    world.agent(world.globex, [req("api", "GET", "/echo/b"), req("crm", "GET", "/echo/b")])
    world.agent(world.unmapped, [req("api", "GET", "/echo/c")])
    broker.stop()
    ok = _verify(world)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "audit chain OK" in ok.stdout
    world.assert_clean(world.audit_bytes())
    records = world.audit()
    assert len(records) >= 10
    events = {(r.get("tenant"), r.get("event"), r.get("decision")) for r in records}
    assert ("acme", "attempt", "allow") in events
    assert ("acme", "outcome", "allow") in events
    assert ("acme", "attempt", "denied_by_policy") in events
    assert (None, "attempt", "unmapped_workspace") in events

    def edit(lines: list[bytes]) -> list[bytes]:
        lines[2] = lines[2].replace(b'"acme"', b'"globex"', 1)
        return lines

    changes = {
        "edit": edit,
        "delete-middle": lambda lines: lines[:3] + lines[4:],
        "delete-last": lambda lines: lines[:-1],
        "delete-first": lambda lines: lines[1:],
        "reorder": lambda lines: lines[:2] + [lines[3], lines[2]] + lines[4:],
    }
    for name, change in changes.items():
        bad = _verify(world, _tampered_copy(world, tmp_path, name, change))
        assert bad.returncode == 1, (name, bad.stdout, bad.stderr)
        assert "BROKEN" in bad.stderr


def test_kill_9_in_the_middle_of_200_calls_leaves_a_chain_that_verifies(world: World, tmp_path: Path) -> None:
    env = world.env()
    log = open(tmp_path / "broker.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [OUTLOOP, "broker"], cwd=world.unmapped, env=env, stdout=log, stderr=log, start_new_session=True
    )
    try:
        wait_for(lambda: world.outloop("whoami", cwd=world.acme).returncode == 0, 30, "the broker")
        world.upstream.clear()
        items = [req("api", "GET", f"/hold/{i}") for i in range(200)]
        agent = world.agent_popen(world.acme, items, threads=200)
        wait_for(lambda: len(world.upstream.records) >= 50, 60, "calls reaching the upstream")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        world.upstream.release()
        out, err = agent.communicate(timeout=120)
        world.assert_clean(out + err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    before = _verify(world)
    assert before.returncode == 0, before.stdout + before.stderr
    # Every call the upstream saw was audited before it was sent.
    audited = {r["path"] for r in world.audit() if r.get("event") == "attempt" and r.get("decision") == "allow"}
    for rec in world.upstream.records:
        assert rec.path.removeprefix("/acme") in audited
    # A write torn by the crash (simulated here if the kill happened not to tear one)
    # is reported, and set aside by the next start.
    (day,) = sorted(world.paths.audit_dir.glob("audit-*.jsonl"))
    if day.read_bytes().endswith(b"\n"):
        with open(day, "ab") as f:
            f.write(b'{"ts":"2099-01-01T00:00:00.000Z","id":"torn","ev')
    torn = _verify(world)
    assert torn.returncode == 0, torn.stdout + torn.stderr
    assert "unfinished last line" in torn.stdout
    restarted = BrokerThread(world.paths).start()
    try:
        (result,) = world.agent(world.acme, [req("api", "GET", "/echo/after")])
        assert envelope(result)["status"] == 200
    finally:
        restarted.stop()
    after = _verify(world)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "torn tail set aside" in after.stdout
    assert any(r.get("event") == "audit_torn_tail" for r in world.audit())
    world.assert_clean(world.audit_bytes())
    world.assert_clean((tmp_path / "broker.log").read_text())


# -- many clients at once -----------------------------------------------------------------


def test_50_concurrent_clients_of_two_tenants_get_exactly_their_own_answers(world: World, broker: BrokerThread) -> None:
    script = r"""
import json, sys
from broker.client import call
from broker.paths import Paths
sock = Paths.from_env().socket
me = sys.argv[1]
out = []
for i in range(4):
    nonce = f"{me}-{i}"
    if i % 2 == 0:
        payload = {"credential": "api", "method": "GET", "path": f"/echo/{nonce}", "headers": {"X-Nonce": nonce}}
    elif i == 1:
        payload = {"credential": "api", "method": "DELETE", "path": f"/echo/{nonce}"}
    else:
        payload = {"credential": "crm" if me.startswith("acme") else "openai", "method": "GET", "path": "/echo/x"}
    r = call(sock, payload, timeout=120)
    out.append({"nonce": nonce, "status": r.status, "body": r.json()})
print(json.dumps(out))
"""
    procs = []
    for n in range(50):
        tenant = "acme" if n % 2 == 0 else "globex"
        folder = world.acme if tenant == "acme" else world.globex
        me = f"{tenant}{n}"
        procs.append(
            (
                tenant,
                me,
                subprocess.Popen(
                    [sys.executable, "-c", script, me],
                    cwd=folder,
                    env=world.env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    for tenant, _me, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        world.assert_clean(out + err)
        results = json.loads(out)
        for i, result in enumerate(results):
            if i % 2 == 0:
                assert result["status"] == 200
                body = result["body"]["body"]
                assert body["nonce"] == result["nonce"]
                assert body["path"] == f"/{tenant}/echo/{result['nonce']}"
                assert result["body"]["headers"]["x-nonce"] == result["nonce"]
            elif i == 1:
                assert result["body"]["error"]["code"] == "denied_by_policy"
            else:
                assert result["body"]["error"]["code"] == "wrong_tenant"
    received = world.upstream.records
    assert len(received) == 50 * 2
    for rec in received:
        tenant = rec.path.split("/")[1]
        assert rec.header("X-Nonce").startswith(tenant)
        assert rec.header("Authorization") == f"Bearer {world.keys[(tenant, 'api')]}"


# -- other clients: curl, an official SDK ----------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_over_the_unix_socket(world: World, broker: BrokerThread) -> None:
    payload = json.dumps(
        {
            "credential": "api",
            "method": "GET",
            "path": "/echo/curl",
            "headers": {"X-Nonce": "curl-1", "Authorization": "Bearer dummy"},
        }
    )
    ran = world.run(
        [
            "curl",
            "-sS",
            "-i",
            "--unix-socket",
            str(world.socket),
            "http://outloop/v1/request",
            "-H",
            "Content-Type: application/json",
            "-d",
            payload,
        ],
        cwd=world.acme,
    )
    assert ran.returncode == 0, ran.stderr
    world.assert_clean(ran.seen)
    head, _, body = ran.stdout.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200")
    doc = json.loads(body)
    assert doc["status"] == 200 and doc["body"]["nonce"] == "curl-1"
    (rec,) = world.upstream.records
    assert rec.header("Authorization") == f"Bearer {world.keys[('acme', 'api')]}"
    ran = world.run(["curl", "-sS", "--unix-socket", str(world.socket), "http://outloop/v1/health"], cwd=world.unmapped)
    assert json.loads(ran.stdout)["ok"] is True


def test_the_openai_sdk_through_the_proxy_with_a_dummy_key(world: World, broker: BrokerThread) -> None:
    script = r"""
import json, sys
import httpx2 as httpx
from openai import OpenAI
transport = httpx.HTTPTransport(uds=sys.argv[1])
client = OpenAI(api_key="sk-dummy-not-a-key", base_url="http://outloop/v1/proxy/openai",
                http_client=httpx.Client(transport=transport), max_retries=0)
models = client.models.list()
chat = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
print(json.dumps({"models": [m.model_dump() for m in models.data],
                  "content": chat.choices[0].message.content}))
"""
    ran = world.python(script, str(world.socket), cwd=world.acme)
    assert ran.returncode == 0, ran.stderr[-2000:]
    world.assert_clean(ran.seen)
    out = json.loads(ran.stdout)
    assert out["models"][0]["id"] == "gpt-test"
    assert out["models"][0]["owned_by"] == "[REDACTED:openai]"
    assert out["content"] == "echo [REDACTED:openai]"
    models, chat = world.upstream.records
    assert (models.method, models.path) == ("GET", "/v1/models")
    assert (chat.method, chat.path) == ("POST", "/v1/chat/completions")
    for rec in (models, chat):
        assert rec.header("Authorization") == f"Bearer {world.keys[('acme', 'openai')]}"
        assert "sk-dummy-not-a-key" not in rec.text
    assert json.loads(chat.body)["messages"][0]["content"] == "hi"


# -- approvals through the engine API -------------------------------------------------------


def _pending(broker: BrokerThread, count: int = 1) -> list[Any]:
    return wait_for(
        lambda: (p := broker.call(broker.engine.pending)) and len(p) >= count and p, 30, "a pending approval"
    )


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [("approved", 200, None), ("denied", 403, "denied_by_operator"), ("always", 200, None)],
)
def test_an_ask_call_waits_for_the_operator(
    world: World, broker: BrokerThread, answer: str, status: int, code: str | None
) -> None:
    broker.call(broker.engine.attach_approver)
    agent = world.agent_popen(world.acme, [req("api", "POST", "/ask/deploy", reason="ship it")])
    (pending,) = _pending(broker)
    assert (pending.tenant, pending.credential, pending.method, pending.path) == ("acme", "api", "POST", "/ask/deploy")
    assert pending.reason == "ship it"
    assert world.upstream.records == []  # waits before anything goes upstream
    assert broker.call(broker.engine.answer, pending.id, answer)
    out, err = agent.communicate(timeout=60)
    world.assert_clean(out + err)
    (result,) = json.loads(out)
    assert result["status"] == status
    if code:
        assert error_of(result)["code"] == code
        assert world.upstream.records == []
    else:
        assert envelope(result)["status"] == 200
        assert len(world.upstream.records) == 1
    if answer == "always":
        (again,) = world.agent(world.acme, [req("api", "POST", "/ask/deploy")])
        assert envelope(again)["status"] == 200
        assert sum(isinstance(e, ApprovalRequested) for e in broker.events) == 1
        # Another tenant's identical call is not covered by acme's grant.
        agent = world.agent_popen(world.globex, [req("api", "POST", "/ask/deploy")])
        (other,) = _pending(broker)
        assert other.tenant == "globex"
        broker.call(broker.engine.answer, other.id, "denied")
        agent.communicate(timeout=60)


def test_an_unanswered_ask_times_out(world: World, broker: BrokerThread) -> None:
    world.configure(approval_timeout=0.3)
    broker.call(broker.engine.attach_approver)
    (result,) = world.agent(world.acme, [req("api", "POST", "/ask/slow")])
    error = error_of(result)
    assert error["code"] == "approval_timeout"
    assert audit_by_id(world, error["audit_id"])["decision"] == "approval_timeout"
    assert world.upstream.records == []


def test_stopping_the_broker_answers_a_pending_call_before_closing(world: World, broker: BrokerThread) -> None:
    broker.call(broker.engine.attach_approver)
    agent = world.agent_popen(world.acme, [req("api", "POST", "/ask/deploy")])
    _pending(broker)
    broker.stop()  # as quitting the dashboard does: pending calls are refused, then it closes
    out, err = agent.communicate(timeout=60)
    world.assert_clean(out + err)
    (result,) = json.loads(out)
    assert error_of(result)["code"] == "denied_by_operator"
    assert world.upstream.records == []


def test_stopping_the_broker_lets_a_call_on_the_wire_finish(world: World, broker: BrokerThread) -> None:
    agent = world.agent_popen(world.acme, [req("api", "GET", "/slow", query={"s": "0.5"})])
    wait_for(lambda: world.upstream.records, 30, "the call to reach the upstream")
    broker.stop()
    out, err = agent.communicate(timeout=60)
    world.assert_clean(out + err)
    (result,) = json.loads(out)
    assert envelope(result)["status"] == 200


KEEP_ALIVE_AGENT = r"""
import json, sys
from broker.client import _UnixConnection
from broker.paths import Paths
conn = _UnixConnection(Paths.from_env().socket, 60)
out = []
for path, query in (("/slow", {"s": "0.5"}), ("/echo/after-stop", {})):
    payload = {"credential": "api", "method": "GET", "path": path, "query": query}
    try:
        conn.request("POST", "/v1/request", body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        out.append(r.status)
        r.read()
    except OSError as e:
        out.append(type(e).__name__)
print(json.dumps(out))
"""


def test_stopping_the_broker_takes_no_new_call_on_a_kept_alive_connection(world: World, broker: BrokerThread) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", KEEP_ALIVE_AGENT],
        cwd=world.acme,
        env=world.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: world.upstream.records, 30, "the call to reach the upstream")
    broker.stop()
    out, err = agent.communicate(timeout=60)
    world.assert_clean(out + err)
    first, second = json.loads(out)
    assert first == 200  # the call on the wire was answered
    assert second != 200  # the connection closed after it: nothing new started
    assert [r.path for r in world.upstream.records] == ["/acme/slow"]


def test_without_an_approver_ask_waits_then_is_unavailable(world: World, broker: BrokerThread) -> None:
    """Nobody attached: the call waits approval_timeout for an operator, then approval_unavailable."""
    world.configure(approval_timeout=0.5)
    (result,) = world.agent(world.acme, [req("api", "POST", "/ask/x")])
    error = error_of(result)
    assert error["code"] == "approval_unavailable"
    assert "no operator attached within 0.5 s" in error["message"]
    assert broker.call(broker.engine.pending) == []
    assert world.upstream.records == []


def test_an_ask_waits_for_an_operator_who_attaches_later(world: World, broker: BrokerThread) -> None:
    agent = world.agent_popen(world.acme, [req("api", "POST", "/ask/late")])
    wait_for(lambda: broker.call(broker.engine.pending), 30, "the call to wait with nobody attached")
    broker.call(broker.engine.attach_approver)
    (waiting,) = broker.call(broker.engine.pending)
    broker.call(broker.engine.answer, waiting.id, "approved")
    out, _err = agent.communicate(timeout=60)
    assert json.loads(out)[0]["status"] == 200
    assert [r.path.endswith("/ask/late") for r in world.upstream.records] == [True]


def test_lock_refuses_everything_until_unlocked(world: World, broker: BrokerThread) -> None:
    broker.call(broker.engine.attach_approver)
    agent = world.agent_popen(world.acme, [req("api", "POST", "/ask/x")])
    _pending(broker)
    broker.call(broker.engine.lock)
    out, _ = agent.communicate(timeout=60)
    assert error_of(json.loads(out)[0])["code"] == "denied_by_operator"
    (locked,) = world.agent(world.globex, [req("api", "GET", "/echo/x")])
    error = error_of(locked)
    assert error["code"] == "denied_by_operator"
    assert audit_by_id(world, error["audit_id"])["decision"] == "denied_by_operator"
    assert world.upstream.records == []
    broker.call(broker.engine.unlock)
    (ok,) = world.agent(world.globex, [req("api", "GET", "/echo/x")])
    assert envelope(ok)["status"] == 200


# -- config changes while running -----------------------------------------------------------


def test_config_changes_take_effect_without_a_restart(world: World, broker: BrokerThread) -> None:
    (before,) = world.agent(world.acme, [req("fresh", "GET", "/echo/x")])
    assert error_of(before)["code"] == "unknown_credential"
    secret = "fresh-acme-K3y/+=9Zq0"
    world.keys[("acme", "fresh")] = secret
    ran = world.outloop(
        "credential",
        "add",
        "acme",
        "fresh",
        "--base-url",
        f"{world.upstream.url}/fresh",
        "--allow",
        "GET /**",
        cwd=world.unmapped,
        input=secret + "\n",
    )
    assert ran.returncode == 0, ran.stderr
    (after,) = world.agent(world.acme, [req("fresh", "GET", "/echo/x")])
    assert envelope(after)["body"]["echo"]["plain"] == "[REDACTED:fresh]"
    (rec,) = world.upstream.records
    assert rec.header("Authorization") == f"Bearer {secret}"
    assert any(isinstance(e, ConfigReloaded) for e in broker.events)

    # A broken edit is reported and the last good config stays in force.
    good = world.paths.config_file.read_text()
    world.paths.config_file.write_text(good + "\n[tenants.acme\nbroken = \n")
    (still,) = world.agent(world.acme, [req("fresh", "GET", "/echo/y")])
    assert envelope(still)["status"] == 200
    assert any(isinstance(e, ConfigRejected) for e in broker.events)
    # So does an edit that parses but does not validate (an unknown auth kind).
    world.paths.config_file.write_text(good.replace('auth = "bearer"', 'auth = "magic"'))
    (still,) = world.agent(world.acme, [req("fresh", "GET", "/echo/z")])
    assert envelope(still)["status"] == 200
    # Fixing the file is picked up again: removing the workspace unmaps the folder.
    ws = world.outloop("workspace", "rm", str(world.acme), cwd=world.unmapped)
    assert ws.returncode == 1  # the file on disk is still broken: the CLI refuses to build on it
    world.paths.config_file.write_text(good)
    ws = world.outloop("workspace", "rm", str(world.acme), cwd=world.unmapped)
    assert ws.returncode == 0, ws.stderr
    (gone,) = world.agent(world.acme, [req("fresh", "GET", "/echo/x")])
    assert error_of(gone)["code"] == "unmapped_workspace"


# -- the command line ------------------------------------------------------------------------


def test_outloop_call_exit_codes_and_whoami(world: World, broker: BrokerThread) -> None:
    ok = world.outloop("call", "api", "GET", "/echo/x", cwd=world.acme)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["echo"]["plain"] == "[REDACTED:api]"
    upstream_error = world.outloop("call", "api", "POST", "/status/404", "--json", '{"a": 1}', cwd=world.acme)
    assert upstream_error.returncode == 1
    refused = world.outloop("call", "api", "DELETE", "/echo/x", cwd=world.acme)
    assert refused.returncode == 2
    assert "denied_by_policy" in refused.stderr
    unmapped = world.outloop("call", "api", "GET", "/echo/x", cwd=world.unmapped)
    assert unmapped.returncode == 2 and "unmapped_workspace" in unmapped.stderr
    for ran in (ok, upstream_error, refused, unmapped):
        world.assert_clean(ran.seen)
        assert "Traceback" not in ran.stderr

    who = world.outloop("whoami", cwd=world.acme / ".")
    assert who.returncode == 0
    assert "acme" in who.stdout and str(world.acme) in who.stdout
    info = json.loads(world.outloop("whoami", "--json", cwd=world.globex).stdout)
    assert info["tenant"] == "globex"
    assert info["workspace"] == str(world.globex)
    assert info["credentials"] == ["api", "crm"]
    world.assert_clean(json.dumps(info))
    nowhere = world.outloop("whoami", cwd=world.unmapped)
    assert nowhere.returncode == 2 and "unmapped_workspace" in nowhere.stderr


def test_outloop_call_without_a_broker_exits_3(world: World) -> None:
    ran = world.outloop("call", "api", "GET", "/echo/x", cwd=world.acme)
    assert ran.returncode == 3
    assert "no broker" in ran.stderr and "Traceback" not in ran.stderr
    who = world.outloop("whoami", cwd=world.acme)
    assert who.returncode == 3


def test_the_socket_is_private_and_a_second_broker_is_refused(world: World, broker: BrokerThread) -> None:
    mode = world.socket.stat().st_mode & 0o777
    assert mode == 0o600
    assert world.socket.parent.stat().st_mode & 0o077 == 0
    second = world.run([OUTLOOP, "broker"], cwd=world.unmapped, timeout=60)
    assert second.returncode != 0
    assert "already running" in second.stderr and "Traceback" not in second.stderr
    # The first broker still answers.
    (ok,) = world.agent(world.acme, [req("api", "GET", "/echo/x")])
    assert envelope(ok)["status"] == 200


def test_an_ask_shows_the_operator_what_it_sends_and_never_a_key(world: World, broker: BrokerThread) -> None:
    """Query, headers (no credential header), a redacted body preview and the command line reach the ask."""
    from outloop_tui.widgets.approvals import program_name

    broker.call(broker.engine.attach_approver)
    other_key = world.keys[("acme", "api")]
    item = req(
        "api",
        "POST",
        "/ask/refund",
        query={"order": "1042"},
        headers={"X-Trace": "t-1", "Authorization": f"Bearer {other_key}"},
        body={"amount": 25, "note": f"pasted {other_key}"},
    )
    agent = world.agent_popen(world.acme, [item])
    (waiting,) = _pending(broker)
    try:
        assert dict(waiting.query) == {"order": "1042"}
        assert dict(waiting.headers).get("X-Trace") == "t-1"
        assert not any(k.lower() == "authorization" for k, _ in waiting.headers)
        assert '"amount": 25' in waiting.body_preview
        assert other_key not in waiting.body_preview and "[REDACTED:" in waiting.body_preview
        assert "python" in waiting.cmdline and program_name(waiting).startswith("python")
        world.assert_clean(repr(waiting))
    finally:
        broker.call(broker.engine.answer, waiting.id, "denied")
        agent.communicate(timeout=60)


ASK_AND_HANG = r"""
import http.client, json, socket, sys
kind, where = sys.argv[1], sys.argv[2]
if kind == "unix":
    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(where)
    conn = Conn("outloop")
else:
    host, port = where.rsplit(":", 1)
    conn = Conn = http.client.HTTPConnection(host, int(port))
body = json.dumps({"credential": "api", "method": "POST", "path": "/ask/refund"})
conn.request("POST", "/v1/request", body, {"Content-Type": "application/json"})
print("sent", flush=True)
conn.getresponse()  # waits for the operator; killed before that
"""


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_waiting_call_whose_caller_hangs_up_is_withdrawn_and_audited(world: World, transport: str) -> None:
    """Ctrl-C (or an SDK's timeout) while a call waits: the ask goes, nothing is sent upstream later."""
    if transport == "tcp":
        world.configure(listen="127.0.0.1:0")
    broker = BrokerThread(world.paths).start()
    try:
        broker.call(broker.engine.attach_approver)
        where = str(world.socket) if transport == "unix" else broker.engine.listen_url.removeprefix("http://")
        agent = subprocess.Popen(
            [sys.executable, "-c", ASK_AND_HANG, transport, where],
            cwd=world.acme,
            env=world.env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        (waiting,) = _pending(broker)
        agent.kill()
        agent.wait(30)
        wait_for(lambda: not broker.call(broker.engine.pending), 30, "the ask to be withdrawn")
        assert broker.call(broker.engine.answer, waiting.id, "approved") is False  # too late: nothing to send
        assert world.upstream.records == []

        def attempts() -> list[str]:
            records = world.audit()
            return [r["decision"] for r in records if r.get("event") == "attempt" and r.get("path") == "/ask/refund"]

        wait_for(attempts, 30, "the withdrawal's audit record")
        assert attempts() == ["caller_gone"]
        resolved = [e for e in broker.events if isinstance(e, ApprovalResolved)]
        assert [(e.decision, e.approver) for e in resolved] == [("cancelled", "caller_gone")]
    finally:
        broker.stop()
