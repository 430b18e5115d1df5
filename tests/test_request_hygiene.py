"""What goes upstream is what policy judged, and framing the agent can rely on (issue 15).

A real upstream on loopback (tests/support/upstream.py) records every request; the
broker serves on a real Unix socket; the agent is a real subprocess.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from support.fixtures import BrokerThread, World

from broker.calls import server as server_module
from broker.config import ConfigEditor

REWRITING = {
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "DELETE",
    "X-Original-URL": "/acme/admin",
    "X-Rewrite-URL": "/acme/admin",
    "Forwarded": "for=10.0.0.1;host=internal",
    "X-Forwarded-For": "10.0.0.1",
    "X-Forwarded-Host": "internal",
    "X-Forwarded-Prefix": "/admin",
    "X-Real-IP": "10.0.0.1",
}


def _raw(method: str, target: str, headers: dict[str, str]) -> dict[str, object]:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return {"raw": f"{method} {target} HTTP/1.1\r\nHost: outloop\r\n{lines}Connection: close\r\n\r\n"}


def test_method_override_url_rewrite_forwarded_and_connection_listed_headers_never_go_upstream(
    world: World, broker: BrokerThread
) -> None:
    keep = {"X-Kept": "yes", "X-Nonce": "n"}
    results = world.agent(
        world.acme,
        [
            _raw("GET", "/v1/proxy/api/echo/p", {**REWRITING, **keep, "Connection": "X-Hop", "X-Hop": "1"}),
            {
                "payload": {
                    "credential": "api",
                    "method": "GET",
                    "path": "/echo/r",
                    "headers": {**REWRITING, **keep, "Connection": "X-Hop", "X-Hop": "1"},
                }
            },
        ],
    )
    assert [r["status"] for r in results] == [200, 200]
    assert len(world.upstream.records) == 2
    for rec in world.upstream.records:
        assert rec.method == "GET"
        names = {k.lower() for k, _ in rec.headers}
        assert not names & {k.lower() for k in REWRITING}, names
        assert "x-hop" not in names
        assert rec.header("X-Kept") == "yes"


@pytest.fixture
def head_broker(world: World) -> Iterator[BrokerThread]:
    """The broker, with acme's api allowing HEAD too, and encoded slashes and ';' parameters."""
    editor = ConfigEditor(world.paths)
    editor.tenant("acme")["credentials"]["api"]["allow"].append("HEAD /**")
    editor.tenant("acme")["credentials"]["api"].update(allow_encoded_slash=True, allow_path_params=True)
    editor.save()
    thread = BrokerThread(world.paths).start()
    try:
        yield thread
    finally:
        thread.stop()


def test_head_keeps_its_content_length_and_204_304_carry_none(world: World, head_broker: BrokerThread) -> None:
    head, no_content, not_modified = world.agent(
        world.acme,
        [
            _raw("HEAD", "/v1/proxy/api/huge?n=5000", {}),
            _raw("GET", "/v1/proxy/api/status/204", {}),
            _raw("GET", "/v1/proxy/api/status/304", {}),
        ],
    )
    assert head["status"] == 200 and head["body"] == ""
    assert ("Content-Length", "5000") in [tuple(h) for h in head["headers"]]
    for answer, status in ((no_content, 204), (not_modified, 304)):
        assert answer["status"] == status
        assert not any(str(k).lower() == "content-length" for k, _ in answer["headers"])


def test_encoded_slashes_and_path_parameters_need_the_credential_to_opt_in(
    world: World, head_broker: BrokerThread
) -> None:
    paths = ["/echo/repos/o/r%2Fsecrets/PROD", "/echo/a;jsessionid=1", "/echo/a%3Bx"]
    items = [{"method": "GET", "target": f"/v1/proxy/api{p}"} for p in paths]
    refused = world.agent(world.globex, items)  # globex's api has not opted in
    assert [r["status"] for r in refused] == [400, 400, 400]
    assert not [r for r in refused if "allow_" in str(r["body"])]  # never how to give itself access
    assert not world.upstream.records
    audited = [r for r in world.audit() if r.get("tenant") == "globex" and r.get("decision") == "bad_request"]
    assert len(audited) == 3
    passed = world.agent(world.acme, items)
    assert [r["status"] for r in passed] == [200, 200, 200]
    assert [rec.path for rec in world.upstream.records] == [
        "/acme/echo/repos/o/r%2Fsecrets/PROD",
        "/acme/echo/a;jsessionid=1",
        "/acme/echo/a;x",
    ]


def test_json_nested_5000_deep_is_an_audited_bad_request(world: World, broker: BrokerThread) -> None:
    deep = "[" * 5000 + "]" * 5000
    body = '{"credential": "api", "method": "GET", "path": "/echo/x", "body": ' + deep + "}"
    results = world.agent(
        world.acme,
        [
            {"method": "POST", "target": "/v1/request", "body": body},
            {"method": "POST", "target": "/v1/sessions", "body": deep},
            {"method": "POST", "target": "/v1/scan", "body": '{"response": ' + deep + "}"},
        ],
    )
    assert [r["status"] for r in results] == [400, 400, 400]
    for result in results:
        assert '"bad_request"' in result["body"]
    assert not world.upstream.records
    assert len([r for r in world.audit() if r.get("decision") == "bad_request"]) == 3


def _until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_head_that_never_ends_and_an_idle_connection_are_closed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the Unix socket: a head unfinished HEAD_TIMEOUT after its first byte is a 408;
    a kept-alive connection quiet for idle_timeout is closed (the reads below would
    otherwise wait out their 30 s socket timeout and fail)."""
    monkeypatch.setattr(server_module, "HEAD_TIMEOUT", 0.3)
    world.configure(idle_timeout=0.5)
    thread = BrokerThread(world.paths).start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(world.socket))
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # the head's blank line never comes
            data = _until_closed(s)
        assert data.startswith(b"HTTP/1.1 408")
        assert b"head did not arrive whole" in data
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(world.socket))
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            data = _until_closed(s)
        assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1 ") == 1
    finally:
        thread.stop()


def test_methods_are_upper_cased_before_policy_and_then_matched_exactly(world: World, broker: BrokerThread) -> None:
    """acme's api: allow GET /**, POST /echo/**; deny GET /admin/**. What policy judges is
    what goes upstream: the ASCII upper-case of the method the agent named, or a refusal."""

    def request(method: str, path: str) -> dict[str, object]:
        return {"payload": {"credential": "api", "method": method, "path": path}}

    folded = {
        "po\u017ft": "long s: str.upper() gives POST",
        "\u0393\u0395\u03a4": "Greek capitals that look like GET",
        "GET\n": "a trailing newline",
        "GET /x": "a space",
        "": "empty",
    }
    wire = ["get", "Post", "gEt", "GETX", "G\u00c9T"]  # on the wire: not methods HTTP knows
    results = world.agent(
        world.acme,
        [
            request("get", "/echo/lower"),
            request("Post", "/echo/mixed"),
            request("gEt", "/admin/x"),  # the GET deny rule holds for it
            request("GETX", "/echo/getx"),  # no rule names GETX: a GET rule is not a prefix
            request("PURGE", "/echo/purge"),
            *(request(m, "/echo/folded") for m in folded),
            *(_raw(m, "/v1/proxy/api/echo/wire", {}) for m in wire),
            _raw("PURGE", "/v1/proxy/api/echo/wire-purge", {}),  # a method llhttp knows, no rule names
        ],
    )
    envelopes = [r["status"] for r in results[:2]]
    assert envelopes == [200, 200]
    assert [r["status"] for r in results[2:5]] == [403, 403, 403]
    assert [r["status"] for r in results[5 : 5 + len(folded)]] == [400] * len(folded)
    assert [r["status"] for r in results[5 + len(folded) :]] == [400] * len(wire) + [403]
    for r in results[5:]:
        assert '"bad_request"' in str(r["body"]) or '"denied_by_policy"' in str(r["body"]), r
    # Forwarded exactly as judged: upper-case GET and POST, nothing else.
    assert [(rec.method, rec.path) for rec in world.upstream.records] == [
        ("GET", "/acme/echo/lower"),
        ("POST", "/acme/echo/mixed"),
    ]
    attempts = [r for r in world.audit() if r.get("event") == "attempt" and r.get("credential") == "api"]
    judged = [(r["method"], r["path"], r["decision"], r.get("rule")) for r in attempts if r.get("method")]
    assert judged == [
        ("GET", "/echo/lower", "allow", "GET /**"),
        ("POST", "/echo/mixed", "allow", "POST /echo/**"),
        ("GET", "/admin/x", "denied_by_policy", "GET /admin/**"),
        ("GETX", "/echo/getx", "denied_by_policy", None),
        ("PURGE", "/echo/purge", "denied_by_policy", None),
        ("PURGE", "/echo/wire-purge", "denied_by_policy", None),
    ]
    bad = [r for r in world.audit() if r.get("decision") == "bad_request"]
    assert len(bad) == len(folded) + len(wire)
