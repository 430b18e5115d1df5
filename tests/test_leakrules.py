"""Leak rules: every rule's own examples, placeholders, the generic rule, redaction spans."""

from __future__ import annotations

import pytest

from broker.leaks import rules as L
from broker.leaks.rules import RULES, find_secrets, iter_provider_key_spans


def test_rule_set_is_broad_and_well_formed():
    assert len(RULES) >= 100
    for rule in RULES:
        assert rule.severity in L.SEVERITIES
        assert rule.keywords and all(k == k.lower() for k in rule.keywords), rule.id
        assert rule.true_positives and rule.false_positives, rule.id


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_rule_examples(rule: L.Rule):
    for example in rule.true_positives:
        for text in (example, f"prefix {example} suffix\n", f"line one\nline two {example}"):
            ids = [m.rule_id for m in find_secrets(text, env_like=True)]
            assert rule.id in ids, f"{rule.id} missed its example (found {ids})"
    for example in rule.false_positives:
        ids = [m.rule_id for m in find_secrets(example, env_like=True)]
        assert rule.id not in ids, f"{rule.id} matched its false-positive example"


def test_keyword_prefilter_only_narrows():
    # Every example is found through the prefilter, and by its regex directly: the
    # keywords must be present in the text the rule matches.
    for rule in RULES:
        for example in rule.true_positives:
            assert any(k in example.lower() for k in rule.keywords), rule.id


@pytest.mark.parametrize(
    ("pattern", "anchors"),
    [
        (r"(?i)(?:aws|secret_?key)[ =]+(\w+)", (("aws", 0, 0), ("secret", 0, 0))),
        (r"[0-9a-f]{32}-us\d{1,2}", (("-us", 32, 32),)),
        (r"\d{8,10}:AA[A-Za-z0-9_\-]{33}", ((":aa", 8, 10),)),
        (r"\bcurl\b.*?-u", (("curl", 0, 0),)),
        (r"[ \t](?P<flag>-p[ \t]?|--pass[ \t=])x", (("-p", 1, 1), ("--pass", 1, 1))),
        (r"(?:FlyV1 )?fm[12]_\w+", (("fm", 0, 6),)),
        (r"\w+SECRET", None),  # the literal can be any distance from the start
        (r"(?:ab|\d+)xyz", None),  # one alternative has no bounded anchor
    ],
)
def test_anchors_are_read_from_the_regex(pattern: str, anchors: tuple[tuple[str, int, int], ...] | None):
    import re

    assert L._read_regex(re.compile(pattern))[0] == anchors


def test_every_rule_the_regex_engine_cannot_search_fast_has_anchors():
    # Else it is searched over whole texts: what made the default mode slow.
    slow = [
        r.id for r, p in zip(RULES, L._PLANS, strict=True) if L._gated(r) and not p.literal_prefix and not p.anchors
    ]
    assert slow == []


def test_word_pass_finds_what_finditer_finds():
    # A rule tried only where its anchors put a match's start finds exactly what its
    # regex finds scanning every position: on every rule's examples, repeated, glued
    # to word characters, behind a line of other text, and overlapping each other.
    for rule, plan in zip(RULES, L._PLANS, strict=True):
        if rule.finder is not None or plan.starts:
            continue
        for example in rule.true_positives + rule.false_positives:
            text = f"x{example} {example}\n= {example}{example}\n'{example}'x{example[: len(example) // 2]}"
            expected = [m.span() for m in rule.regex.finditer(text)]
            assert [m.span() for m in L.Prepared(text).matches(rule, plan)] == expected, rule.id


def test_offsets_hold_in_text_that_lowercases_longer_or_does_not_decode():
    # "\u0130".lower() is two characters and invalid UTF-8 decodes to lone surrogates:
    # neither may shift where a rule looks, nor hide a key.
    token = L.fake(L.A62, 40, "offsets")
    line = f"Authorization: Bearer {token}\nX-Api-Key: {token}\ncurl -u {token}: https://x.dev\n"
    for noise in ("\u0130stanbul \u0130" * 50, b"\xff\xfe caf\xe9 ".decode("utf-8", "surrogateescape") * 50):
        text = noise + "\n" + line
        found = find_secrets(text)
        assert [m.value(text) for m in found] == [token] * 3, [m.rule_id for m in found]
        assert [m.line for m in found] == [2, 3, 4]


def test_match_reports_line_and_exact_span():
    token = "ghp_" + L.fake(L.A62, 36, "span")
    text = f"# config\n\nconst auth = '{token}';\n"
    [m] = find_secrets(text)
    assert (m.rule_id, m.line, m.severity) == ("github-ghp", 3, "critical")
    assert m.value(text) == token
    assert token not in repr(m)


def test_token_glued_to_other_word_characters_is_not_a_match():
    body = L.fake(L.A62, 36, "glued")
    assert find_secrets(f"xghp_{body}") == []
    assert find_secrets(f"ghp_{body}Z") == []


@pytest.mark.parametrize(
    "value",
    [
        "",
        "your-key-here",
        "YOUR_API_KEY",
        "xxx",
        "xxxxxxxxxxxxxxxx",
        "changeme",
        "<token>",
        "${GITHUB_TOKEN}",
        "$GITHUB_TOKEN",
        "$(op read op://vault/gh/token)",
        "{{ secrets.KEY }}",
        "sk-...",
        "********",
        "outloop:github",
        "use-outloop-broker",
        "null",
        "REDACTED",
    ],
)
def test_placeholders(value: str):
    assert L.is_placeholder(value)


def test_random_values_are_not_placeholders():
    for n in range(20):
        assert not L.is_placeholder(L.fake(L.A62, 40, f"ph{n}"))


@pytest.mark.parametrize("value", ["your-key-here", "${STRIPE_KEY}", "sk_live_" + "x" * 30, "<insert-key>", "changeme"])
def test_placeholder_values_never_alert(value: str):
    assert find_secrets(f"STRIPE_SECRET_KEY={value}\nAPI_TOKEN={value}\n", env_like=True) == []


@pytest.mark.parametrize(
    "name,secret",
    [
        ("STRIPE_API_KEY", True),
        ("DB_PASSWORD", True),
        ("dbPassword", True),
        ("client-secret", True),
        ("GITHUB_TOKEN", True),
        ("AUTH", True),
        ("JWT_SECRET", True),
        ("TOKEN_TTL", False),
        ("API_URL", False),
        ("PASSWORD_MIN_LENGTH", False),
        ("AUTH_PROVIDER", False),
        ("NEXT_PUBLIC_API_KEY", False),
        ("STRIPE_PUBLISHABLE_KEY", False),
        ("SUPABASE_ANON_KEY", False),
        ("SECRET_MANAGER", False),
    ],
)
def test_secret_names(name: str, secret: bool):
    assert L.is_secret_name(name) is secret


def test_generic_rule_in_env_files():
    strong = L.fake(L.A62, 24, "generic") + "#9"
    text = (
        "DEBUG=true\nAPI_URL=https://api.example.com/v1\nTOKEN_TTL=3600\n"
        "SECRET_MANAGER=vault\nDB_PASSWORD=hunter\nSESSION_SECRET=" + strong + "\n"
    )
    found = find_secrets(text, env_like=True)
    assert [(m.rule_id, m.line) for m in found] == [("generic-secret", 6)]
    assert found[0].value(text) == strong


def test_generic_rule_applies_to_other_files_only_with_all_rules():
    typed = "Tr0ub4dor&3xQ!"  # a strong password, not a generated token
    code = f'db_password = "{typed}"\npassword = self.password\nkey = compute_key(a, b)\n'
    assert find_secrets(code) == []
    found = find_secrets(code, all_rules=True)
    assert [(m.rule_id, m.value(code)) for m in found] == [("generic-secret", typed)]


def test_token_shaped_assignment_is_found_by_default_in_any_file():
    token = L.fake(L.A62, 28, "code") + "9x"
    code = f'db_password = "{token}"\n'
    assert [(m.rule_id, m.value(code)) for m in find_secrets(code)] == [("secret-assignment", token)]


def test_provider_rule_wins_over_generic_for_the_same_value():
    token = "npm_" + L.fake(L.A62, 36, "npm")
    [m] = find_secrets(f"NPM_TOKEN={token}\n", env_like=True)
    assert m.rule_id == "npm-access-token"


def test_non_env_text_gets_only_confident_rules():
    value = L.fake(L.A62, 14, "weak") + "#1"  # generic-only: no provider format, not token-long
    assert find_secrets(f"SESSION_SECRET={value}") == []
    assert [m.rule_id for m in find_secrets(f"SESSION_SECRET={value}", env_like=True)] == ["generic-secret"]


def test_jwts_are_found_in_any_file_but_not_redacted():
    jwt = L.RULES_BY_ID["jwt"].true_positives[0].split("=", 1)[1]
    assert [m.rule_id for m in find_secrets(f"token: {jwt}")] == ["jwt"]
    assert list(iter_provider_key_spans(f"token: {jwt}")) == []


def test_hard_negatives_are_quiet():
    text = "\n".join(
        [
            "commit 3f786850e387550fdab836ed7e6dc881de23001b",
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            '"integrity": "sha512-' + L.fake(L.B64, 86, "int") + '=="',
            "id = 123e4567-e89b-12d3-a456-426614174000",
            "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
            "postgres://user:password@localhost:5432/app",
            "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        ]
    )
    assert find_secrets(text) == []


def test_provider_key_spans_for_redaction():
    a = "sk-ant-api03-" + L.fake(L.B64URL, 93, "red") + "AA"
    b = "xoxb-" + L.fake(L.DIGITS, 12, "r1") + "-" + L.fake(L.DIGITS, 12, "r2") + "-" + L.fake(L.A62, 24, "r3")
    text = f'{{"k": "{a}", "note": "ok", "slack": "{b}"}}'
    spans = list(iter_provider_key_spans(text))
    assert [(text[s:e], rule) for s, e, rule in spans] == [(a, "anthropic-api-key"), (b, "slack-bot-token")]


def test_entropy():
    assert L.shannon_entropy("") == 0
    assert L.shannon_entropy("aaaa") == 0
    assert L.shannon_entropy("ab") == 1


@pytest.mark.parametrize(
    "name,secret",
    [
        ("PRIVATE_KEY_B64", True),
        ("GOOGLE_CREDENTIALS_JSON", True),
        ("TLS_KEY_PEM", True),
        ("SIGNING_SECRET_BASE64", True),
        ("CONFIG_JSON", False),
        ("B64", False),
    ],
)
def test_encoding_suffixes_are_stripped_before_judging_a_name(name: str, secret: bool):
    assert L.is_secret_name(name) is secret


@pytest.mark.parametrize(
    "value",
    [
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
        "development key",
        "os.getenv(KEY_NAME)",
        "a1b2 c3d4 e5f6 g7h8",
    ],
)
def test_values_with_spaces_or_parentheses_are_not_generic_secrets(value: str):
    assert not L.is_strong_value(value)
    assert find_secrets(f'API_KEY="{value}"\n', env_like=True) == []


def test_generic_rule_reads_every_line_shape_of_env_files():
    v = [L.fake(L.A62, 18, f"shape{i}") + "%9" for i in range(5)]
    pem_body = L.fake(L.B64, 64, "shape-pem")
    text = (
        f"API_KEY={v[0]}\n"
        f"export SESSION_SECRET='{v[1]}'\n"
        f"auth_token: {v[2]}\n"
        f'  "client_secret": "{v[3]}",\n'
        f'SIGNING_KEY="first line\n{v[4]}\nlast line"\n'
        f'TLS_KEY_PEM="-----BEGIN PRIVATE KEY-----\n{pem_body}\n{pem_body}\n-----END PRIVATE KEY-----"\n'
    )
    found = {m.line: m.rule_id for m in find_secrets(text, env_like=True)}
    assert {1, 2, 3, 4} <= found.keys()  # generic, or the token-shaped assignment rule
    assert found[3] == "generic-secret" and found[8] == "private-key"


def test_context_rules_are_not_used_for_redaction():
    text = f"Authorization: Bearer {L.fake(L.A62, 40, 'red-ctx')}"
    assert [m.rule_id for m in find_secrets(text)] == ["auth-bearer-token"]
    assert list(iter_provider_key_spans(text)) == []


@pytest.mark.parametrize("word", ["your", "here", "todo", "xxxx", "Dummy", "sample"])
def test_a_long_key_holding_a_placeholder_word_by_chance_is_still_found(word: str):
    """Random base64 spells four letters now and then: a 12 KiB PEM body holds one of the
    placeholder words about one time in twenty, and such keys were taken for stand-ins."""
    lines = [L.fake(L.B64, 64, f"{word}{n}") for n in range(40)]
    lines[17] = lines[17][:30] + word + lines[17][30 + len(word) :]
    pem = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END RSA PRIVATE KEY-----\n"
    assert [m.rule_id for m in find_secrets(pem)] == ["private-key"]
    assert L.is_placeholder(f"sk-{word}-key-goes-in-this-spot")
