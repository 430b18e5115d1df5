"""The management commands through the real `outloop` console script, as a user runs them.

Every command runs as a subprocess against the session's private keyring (the
environment carries it) and the test's own OUTLOOP_HOME.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import subprocess
import sys
import tomllib
from pathlib import Path

import keyring
import pytest

from broker.config import ConfigEditor
from broker.paths import Paths
from broker.secrets import backend_info
from outloop_tui.cli import UserError, build_parser
from outloop_tui.cmd_manage import read_secret

SCRIPT = Path(sys.executable).parent / "outloop"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "outloop_tui.cli"]


def outloop(
    *args: str,
    stdin: str = "",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `outloop ARGS`; stdin is a pipe (never a tty), so secrets come from `stdin`."""
    return subprocess.run(
        [*COMMAND, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def ok(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    r = outloop(*args, stdin=stdin)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert r.stderr == ""
    return r


def user_error(r: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert `r` failed with one sentence on stderr and no traceback; return it."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("outloop: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def config_bytes() -> bytes:
    return Paths.from_env().config_file.read_bytes()


def config_raw() -> dict[str, object]:
    return tomllib.loads(Paths.from_env().config_file.read_text())


def stored(tenant: str, credential: str) -> str | None:
    return keyring.get_password("outloop", f"{tenant}/{credential}")


def new_secret() -> str:
    return "olt_" + secrets.token_hex(20)


@pytest.fixture
def acme(tmp_path: Path) -> Path:
    """A tenant `acme` with one workspace folder (returned)."""
    ws = tmp_path / "clients" / "acme"
    ws.mkdir(parents=True)
    editor = ConfigEditor(Paths.from_env())  # set-up only: in-process is faster
    editor.add_tenant("acme", "Acme Corp")
    editor.add_workspace("acme", str(ws))
    editor.save()
    return ws


# -- the whole journey, with the secret searched for in every output ----------------


def test_new_user_journey_keeps_the_secret_out_of_every_output(tmp_path: Path, outloop_home: Path) -> None:
    secret = new_secret()
    other = new_secret()
    ws = tmp_path / "clients" / "acme"
    ws.mkdir(parents=True)
    runs = [
        ok("tenant", "add", "acme", "--name", "Acme Corp"),
        ok("workspace", "add", "acme", str(ws)),
        ok(
            "credential",
            "add",
            "acme",
            "github",
            "--base-url",
            "https://api.github.com",
            "--allow",
            "GET /repos/**",
            "--ask",
            "POST /repos/*/issues",
            "--deny",
            "DELETE /**",
            stdin=secret + "\n",
        ),
        ok(
            "credential",
            "add",
            "acme",
            "jira",
            "--base-url",
            "https://jira.example.com",
            "--auth",
            "header:X-Api-Key",
            stdin=other + "\r\n",
        ),
    ]
    assert stored("acme", "github") == secret
    assert stored("acme", "jira") == other  # a Windows line ending is not part of it

    text = Paths.from_env().config_file.read_text()
    assert secret not in text and other not in text
    raw = config_raw()
    assert raw["tenants"] == {  # type: ignore[comparison-overlap]
        "acme": {
            "name": "Acme Corp",
            "workspaces": [str(ws)],
            "credentials": {
                "github": {
                    "base_url": "https://api.github.com",
                    "auth": "bearer",
                    "allow": ["GET /repos/**"],
                    "ask": ["POST /repos/*/issues"],
                    "deny": ["DELETE /**"],
                },
                "jira": {"base_url": "https://jira.example.com", "auth": "header:X-Api-Key"},
            },
        }
    }

    listed = ok("credential", "list")
    runs.append(listed)
    assert "acme/github  https://api.github.com  auth=bearer" in listed.stdout
    assert "GET /repos/**" in listed.stdout and "no secret in keyring" not in listed.stdout
    assert "every call asks the operator" in listed.stdout  # jira has no rules

    as_json = ok("credential", "list", "--json")
    runs.append(as_json)
    rows = {r["name"]: r for r in json.loads(as_json.stdout)}
    assert rows["github"] == {
        "tenant": "acme",
        "name": "github",
        "base_url": "https://api.github.com",
        "auth": "bearer",
        "allow": ["GET /repos/**"],
        "ask": ["POST /repos/*/issues"],
        "deny": ["DELETE /**"],
        "secret_in_keyring": True,
    }

    tenants = ok("tenant", "list")
    runs.append(tenants)
    assert "acme  Acme Corp" in tenants.stdout
    assert str(ws) in tenants.stdout
    tenants_json = ok("tenant", "list", "--json")
    runs.append(tenants_json)
    assert json.loads(tenants_json.stdout) == [
        {"id": "acme", "name": "Acme Corp", "workspaces": [str(ws)], "credentials": ["github", "jira"]}
    ]

    doctor = ok("doctor")
    runs.append(doctor)
    assert backend_info().name in doctor.stdout
    assert "1 tenant(s), 1 workspace(s), 2 credential(s)" in doctor.stdout
    assert "all good" in doctor.stdout

    runs.append(ok("credential", "rm", "acme", "github", "--yes"))
    assert stored("acme", "github") is None
    assert stored("acme", "jira") == other
    assert "github" not in config_raw()["tenants"]["acme"]["credentials"]  # type: ignore[index]

    runs.append(ok("credential", "add", "acme", "github", "--base-url", "https://api.github.com", stdin=secret))
    assert stored("acme", "github") == secret
    removed = ok("tenant", "rm", "acme", "--yes")
    runs.append(removed)
    assert "2 credential" in removed.stdout
    assert stored("acme", "github") is None
    assert stored("acme", "jira") is None
    assert config_raw()["tenants"] == {}

    for r in runs:
        for value in (secret, other):
            assert value not in r.stdout and value not in r.stderr, r.args
            assert value[4:20] not in r.stdout + r.stderr  # not even a slice of it
    for f in outloop_home.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert secret.encode() not in data and other.encode() not in data, f


# -- the secret's way in ----------------------------------------------------------------


def test_empty_stdin_is_refused(acme: Path) -> None:
    before = config_bytes()
    line = user_error(
        outloop("credential", "add", "acme", "github", "--base-url", "https://api.github.com", stdin=""),
        "no secret given",
    )
    assert "stdin" in line or "standard input" in line
    assert stored("acme", "github") is None
    assert config_bytes() == before


def test_secret_is_not_accepted_from_argv(acme: Path) -> None:
    secret = new_secret()
    before = config_bytes()
    for extra in ([secret], ["--secret", secret]):
        r = outloop(
            "credential", "add", "acme", "github", "--base-url", "https://x.example", *extra, stdin=new_secret()
        )
        assert r.returncode == 64  # a usage error: no such argument
        assert "Traceback" not in r.stderr
        assert secret not in r.stderr + r.stdout  # not even echoed back as "unrecognized"
    assert stored("acme", "github") is None
    assert config_bytes() == before


@pytest.mark.parametrize(
    ("piped", "value"),
    [
        ("s3cr3t\n", "s3cr3t"),
        ("s3cr3t\r\n", "s3cr3t"),
        ("s3cr3t", "s3cr3t"),
        ("with inner space\n", "with inner space"),
    ],
)
def test_read_secret_from_a_pipe(monkeypatch: pytest.MonkeyPatch, piped: str, value: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
    assert read_secret("prompt: ").reveal() == value


@pytest.mark.parametrize("piped", ["", "\n", "   \n", "line1\nline2\n", "a\rb"])
def test_read_secret_refuses_empty_or_multi_line_input(monkeypatch: pytest.MonkeyPatch, piped: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
    with pytest.raises(UserError) as info:
        read_secret("prompt: ")
    assert "line1" not in str(info.value)


# -- error paths: one sentence, non-zero, nothing changed ----------------------------------


def test_duplicate_tenant(acme: Path) -> None:
    before = config_bytes()
    user_error(outloop("tenant", "add", "acme"), "'acme' already exists")
    assert config_bytes() == before


def test_bad_tenant_name() -> None:
    line = user_error(outloop("tenant", "add", "no spaces"), "letters, digits")
    assert "no spaces" in line
    assert not Paths.from_env().config_file.exists()


@pytest.mark.parametrize(
    "args",
    [
        ("tenant", "rm", "nope"),
        ("workspace", "add", "nope", "/tmp"),
        ("credential", "rm", "nope", "github"),
    ],
)
def test_unknown_tenant(acme: Path, args: tuple[str, ...]) -> None:
    before = config_bytes()
    user_error(outloop(*args), "no tenant 'nope'")
    assert config_bytes() == before


def test_unknown_tenant_on_credential_add_stores_no_secret(acme: Path) -> None:
    user_error(
        outloop("credential", "add", "nope", "github", "--base-url", "https://api.github.com", stdin=new_secret()),
        "no tenant 'nope'",
    )
    assert stored("nope", "github") is None


def test_duplicate_credential_keeps_the_first_secret(acme: Path) -> None:
    first, second = new_secret(), new_secret()
    ok("credential", "add", "acme", "github", "--base-url", "https://api.github.com", stdin=first)
    before = config_bytes()
    r = outloop("credential", "add", "acme", "github", "--base-url", "https://api.github.com", stdin=second)
    user_error(r, "already has a credential 'github'")
    assert stored("acme", "github") == first
    assert config_bytes() == before
    assert second not in r.stderr


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--base-url", "ftp://api.github.com"], "--base-url"),
        (["--base-url", "https://user:pw@api.github.com"], "user info"),
        (["--base-url", "https://api.github.com", "--allow", "repos/**"], "repos/**"),
        (["--base-url", "https://api.github.com", "--deny", "DELETE /a**"], "whole path segment"),
        (["--base-url", "https://api.github.com", "--auth", "token"], "auth must be one of"),
    ],
)
def test_bad_credential_is_refused_before_the_secret_is_stored(acme: Path, extra: list[str], fragment: str) -> None:
    before = config_bytes()
    user_error(outloop("credential", "add", "acme", "github", *extra, stdin=new_secret()), fragment)
    assert stored("acme", "github") is None
    assert config_bytes() == before


def test_credential_rm_of_unknown_credential(acme: Path) -> None:
    user_error(outloop("credential", "rm", "acme", "github"), "no credential 'github'")


def test_workspace_of_another_tenant_is_refused(acme: Path) -> None:
    ok("tenant", "add", "beta")
    before = config_bytes()
    line = user_error(outloop("workspace", "add", "beta", str(acme / "sub")), "acme")
    assert "tenants.beta.workspaces" in line
    user_error(outloop("workspace", "add", "beta", str(acme.parent)), "acme")
    user_error(outloop("workspace", "add", "beta", str(acme)), "already belongs")
    assert config_bytes() == before


def test_workspace_add_resolves_links_and_rm_unmaps(tmp_path: Path, acme: Path) -> None:
    link = tmp_path / "acme-link"
    link.symlink_to(acme, target_is_directory=True)
    (acme / "api").mkdir()
    before = config_bytes()
    user_error(outloop("workspace", "add", "acme", str(link)), "already a workspace")
    assert config_bytes() == before
    r = ok("workspace", "add", "acme", str(link / "api"))
    assert str(acme / "api") in r.stdout
    assert config_raw()["tenants"]["acme"]["workspaces"] == [  # type: ignore[index]
        str(acme),
        str(acme / "api"),
    ]
    ok("workspace", "rm", str(acme))
    assert config_raw()["tenants"]["acme"]["workspaces"] == [str(acme / "api")]  # type: ignore[index]
    user_error(outloop("workspace", "rm", str(acme)), "not a mapped workspace")


# -- a malformed config.toml is never overwritten ---------------------------------------

BROKEN = b'[tenants.acme]\nname = "Acme"\nworkspaces = ["~/a",\n\n[broker]\n'


@pytest.fixture
def broken_config() -> Path:
    path = Paths.from_env().config_file
    path.parent.mkdir(parents=True)
    path.write_bytes(BROKEN)
    return path


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (("tenant", "add", "beta"), ""),
        (("workspace", "add", "acme", "/tmp"), ""),
        (("credential", "add", "acme", "gh", "--base-url", "https://x.example"), "s3cr3t-value"),
        (("tenant", "list"), ""),
    ],
)
def test_malformed_config_is_reported_and_left_alone(broken_config: Path, args: tuple[str, ...], stdin: str) -> None:
    line = user_error(outloop(*args, stdin=stdin), str(broken_config))
    assert "line 5" in line
    assert broken_config.read_bytes() == BROKEN
    assert stored("acme", "gh") is None


def test_invalid_config_names_file_key_and_line(tmp_path: Path) -> None:
    path = Paths.from_env().config_file
    path.parent.mkdir(parents=True)
    path.write_text(
        '[tenants.acme]\nname = "Acme"\n\n[tenants.acme.credentials.gh]\n'
        'base_url = "https://x.example"\nallow = ["GET repos"]\n'
    )
    before = path.read_bytes()
    line = user_error(outloop("tenant", "add", "beta"))
    assert f"{path}, line 6: tenants.acme.credentials.gh.allow" in line
    assert path.read_bytes() == before


def test_traceback_only_with_outloop_debug(broken_config: Path) -> None:
    quiet = outloop("tenant", "add", "beta")
    user_error(quiet)
    loud = outloop("tenant", "add", "beta", env={"OUTLOOP_DEBUG": "1"})
    assert loud.returncode != 0
    assert "Traceback (most recent call last)" in loud.stderr
    assert "ConfigError" in loud.stderr
    assert broken_config.read_bytes() == BROKEN


# -- doctor -----------------------------------------------------------------------------


def test_doctor_without_a_usable_keyring_says_what_to_do() -> None:
    r = outloop("doctor", env={"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"})
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "keyring.backends.fail.Keyring" in r.stdout
    assert "no usable keyring backend" in r.stdout
    assert "gnome-keyring" in r.stdout and "install" in r.stdout


def test_doctor_reports_a_malformed_config(broken_config: Path) -> None:
    r = outloop("doctor")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert f"[FAIL] config: {broken_config}" in r.stdout
    assert "line 5" in r.stdout
    assert broken_config.read_bytes() == BROKEN


def test_doctor_finds_a_credential_without_secret(acme: Path) -> None:
    ok("credential", "add", "acme", "github", "--base-url", "https://api.github.com", stdin=new_secret())
    keyring.delete_password("outloop", "acme/github")
    r = outloop("doctor")
    assert r.returncode == 1
    assert "acme/github has no secret in the keyring" in r.stdout
    listed = ok("credential", "list", "--json")
    assert json.loads(listed.stdout)[0]["secret_in_keyring"] is False


def test_doctor_reports_a_too_long_socket_path(tmp_path: Path) -> None:
    long_socket = "/tmp/" + "s" * 120 + ".sock"
    r = outloop("doctor", env={"OUTLOOP_SOCKET": long_socket})
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "[FAIL] socket path" in r.stdout
    assert "OUTLOOP_SOCKET" in r.stdout


def test_doctor_on_a_fresh_home() -> None:
    r = ok("doctor")
    assert "does not exist yet" in r.stdout
    assert "no broker running" in r.stdout


# -- --help everywhere ----------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())


def test_every_documented_command_exists() -> None:
    for command in [
        ("tenant", "add"),
        ("tenant", "rm"),
        ("tenant", "list"),
        ("workspace", "add"),
        ("workspace", "rm"),
        ("credential", "add"),
        ("credential", "rm"),
        ("credential", "list"),
        ("credential", "set-secret"),
        ("credential", "edit"),
        ("workspace", "list"),
        ("socket",),
        ("completion",),
        ("doctor",),
        ("call",),
        ("whoami",),
        ("scan",),
        ("alerts",),
        ("audit", "verify"),
        ("audit", "tail"),
        ("broker",),
        ("demo",),
        ("mcp",),
        ("hook",),
        ("claude",),
    ]:
        assert command in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "outloop")
def test_help_on_every_command(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: outloop {' '.join(command)}".rstrip())


def test_help_through_the_console_script() -> None:
    r = ok("--help")
    assert "credential" in r.stdout and "doctor" in r.stdout
    r = ok("credential", "add", "--help")
    assert "--base-url" in r.stdout
    assert "never from the command line" in r.stdout


# -- rotate, edit, list, confirm, usage errors, completion ---------------------------------


def _with_github(secret: str) -> None:
    args = ("--allow", "GET /repos/**", "--ask", "POST /repos/*/*/issues", "--deny", "DELETE /**")
    ok("credential", "add", "acme", "github", "--base-url", "https://api.github.com", *args, stdin=secret)


def test_rotating_a_secret_keeps_the_rules(acme: Path) -> None:
    old, new = new_secret(), new_secret()
    _with_github(old)
    before = config_bytes()
    r = ok("credential", "set-secret", "acme", "github", stdin=new)
    assert stored("acme", "github") == new
    assert config_bytes() == before  # base URL, auth and every rule as they were
    assert old not in r.stdout + r.stderr and new not in r.stdout + r.stderr
    user_error(outloop("credential", "set-secret", "acme", "nope", stdin=new_secret()), "no credential 'nope'")
    assert stored("acme", "nope") is None


def test_edit_replaces_only_what_is_given(acme: Path) -> None:
    secret = new_secret()
    _with_github(secret)
    ok("credential", "edit", "acme", "github", "--allow", "GET /user", "--allow", "GET /repos/**")
    table = config_raw()["tenants"]["acme"]["credentials"]["github"]  # type: ignore[index]
    assert table["allow"] == ["GET /user", "GET /repos/**"]
    assert table["ask"] == ["POST /repos/*/*/issues"] and table["deny"] == ["DELETE /**"]
    assert stored("acme", "github") == secret
    ok("credential", "edit", "acme", "github", "--clear-rules")
    table = config_raw()["tenants"]["acme"]["credentials"]["github"]  # type: ignore[index]
    assert not any(k in table for k in ("allow", "ask", "deny"))


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (("--allow", "GET repos"), "--allow: rule 'GET repos'"),
        (("--deny", "DELETE /a/**b"), "--deny: rule 'DELETE /a/**b'"),
        (("--auth", "token"), "--auth: auth must be one of"),
        (("--base-url", "ftp://x"), "--base-url must be an http"),
    ],
)
def test_a_bad_flag_is_named_as_the_flag(acme: Path, extra: tuple[str, str], flag: str) -> None:
    before = config_bytes()
    add = ["credential", "add", "acme", "gh", "--base-url", "https://api.github.com"]
    if extra[0] == "--base-url":
        add = add[:4]
    line = user_error(outloop(*add, *extra, stdin=new_secret()), flag)
    assert "config.toml" not in line and "line " not in line
    assert config_bytes() == before and stored("acme", "gh") is None


def test_destructive_commands_ask_and_keep_everything_when_not_confirmed(acme: Path) -> None:
    secret = new_secret()
    _with_github(secret)
    before = config_bytes()
    for args in (("credential", "rm", "acme", "github"), ("tenant", "rm", "acme")):
        user_error(outloop(*args), "--yes")  # stdin is not a terminal: no silent yes
        assert config_bytes() == before and stored("acme", "github") == secret
    ok("credential", "rm", "acme", "github", "--yes")
    assert stored("acme", "github") is None


def test_workspace_list(acme: Path) -> None:
    r = ok("workspace", "list", "--json")
    assert json.loads(r.stdout) == [{"tenant": "acme", "path": str(acme), "exists": True}]
    assert str(acme) in ok("workspace", "list").stdout


def test_usage_errors_exit_64_not_like_a_refusal(acme: Path) -> None:
    for args in (("call",), ("credential", "add", "acme"), ("no-such-command",)):
        r = outloop(*args)
        assert r.returncode == 64, (args, r.stderr)
        assert "usage:" in r.stderr and "Traceback" not in r.stderr


def test_socket_prints_where_the_broker_listens(acme: Path) -> None:
    assert ok("socket").stdout.strip() == str(Paths.from_env().socket)


def test_doctor_json(acme: Path) -> None:
    r = outloop("doctor", "--json")
    report = json.loads(r.stdout)
    assert report["ok"] is (r.returncode == 0)
    assert {c["status"] for c in report["checks"]} <= {"ok", "fail", "note"}
    assert any("config:" in c["what"] for c in report["checks"])


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_and_completions(shell: str, tmp_path: Path) -> None:
    script = ok("completion", shell).stdout
    assert "outloop" in script and "_ARGCOMPLETE" in script
    out = tmp_path / "completions"
    line = "outloop credential "
    r = subprocess.run(
        COMMAND,
        env={
            **os.environ,
            "_ARGCOMPLETE": "1",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_IFS": " ",
            "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert {"add", "set-secret", "edit", "rm", "list"} <= set(out.read_text().split())
