"""Broker pieces on their own: redaction, forwarding headers, request parsing, approvals."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest
from support.fixtures import KEYS, secret_forms  # noqa: E402
from support.upstream import Upstream, echoes  # noqa: E402

from broker.calls.approvals import Approvals  # noqa: E402
from broker.calls.forward import Forwarder, UpstreamError, UpstreamSettings, outgoing_headers, outgoing_query  # noqa: E402
from broker.calls.server import BadRequest, body_field, parse_proxy, parse_request_json  # noqa: E402
from broker.config import Auth, Credential  # noqa: E402
from broker.events import ApprovalRequested, ApprovalResolved  # noqa: E402
from broker.leaks.redact import Redactor  # noqa: E402
from broker.policy import normalize_path  # noqa: E402
from broker.secrets import Secret  # noqa: E402

SECRETS = sorted(set(KEYS.values())) + ["plainalnumsecret0123456789", "emoji-\U0001f600-key-1234567"]


def leaked(text: str, secret: str) -> list[str]:
    __tracebackhide__ = True
    return [label for label, form in secret_forms(secret).items() if form in text]


# -- redaction -----------------------------------------------------------------------------


def redactor_for(secret: str, crowd: int) -> Redactor:
    """A Redactor for `secret`, among `crowd` other managed secrets (which takes the
    prefilter's path once there are more than DIRECT_MAX)."""
    others = [(f"other{i}", f"sk-other-{i:04d}-{'x' * 24}") for i in range(crowd)]
    return Redactor([("cred", secret), *others])


CROWDS = [0, 40]


@pytest.mark.parametrize("crowd", CROWDS)
@pytest.mark.parametrize("secret", SECRETS, ids=range(len(SECRETS)))
def test_every_echoed_encoding_is_redacted(secret: str, crowd: int) -> None:
    redactor = redactor_for(secret, crowd)
    for label, form in echoes(secret).items():
        out = redactor.text(f"before {form} after")
        assert not leaked(out, secret), label
        assert "[REDACTED:cred]" in out, label
        assert out.startswith("before ") and out.endswith(" after")


@pytest.mark.parametrize("crowd", CROWDS)
@pytest.mark.parametrize("secret", SECRETS, ids=range(len(SECRETS)))
def test_escaped_forms_that_encoders_disagree_on_are_redacted(secret: str, crowd: int) -> None:
    redactor = redactor_for(secret, crowd)
    forms = [
        quote(secret),  # keeps "/"
        quote(secret, safe="/!*'()"),  # like encodeURIComponent
        quote(quote(secret, safe="")),  # a URL inside a URL
        json.dumps(json.dumps(secret)),  # JSON inside a JSON string
        json.dumps(json.dumps(json.dumps(secret))),
        json.dumps(secret).replace("=", "\\u003d").replace("'", "\\u0027"),  # Gson
        json.dumps(secret, ensure_ascii=False).replace("/", "\\/"),
        quote_plus(secret).replace("%2F", "%2f"),
    ]
    for i, form in enumerate(forms):
        out = redactor.text(form)
        assert "[REDACTED:cred]" in out, f"form {i}"
        assert not leaked(out, secret)
        for decoded in _decodings(out):
            assert not leaked(decoded, secret)


def _decodings(text: str) -> list[str]:
    out = []
    value: object = text
    for _ in range(3):
        try:
            value = json.loads(value if isinstance(value, str) else "")
        except ValueError:
            break
        if isinstance(value, str):
            out.append(value)
    return out


def test_same_named_credentials_of_two_tenants_are_both_redacted() -> None:
    redactor = Redactor([("api", KEYS[("acme", "api")]), ("api", KEYS[("globex", "api")])])
    out = redactor.text(f"{KEYS[('acme', 'api')]} {KEYS[('globex', 'api')]}")
    assert out == "[REDACTED:api] [REDACTED:api]"
    assert repr(redactor) == "Redactor(2 secrets)"


def test_a_longer_secret_wins_over_a_shorter_one_inside_it() -> None:
    redactor = Redactor({"short": "abcdefgh12345678", "long": "abcdefgh12345678-and-more"})
    assert redactor.text("x abcdefgh12345678-and-more y") == "x [REDACTED:long] y"
    assert redactor.text("x abcdefgh12345678 y") == "x [REDACTED:short] y"


@pytest.mark.parametrize("crowd", CROWDS)
def test_bytes_that_are_not_utf8_are_redacted(crowd: int) -> None:
    secret = KEYS[("acme", "legacy")]  # non-ASCII
    redactor = Redactor([("legacy", secret), *[(f"o{i}", f"sk-other-{i:04d}-{'y' * 24}") for i in range(crowd)]])
    body = b"\xff\xfe\x00" + secret.encode() + b"\x80" + base64.b64encode(secret.encode())
    out = redactor.bytes(body)
    assert secret.encode() not in out
    assert out.count(b"[REDACTED:legacy]") == 2
    assert out.startswith(b"\xff\xfe\x00")


def test_headers_are_redacted_and_other_text_is_left_alone() -> None:
    secret = KEYS[("acme", "api")]
    redactor = Redactor({"api": secret})
    headers = redactor.headers([("Location", f"https://x/?token={quote_plus(secret)}"), ("X-Other", "fine")])
    assert headers == [("Location", "https://x/?token=[REDACTED:api]"), ("X-Other", "fine")]
    text = 'ordinary text with base64 aGVsbG8gd29ybGQ= and % signs %2F and \\" quotes'
    assert redactor.text(text) == text
    assert Redactor({}).text(text) == text
    assert secret not in repr(redactor)


def test_many_secrets_each_redacted_where_it_appears_and_nowhere_else() -> None:
    secrets = {f"c{i}": f"tok_{i:03d}_" + "abcdefghijklmnopqrstuvwxyz"[i % 26] * 20 for i in range(120)}
    redactor = Redactor(secrets)
    body = json.dumps(
        {
            "a": secrets["c7"],
            "b": base64.b64encode(f"Bearer {secrets['c99']}".encode()).decode(),
            "c": quote(secrets["c42"], safe=""),
            "clean": "tok_007_ but not the rest " * 50,
        }
    )
    out = redactor.text(body)
    for name, secret in secrets.items():
        assert not leaked(out, secret), name
    assert out.count("[REDACTED:c7]") == 1 and out.count("[REDACTED:c42]") == 1
    assert "[REDACTED:c99]" in out
    assert out.count("tok_007_ but not the rest") == 50
    assert redactor.text("nothing to see") == "nothing to see"


def test_the_prefilter_finds_the_shortest_anchor_at_any_offset_in_a_longer_run() -> None:
    secret = "Abcdefghijklmn0"  # 15 characters: the shortest anchor the prefilter takes
    redactor = redactor_for(secret, crowd=5)
    for offset in range(20):
        text = f"x{'z' * offset}{secret}zz y"
        assert redactor.text(text) == f"x{'z' * offset}[REDACTED:cred]zz y", offset


def test_leak_rule_spans_are_redacted_too() -> None:
    redactor = Redactor({}, extra=lambda text: [(i, i + 8, "rule") for i in [text.find("AKIA")] if i >= 0])
    assert redactor.text("id AKIA1234 end") == "id [REDACTED:rule] end"


def test_headers_are_redacted_as_each_value_would_be_with_the_real_leak_rules() -> None:
    # headers() first looks at all the values together; that must never let through
    # what redacting each value on its own would catch (a key at the start or end of
    # a value, alone or among others, the managed secret in any header).
    from broker.leaks.rules import RULES, iter_provider_key_spans, may_hold_provider_key

    secret = KEYS[("acme", "api")]
    redactor = Redactor({"api": secret}, iter_provider_key_spans, may_hold_provider_key)
    plain = [("Content-Type", "application/json"), ("Date", "Fri, 27 Nov 2026 22:00:00 GMT")]
    keys = [example for rule in RULES if rule.confident for example in rule.true_positives[:1]]
    assert len(keys) > 50
    caught = 0
    for key in [*keys, f"Bearer {secret}"]:
        for headers in (
            [("X-Key", key)],
            [*plain, ("X-Key", key)],
            [("X-Key", key), *plain],
            [("X-Key", f"id={key};")],
        ):
            expected = [(k, redactor.text(v)) for k, v in headers]
            assert redactor.headers(headers) == expected, key
            caught += expected != headers
    assert caught > 4 * 50  # the rules do fire here: the comparison is not vacuous
    assert redactor.headers(plain) == plain


# -- forwarding: headers and query ---------------------------------------------------------


def cred(auth: str, base_url: str = "https://api.example.com/v1") -> Credential:
    return Credential("acme", "c", base_url, Auth.parse(auth))


SECRET = Secret("s3cr3t/+=value")


def test_client_credential_and_hop_by_hop_headers_are_dropped() -> None:
    client = {
        "Authorization": "Bearer dummy",
        "proxy-authorization": "x",
        "X-API-KEY": "dummy",
        "Connection": "close",
        "Transfer-Encoding": "chunked",
        "Host": "evil",
        "Content-Length": "5",
        "Accept-Encoding": "bzip2",
        "Cookie": "a=b",
        "X-Custom": "kept",
        "Private-Token": "x",
    }
    out = outgoing_headers(client, cred("bearer"), SECRET)
    assert out == {"Cookie": "a=b", "X-Custom": "kept", "Authorization": "Bearer s3cr3t/+=value"}


def test_each_auth_kind_is_injected() -> None:
    basic = outgoing_headers({"authorization": "Basic Zm9vOmJhcg=="}, cred("basic:me"), SECRET)
    assert basic == {"Authorization": "Basic " + base64.b64encode(b"me:s3cr3t/+=value").decode()}
    header = outgoing_headers({"x-token": "dummy", "X-Other": "1"}, cred("header:X-Token"), SECRET)
    assert header == {"X-Other": "1", "X-Token": "s3cr3t/+=value"}
    query = outgoing_headers({"Authorization": "Bearer dummy"}, cred("query:key"), SECRET)
    assert query == {}
    assert outgoing_query([("key", "mine"), ("q", "1")], cred("query:key"), SECRET) == [
        ("q", "1"),
        ("key", "s3cr3t/+=value"),
    ]
    assert outgoing_query([("key", "mine")], cred("bearer"), SECRET) == [("key", "mine")]


@pytest.fixture
def up() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


async def test_forwarder_never_follows_redirects_and_caps_the_response(up: Upstream) -> None:
    forwarder = Forwarder(UpstreamSettings(timeout=5, max_response_bytes=1000))
    c = cred("bearer", f"{up.url}/t")
    try:
        moved = await forwarder.send(
            c, SECRET, "GET", normalize_path("/redirect"), [("to", "http://127.0.0.2:9/x")], {}, b""
        )
        assert moved.status == 302
        assert dict(moved.headers)["location"].startswith("http://127.0.0.2:9/x")
        assert len(up.records) == 1
        ok = await forwarder.send(c, SECRET, "GET", normalize_path("/huge"), [("n", "1000")], {}, b"")
        assert ok.body == b"x" * 1000
        with pytest.raises(UpstreamError) as big:
            await forwarder.send(c, SECRET, "GET", normalize_path("/huge"), [("n", "1001")], {}, b"")
        assert big.value.status == 502 and "1000 byte cap" in str(big.value)
        # A HEAD answer's Content-Length is the size of what GET would send: no body comes.
        head = await forwarder.send(c, SECRET, "HEAD", normalize_path("/huge"), [("n", "5000")], {}, b"")
        assert (head.status, head.body) == (200, b"")
        forwarder.settings = UpstreamSettings(timeout=5, max_response_bytes=1 << 20)  # the echo is larger than 1000
        echo = await forwarder.send(c, SECRET, "GET", normalize_path("/echo/x"), [], {}, b"")
        assert not any(k.lower() in ("set-cookie", "content-length", "connection") for k, _ in echo.headers)
        with pytest.raises(UpstreamError) as unreadable:
            await forwarder.send(c, SECRET, "GET", normalize_path("/compressed/x"), [("force", "bzip2")], {}, b"")
        assert unreadable.value.status == 502 and "(bzip2)" in str(unreadable.value)
        # An upstream's own text is not quoted back: it could hold anything, the key included.
        with pytest.raises(UpstreamError) as odd:
            await forwarder.send(
                c, SECRET, "GET", normalize_path("/compressed/x"), [("force", SECRET.reveal())], {}, b""
            )
        assert odd.value.status == 502 and "not a registered coding" in str(odd.value)
        assert SECRET.reveal()[:6] not in str(odd.value)
    finally:
        await forwarder.close()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
async def test_forwarder_undoes_content_codings_within_the_cap(up: Upstream, coding: str) -> None:
    forwarder = Forwarder(UpstreamSettings(timeout=5, max_response_bytes=100_000))
    c = cred("bearer", f"{up.url}/t")
    try:
        ok = await forwarder.send(
            c, SECRET, "GET", normalize_path("/huge"), [("n", "100000"), ("coding", coding)], {}, b""
        )
        assert ok.body == b"x" * 100_000
        assert not any(k.lower() == "content-encoding" for k, _ in ok.headers)
        assert up.records[-1].header("Accept-Encoding") == "gzip, deflate"
        # 100 KB that packs into a few hundred bytes: the cap applies to what it unpacks to.
        with pytest.raises(UpstreamError) as bomb:
            await forwarder.send(
                c, SECRET, "GET", normalize_path("/huge"), [("n", "100001"), ("coding", coding)], {}, b""
            )
        assert bomb.value.status == 502 and "100000 byte cap" in str(bomb.value)
    finally:
        await forwarder.close()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
async def test_forwarder_answers_a_coded_response_without_a_body(up: Upstream, coding: str) -> None:
    # HEAD (like 204 and 304) carries the GET's Content-Encoding but no body: nothing to undo.
    forwarder = Forwarder(UpstreamSettings(timeout=5, max_response_bytes=100_000))
    try:
        head = await forwarder.send(
            cred("bearer", f"{up.url}/t"),
            SECRET,
            "HEAD",
            normalize_path("/huge"),
            [("n", "1000"), ("coding", coding)],
            {},
            b"",
        )
        assert head.status == 200 and head.body == b""
    finally:
        await forwarder.close()


async def test_forwarder_timeouts_and_unreachable_hosts_say_so_without_the_key(up: Upstream) -> None:
    forwarder = Forwarder(UpstreamSettings(timeout=0.2, max_response_bytes=1000))
    try:
        with pytest.raises(UpstreamError) as slow:
            await forwarder.send(
                cred("query:key", f"{up.url}/t"), SECRET, "GET", normalize_path("/slow"), [("s", "2")], {}, b""
            )
        assert slow.value.status == 504
        assert "s3cr3t" not in str(slow.value)
        with pytest.raises(UpstreamError) as down:
            await forwarder.send(
                cred("query:key", "http://127.0.0.1:9"), SECRET, "GET", normalize_path("/x"), [], {}, b""
            )
        assert down.value.status == 502
        assert "s3cr3t" not in str(down.value) and "s3cr3t" not in repr(down.value)
    finally:
        await forwarder.close()


# -- request parsing -----------------------------------------------------------------------


def doc(**fields: object) -> bytes:
    base: dict[str, object] = {"credential": "api", "method": "get", "path": "/x"}
    base.update(fields)
    return json.dumps(base).encode()


def test_a_request_body_is_parsed() -> None:
    call = parse_request_json(
        doc(
            query={"a": ["1", "2"], "b": True, "c": 3},
            headers={"X-A": "1"},
            body={"k": "v"},
            tenant="acme",
            reason="r" * 600,
        )
    )
    assert (call.credential, call.method, call.path) == ("api", "GET", "/x")
    assert call.query == [("a", "1"), ("a", "2"), ("b", "true"), ("c", "3")]
    assert call.headers == {"X-A": "1", "Content-Type": "application/json"}
    assert call.body == b'{"k":"v"}'
    assert call.tenant_claim == "acme"
    assert len(call.reason) == 500
    text = parse_request_json(doc(body="plain", query=[["k", "v"]], headers={"content-type": "text/plain"}))
    assert text.body == b"plain" and text.query == [("k", "v")]
    assert text.headers == {"content-type": "text/plain"}
    assert parse_request_json(doc()).body == b""


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe",
        b"[1]",
        b'"s"',
        doc(credential=""),
        doc(method=5),
        doc(path=None),
        doc(method="GET /x HTTP/1.1"),
        doc(method="G" * 21),
        doc(headers=["a"]),
        doc(headers={"a": 1}),
        doc(headers={"X-A": "b\r\nc: d"}),
        doc(headers={"X-A\n": "b"}),
        doc(headers={"X A": "b"}),
        doc(headers={"": "b"}),
        doc(headers={"X-A": "caf\u00e9"}),
        doc(headers={"X-A": "a\0b"}),
        doc(query="a=1"),
        doc(query={"a": {"b": 1}}),
        doc(query={"a": None}),
        doc(query=[["a"]]),
        doc(tenant=5),
        doc(reason=["x"]),
        doc(path="/\ud800"),
        doc(reason="\udfff"),
        doc(body={"k": "\ud83d"}),  # lone surrogates
    ],
)
def test_malformed_request_bodies_are_bad_requests(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request_json(body)


def test_a_surrogate_pair_is_one_character_not_a_bad_request() -> None:
    assert parse_request_json(doc(path="/\U0001f600")).path == "/\U0001f600"
    assert b"\\ud83d\\ude00" in doc(path="/\U0001f600")  # json.dumps escaped it as a pair


def test_a_proxy_target_is_parsed() -> None:
    headers = [
        (b"host", b"outloop"),
        (b"content-length", b"2"),
        (b"authorization", b"Bearer dummy"),
        (b"x-outloop-reason", b"why"),
        (b"accept", b"application/json"),
    ]
    call = parse_proxy("post", "/v1/proxy/open%61i/chat/completions?stream=false&x=", headers, b"{}")
    assert (call.credential, call.method, call.path) == ("openai", "POST", "/chat/completions")
    assert call.query == [("stream", "false"), ("x", "")]
    assert call.headers == {"authorization": "Bearer dummy", "accept": "application/json"}
    assert call.reason == "why" and call.body == b"{}"
    assert parse_proxy("GET", "/v1/proxy/api", [], b"").path == "/"
    with pytest.raises(BadRequest):
        parse_proxy("GET", "/v1/proxy//x", [], b"")
    with pytest.raises(BadRequest):
        parse_proxy("GET", "/v1/proxy/api/x", [(b"x-a", "caf\u00e9".encode("latin-1"))], b"")


def test_body_field_keeps_json_text_and_bytes_apart() -> None:
    assert body_field(b"", "application/json") == {"body": None}
    assert body_field(b'{"a": 1}', "application/json; charset=utf-8") == {"body": {"a": 1}}
    assert body_field(b'{"a": 1}', "text/plain") == {"body": '{"a": 1}'}
    assert body_field(b"not json", "application/json") == {"body": "not json"}
    assert body_field(b"\xff\x00", "application/octet-stream") == {"body": "/wA=", "body_base64": True}


# -- approvals -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def approval_fields(**extra: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "tenant": "acme",
        "workspace": "/w",
        "pid": 1,
        "exe": "x",
        "credential": "api",
        "method": "POST",
        "host": "h",
        "path": "/ask/x",
        "rule": "POST /ask/**",
        "reason": "",
    }
    fields.update(extra)
    return fields


async def _answered(approvals: Approvals, decision: str, **extra: object) -> tuple[str, str]:
    approval = approvals.new(timeout=30, **approval_fields(**extra))
    waiter = asyncio.create_task(approvals.wait(approval))
    while not approvals.pending():
        await asyncio.sleep(0)
    assert approvals.pending()[0].id == approval.id
    assert approvals.answer(approval.id, decision, "alice")
    return await waiter


async def test_approve_deny_and_the_events_they_publish() -> None:
    events: list[object] = []
    approvals = Approvals(events.append)
    assert await _answered(approvals, "approved") == ("approved", "alice")
    assert await _answered(approvals, "denied") == ("denied", "alice")
    assert [type(e) for e in events] == [ApprovalRequested, ApprovalResolved] * 2
    assert [e.decision for e in events if isinstance(e, ApprovalResolved)] == ["approved", "denied"]
    assert approvals.pending() == []
    assert not approvals.answer("no-such-id", "approved")
    with pytest.raises(ValueError):
        approvals.answer("x", "maybe")


async def test_always_grants_the_same_call_until_it_expires() -> None:
    clock = Clock()
    approvals = Approvals(lambda e: None, clock=clock)
    approval = approvals.new(timeout=30, **approval_fields())
    waiter = asyncio.create_task(approvals.wait(approval))
    await asyncio.sleep(0)
    assert approvals.answer(approval.id, "always", always_ttl=60)
    assert await waiter == ("always", "operator")
    same = approvals.new(timeout=30, **approval_fields(path="/ask/other"))  # same rule
    assert approvals.granted(same)
    for other in (
        approval_fields(tenant="globex"),
        approval_fields(method="PUT"),
        approval_fields(credential="crm"),
        approval_fields(rule="POST /other/**"),
    ):
        assert not approvals.granted(approvals.new(timeout=30, **other))
    clock.now += 61
    assert not approvals.granted(same)
    assert approvals.grants() == []


async def test_a_ruleless_grant_covers_only_the_exact_path() -> None:
    approvals = Approvals(lambda e: None)
    first = approvals.new(timeout=30, **approval_fields(rule=None))
    waiter = asyncio.create_task(approvals.wait(first))
    await asyncio.sleep(0)
    approvals.answer(first.id, "always")
    await waiter
    assert approvals.granted(approvals.new(timeout=30, **approval_fields(rule=None)))
    assert not approvals.granted(approvals.new(timeout=30, **approval_fields(rule=None, path="/ask/y")))
    approvals.revoke_grants()
    assert not approvals.granted(approvals.new(timeout=30, **approval_fields(rule=None)))


async def test_timeout_deny_all_and_a_caller_that_hangs_up() -> None:
    events: list[object] = []
    approvals = Approvals(events.append)
    assert await approvals.wait(approvals.new(timeout=0.05, **approval_fields())) == ("timeout", "timeout")
    assert approvals.pending() == []

    waiters = [asyncio.create_task(approvals.wait(approvals.new(timeout=30, **approval_fields()))) for _ in range(3)]
    while len(approvals.pending()) < 3:
        await asyncio.sleep(0)
    assert approvals.deny_all("denied", "lock") == 3
    assert [await w for w in waiters] == [("denied", "lock")] * 3

    hangup = asyncio.create_task(approvals.wait(approvals.new(timeout=30, **approval_fields())))
    while not approvals.pending():
        await asyncio.sleep(0)
    hangup.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hangup
    assert approvals.pending() == []
    assert isinstance(events[-1], ApprovalResolved) and events[-1].decision == "cancelled"
