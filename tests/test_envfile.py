"""Tolerant .env parsing."""

from __future__ import annotations

from broker.leaks.envfile import env_dict, parse_env


def test_basic_forms():
    text = (
        "# comment\n"
        "PLAIN=value\n"
        "export EXPORTED=yes\n"
        "  SPACED = padded  \n"
        "SINGLE='it''s raw $HOME'\n"
        'DOUBLE="line\\nnext \\"q\\""\n'
        "BACKTICK=`tick`\n"
        "INLINE=abc # trailing comment\n"
        "HASH=abc#not-a-comment\n"
        "EMPTY=\n"
        "not an assignment\n"
        "source_up\n"
    )
    env = env_dict(text)
    assert env == {
        "PLAIN": "value",
        "EXPORTED": "yes",
        "SPACED": "padded",
        "SINGLE": "it",
        "DOUBLE": 'line\nnext "q"',
        "BACKTICK": "tick",
        "INLINE": "abc",
        "HASH": "abc#not-a-comment",
        "EMPTY": "",
    }


def test_lines_and_spans_point_into_the_original_text():
    text = "A=1\n\nexport B='two'\nC=\"three\"\n"
    entries = parse_env(text)
    assert [(e.key, e.line) for e in entries] == [("A", 1), ("B", 3), ("C", 4)]
    for e in entries:
        assert text[e.value_start : e.value_end] == e.value


def test_crlf_and_bom():
    text = "\ufeffA=1\r\nB=two words\r\n\r\nC='q'\r\n"
    entries = parse_env(text)
    assert [(e.key, e.value, e.line) for e in entries] == [("A", "1", 1), ("B", "two words", 2), ("C", "q", 4)]


def test_multiline_quoted_value_keeps_following_line_numbers():
    text = 'KEY="-----BEGIN\nabc\n-----END"\nNEXT=1\n'
    key, nxt = parse_env(text)
    assert key.value == "-----BEGIN\nabc\n-----END" and key.line == 1
    assert (nxt.key, nxt.line) == ("NEXT", 4)


def test_unterminated_quote_takes_only_its_line():
    entries = parse_env("A='open\nB=2\n")
    assert [(e.key, e.value) for e in entries] == [("A", "open"), ("B", "2")]


def test_duplicate_keys_are_all_reported_and_last_wins():
    text = "TOKEN=first\nTOKEN=second\n"
    assert [e.value for e in parse_env(text)] == ["first", "second"]
    assert env_dict(text) == {"TOKEN": "second"}


def test_value_is_not_in_repr():
    [e] = parse_env("TOKEN=supersecretvalue123\n")
    assert "supersecretvalue123" not in repr(e)
