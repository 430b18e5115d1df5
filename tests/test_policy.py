"""Policy rules and request-path normalisation: pure functions, no I/O."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from broker.policy import (
    CACHED_PATH_MAX,
    Decision,
    PathRejected,
    RuleError,
    decide,
    normalize_path,
    parse_rule,
)


def allowed(rule: str, method: str, path: str) -> bool:
    """Does `rule` match `method path` (the path normalised as the broker would, for a
    credential that allows encoded slashes)?"""
    return parse_rule(rule).matches(method, normalize_path(path, allow_encoded_slash=True).match_key)


def verdict(
    method: str,
    path: str,
    *,
    allow: tuple[str, ...] = (),
    ask: tuple[str, ...] = (),
    deny: tuple[str, ...] = (),
) -> Decision:
    return decide(method, normalize_path(path, allow_encoded_slash=True), allow, ask, deny)


# -- parse_rule ----------------------------------------------------------------


def test_parse_rule_reads_method_and_glob() -> None:
    rule = parse_rule("GET /repos/**")
    assert rule.method == "GET"
    assert rule.text == "GET /repos/**"


def test_parse_rule_accepts_star_method_and_lower_case() -> None:
    assert parse_rule("* /x").method == "*"
    assert parse_rule("post /x").method == "POST"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("/repos/**", "METHOD /path"),  # no method
        ("", "METHOD /path"),
        ("GET /a /b", "METHOD /path"),  # three parts
        ("G@T /repos", "not an HTTP method"),
        ("GET! /repos", "not an HTTP method"),
        ("1GET /repos", "not an HTTP method"),
        ("GET repos/**", "must start with '/'"),
        ("GET *", "must start with '/'"),
        ("GET /repos/a**", "whole path segment"),
        ("GET /repos/**b/c", "whole path segment"),
        ("GET /***", "whole path segment"),
        ("GET /repos/../admin", "'..'"),
        ("GET /repos/./x", "'.'"),
        ("GET /repos//x", "empty"),
    ],
)
def test_parse_rule_refuses_malformed_rules(text: str, fragment: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rule(text)
    assert fragment in str(info.value)


# -- matching --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "matches"),
    [
        ("/repos/o", True),
        ("/repos/o/", True),  # a trailing slash is the same resource
        ("/repos/o/r", False),  # `*` is exactly one segment
        ("/repos", False),
        ("/repos/", False),
        ("/reposx/o", False),
    ],
)
def test_star_matches_exactly_one_segment(path: str, matches: bool) -> None:
    assert allowed("GET /repos/*", "GET", path) is matches


@pytest.mark.parametrize(
    ("path", "matches"),
    [
        ("/repos", True),  # zero segments
        ("/repos/", True),
        ("/repos/o", True),
        ("/repos/o/r/issues/1/comments", True),
        ("/reposx", False),
        ("/repo", False),
        ("/user/repos", False),
    ],
)
def test_double_star_matches_any_number_of_segments(path: str, matches: bool) -> None:
    assert allowed("GET /repos/**", "GET", path) is matches


def test_double_star_in_the_middle() -> None:
    rule = "GET /repos/**/hooks"
    assert allowed(rule, "GET", "/repos/hooks")
    assert allowed(rule, "GET", "/repos/o/r/hooks")
    assert not allowed(rule, "GET", "/repos/o/r/hooks/1")
    assert not allowed(rule, "GET", "/repos/o/r/webhooks")


def test_star_inside_a_segment_stays_in_that_segment() -> None:
    rule = "GET /files/*.json"
    assert allowed(rule, "GET", "/files/a.json")
    assert not allowed(rule, "GET", "/files/a/b.json")
    assert not allowed(rule, "GET", "/files/a.jsonx")


def test_glob_metacharacters_in_rules_are_literal() -> None:
    # A regex-looking rule must not become a regex.
    assert not allowed("GET /a.c", "GET", "/abc")
    assert allowed("GET /a.c", "GET", "/a.c")
    assert not allowed("GET /(x|y)", "GET", "/x")


def test_root_rule() -> None:
    assert allowed("GET /", "GET", "/")
    assert not allowed("GET /", "GET", "/x")
    assert allowed("GET /**", "GET", "/")
    assert allowed("GET /**", "GET", "/a/b")


def test_method_must_match_unless_star() -> None:
    assert not allowed("GET /x", "POST", "/x")
    assert allowed("* /x", "PATCH", "/x")


# -- decide: precedence ------------------------------------------------------------


def test_no_rules_means_ask_for_everything() -> None:
    for method, path in (("GET", "/"), ("DELETE", "/repos/o/r"), ("POST", "/anything")):
        d = verdict(method, path)
        assert d.action == "ask"
        assert d.rule is None


def test_deny_wins_over_allow_and_ask() -> None:
    d = verdict("DELETE", "/repos/o/r", allow=("* /**",), ask=("DELETE /repos/**",), deny=("DELETE /**",))
    assert (d.action, d.rule) == ("deny", "DELETE /**")


def test_allow_wins_over_ask() -> None:
    d = verdict("GET", "/repos/o/r", allow=("GET /repos/**",), ask=("* /**",))
    assert (d.action, d.rule) == ("allow", "GET /repos/**")


def test_ask_when_only_ask_matches() -> None:
    d = verdict("POST", "/repos/o/r/issues", allow=("GET /repos/**",), ask=("POST /repos/*/*/issues",))
    assert (d.action, d.rule) == ("ask", "POST /repos/*/*/issues")


def test_default_is_deny_when_rules_exist_but_none_matches() -> None:
    d = verdict("GET", "/user", allow=("GET /repos/**",))
    assert (d.action, d.rule) == ("deny", None)
    d = verdict("PUT", "/repos/o/r", ask=("POST /repos/**",))
    assert d.action == "deny"


def test_deny_rules_alone_deny_the_rest_too() -> None:
    # Having any rule at all switches off "ask for everything".
    assert verdict("GET", "/x", deny=("DELETE /**",)).action == "deny"


def test_decision_reason_names_the_rule() -> None:
    assert "GET /repos/**" in verdict("GET", "/repos/x", allow=("GET /repos/**",)).reason
    assert "no rule" in verdict("GET", "/x", allow=("GET /y",)).reason


def test_lower_case_method_cannot_slip_past_a_deny_rule() -> None:
    # HTTP clients upper-case the method on the wire, so policy must see it upper-cased too.
    d = verdict("delete", "/repos/o/r", allow=("* /**",), deny=("DELETE /**",))
    assert d.action == "deny"


@pytest.mark.parametrize("method", ["GETX", "GE", "G", "XGET", "GET-"])
def test_a_method_rule_matches_that_method_exactly(method: str) -> None:
    assert verdict(method, "/x", allow=("GET /**",)).action == "deny"
    assert verdict(method, "/x", allow=(f"{method} /**",)).action == "allow"


@pytest.mark.parametrize("method", ["po\u017ft", "l\u0131nk", "\u0393\u0395\u03a4", "GET\n", "GET /x", ""])
def test_a_method_that_is_not_an_ascii_token_is_denied_even_by_a_star_rule(method: str) -> None:
    # str.upper() turns the long s into "S" and the dotless i into "I": "POST", "LINK".
    assert verdict(method, "/x", allow=("* /**", "POST /**", "LINK /**")).action == "deny"
    assert verdict(method, "/x").action == "deny"  # not even asked about


def test_a_rule_method_is_upper_cased_as_ascii_only() -> None:
    assert verdict("GET", "/x", allow=("get /**",)).action == "allow"
    with pytest.raises(RuleError):
        parse_rule("po\u017ft /x")


# -- normalize_path: refusals -------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "/repos/../admin",
        "/repos/..",
        "/..",
        "/repos/%2e%2e/admin",
        "/repos/%2E%2E/admin",
        "/repos/%2E./admin",
        "/repos/.%2e/admin",
        "/repos/./x",
        "/repos/%2e/x",
        "/.",
        "//evil.example/x",
        "//",
        "http://x/repos",
        "https://api.github.com/repos",
        "repos/o",
        "",
        "/repos\\..\\admin",
        "/repos/%5C..%5Cadmin",
        "/repos/a\x00b",
        "/repos/a%00b",
        "/repos/a\nb",
        "/repos/a%0Ab",
        "/repos/a%0d%0aHost:%20x",
        "/repos/a\tb",
        "/repos/a b",
        "/repos/a\x7fb",
        "/repos/a%7Fb",
        "/repos/o?x=1",
        "/repos/o#frag",
        "/repos/%ff",
        "/repos/%C3",  # truncated UTF-8 sequence
        "/repos/%C0%AF",  # overlong encoding of "/"
        "/repos//o",
        "/repos/o//",
        "/repos/%2e%2e%2fadmin",  # "../admin" in one segment: an upstream that decodes %2F
        "/repos/x%2F..%2F..%2Fadmin",  # would see a traversal
        "/repos/..;/admin",  # a servlet container treats "..;" as ".."
    ],
)
def test_normalize_path_refuses_unsafe_paths(raw: str) -> None:
    with pytest.raises(PathRejected):
        normalize_path(raw)


def test_dotdot_path_never_reaches_a_rule() -> None:
    # `/repos/../admin` is refused outright; it cannot match `GET /repos/**` as "/admin"
    # nor as "/repos/..".
    with pytest.raises(PathRejected):
        verdict("GET", "/repos/../admin", allow=("GET /repos/**",))
    with pytest.raises(PathRejected):
        verdict("GET", "/repos/%2e%2e/admin", allow=("GET /repos/**",))


# -- normalize_path: canonical form ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "encoded", "segments"),
    [
        ("/", "/", ()),
        ("/repos/o/r", "/repos/o/r", ("repos", "o", "r")),
        ("/repos/o/", "/repos/o/", ("repos", "o")),  # trailing slash kept for the upstream
        ("/%72epos", "/repos", ("repos",)),  # needless escapes decoded
        ("/a/%7Euser", "/a/~user", ("a", "~user")),
        ("/a/caf%c3%a9", "/a/caf%C3%A9", ("a", "café")),  # upper-case hex
        ("/a/café", "/a/caf%C3%A9", ("a", "café")),
        ("/a/b%20c", "/a/b%20c", ("a", "b c")),
        ("/a/b%2Fc", "/a/b%2Fc", ("a", "b/c")),  # an encoded slash stays encoded
        ("/a/100%25", "/a/100%25", ("a", "100%")),
        ("/a/x:y@z", "/a/x:y@z", ("a", "x:y@z")),
        ("/a/...", "/a/...", ("a", "...")),  # not a dot segment
        ("/a/.well-known", "/a/.well-known", ("a", ".well-known")),
    ],
)
def test_normalize_path_canonical_form(raw: str, encoded: str, segments: tuple[str, ...]) -> None:
    n = normalize_path(raw, allow_encoded_slash=True)
    assert n.encoded == encoded
    assert n.segments == segments


def test_canonical_form_is_stable() -> None:
    for raw in ("/a/caf%c3%a9", "/a/b%2Fc", "/%72epos/x/", "/a/100%25"):
        once = normalize_path(raw, allow_encoded_slash=True)
        assert normalize_path(once.encoded, allow_encoded_slash=True) == once


def test_encoded_letters_cannot_dodge_a_deny_rule() -> None:
    d = verdict("DELETE", "/repos/%6f/%72", allow=("* /**",), deny=("DELETE /repos/o/r",))
    assert d.action == "deny"


# -- an encoded "/" is part of a segment, never a separator ----------------------------
# Decision: `%2F` inside a segment is refused unless the credential sets
# allow_encoded_slash (an upstream that decodes it before routing sees another path
# than the one judged: issue 15); with it (GitLab addresses projects as
# `group%2Fproject`), it stays inside its segment for matching and is forwarded as `%2F`.


@pytest.mark.parametrize("raw", ["/repos/o/r%2Fsecrets/PROD", "/a/b%2fc", "/a/%2F", "/a/b%252F%2Fc"])
def test_an_encoded_slash_is_refused_unless_the_credential_allows_it(raw: str) -> None:
    with pytest.raises(PathRejected, match=r"encoded '/' \(%2F\)") as refused:
        normalize_path(raw)
    assert "allow_" not in str(refused.value)  # the opt-in is the operator's to know
    assert "/" in "".join(normalize_path(raw, allow_encoded_slash=True).segments)


@pytest.mark.parametrize("raw", ["/a/b;jsessionid=1", "/a;x/b", "/a/b%3Bc"])
def test_path_parameters_are_refused_unless_the_credential_allows_them(raw: str) -> None:
    with pytest.raises(PathRejected, match="';' parameter") as refused:
        normalize_path(raw)
    assert "allow_" not in str(refused.value)
    assert ";" in "".join(normalize_path(raw, allow_path_params=True).segments)


def test_an_encoded_backslash_is_refused_even_with_the_opt_ins() -> None:
    for raw in ("/a/b%5Cc", "/a/b%5cc"):
        with pytest.raises(PathRejected):
            normalize_path(raw, allow_encoded_slash=True, allow_path_params=True)


def test_encoded_slash_does_not_split_a_segment_for_the_matcher() -> None:
    assert not allowed("GET /repos/*/*", "GET", "/repos/a%2Fb")
    assert allowed("GET /repos/*", "GET", "/repos/a%2Fb")
    assert normalize_path("/repos/a%2Fb", allow_encoded_slash=True).encoded == "/repos/a%2Fb"


def test_encoded_slash_is_matched_as_one_segment_by_rules() -> None:
    rules = {"allow": ("GET /projects/*",), "deny": ("GET /projects/*/secrets",)}
    # "a%2Fsecrets" is one segment (a project id), not /projects/a/secrets.
    assert verdict("GET", "/projects/a%2Fsecrets", **rules).action == "allow"
    assert verdict("GET", "/projects/a/secrets", **rules).action == "deny"


def test_literal_percent_cannot_pose_as_an_encoded_slash() -> None:
    # "%252F" decodes to the text "%2F", which must not look like the encoded slash.
    n = normalize_path("/repos/a%252Fb")  # no "/" in it: no opt-in needed
    assert n.segments == ("repos", "a%2Fb")
    assert n.encoded == "/repos/a%252Fb"
    assert n.match_key != normalize_path("/repos/a%2Fb", allow_encoded_slash=True).match_key


@pytest.mark.parametrize(
    "filler", ["", "/x" * (CACHED_PATH_MAX // 2), "/é"], ids=["kept-in-the-cache", "too-long-to-keep", "not-ascii"]
)
def test_cached_and_uncached_paths_are_judged_alike(filler: str) -> None:
    # Short ASCII paths are memoised, others are not: all must be normalised and refused the same.
    assert normalize_path(f"{filler}/repos/a%20b/").encoded == f"{quote(filler)}/repos/a%20b/"
    assert normalize_path(f"{filler}/repos/a%20b/") == normalize_path(f"{filler}/repos/a%20b/")
    for bad in (f"{filler}/repos/../admin", f"{filler}/repos/%2e%2e/admin", f"{filler}//x"):
        for _ in range(2):  # the second time, from the cache if it were kept (errors are not)
            with pytest.raises(PathRejected):
                normalize_path(bad)
