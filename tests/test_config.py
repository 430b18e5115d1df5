"""config.toml: paths, validation errors, round trips, atomic writes, workspace mapping."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import broker.paths
from broker import config_approval
from broker.config import (
    DEFAULTS,
    ConfigEditor,
    ConfigError,
    load_config,
    resolve_workspace,
)
from broker.paths import SOCKET_PATH_LIMIT, PathError, Paths, atomic_write

VALID_CREDENTIAL = """\
[tenants.acme]
name = "Acme"

[tenants.acme.credentials.gh]
base_url = "https://api.github.com"
"""


@pytest.fixture
def paths() -> Paths:
    return Paths.from_env()


def write_config(paths: Paths, text: str) -> Path:
    paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text(textwrap.dedent(text), encoding="utf-8")
    return paths.config_file


def config_error(paths: Paths, text: str) -> str:
    write_config(paths, text)
    with pytest.raises(ConfigError) as info:
        load_config(paths)
    return str(info.value)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- paths ---------------------------------------------------------------------------


def test_outloop_home_holds_everything(outloop_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUTLOOP_SOCKET")
    p = Paths.from_env()
    assert p.config_file == outloop_home / "config.toml"
    assert p.state_dir == outloop_home / "state"
    assert p.socket == outloop_home / "broker.sock"
    assert p.audit_dir == outloop_home / "state" / "audit"
    assert p.alerts_file == outloop_home / "state" / "alerts.jsonl"


def test_outloop_socket_overrides_the_socket_only(tmp_path: Path, outloop_home: Path) -> None:
    p = Paths.from_env({"OUTLOOP_HOME": str(outloop_home), "OUTLOOP_SOCKET": "/tmp/x.sock"})
    assert p.socket == Path("/tmp/x.sock")
    assert p.config_file == outloop_home / "config.toml"


def test_home_and_socket_expand_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    p = Paths.from_env({"OUTLOOP_HOME": "~/ol", "OUTLOOP_SOCKET": "~/s.sock"})
    assert p.config_file == tmp_path / "ol" / "config.toml"
    assert p.socket == tmp_path / "s.sock"


def test_without_outloop_home_platform_dirs_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if sys.platform != "linux":
        pytest.skip("XDG variables steer platformdirs on Linux only")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    p = Paths.from_env({})
    assert p.config_file == tmp_path / "cfg" / "outloop" / "config.toml"
    assert p.state_dir == tmp_path / "st" / "outloop"


def test_socket_path_limit_is_a_clear_error(tmp_path: Path) -> None:
    room = SOCKET_PATH_LIMIT - 1 - len("/tmp/")  # longest path that still fits with its NUL
    fits = Paths.from_env({"OUTLOOP_HOME": str(tmp_path), "OUTLOOP_SOCKET": "/tmp/" + "a" * room})
    fits.check_socket_path()
    too_long = Paths.from_env({"OUTLOOP_HOME": str(tmp_path), "OUTLOOP_SOCKET": "/tmp/" + "a" * (room + 1)})
    with pytest.raises(PathError) as info:
        too_long.check_socket_path()
    assert "OUTLOOP_SOCKET" in str(info.value)
    assert str(SOCKET_PATH_LIMIT - 1) in str(info.value)


# -- validation errors -----------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line(paths: Paths) -> None:
    message = config_error(paths, '[broker]\napproval_timeout = 120\n[tenants.acme\nname = "x"\n')
    assert str(paths.config_file) in message
    assert "line 3" in message


def test_file_that_is_not_utf8_is_an_error(paths: Paths) -> None:
    paths.config_file.parent.mkdir(parents=True)
    paths.config_file.write_bytes(b'[tenants.acme]\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(paths)
    assert str(paths.config_file) in str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        # [broker]
        ("broker = 5\n", "broker", 1),
        ('[broker]\napproval_timeout = "soon"\n', "broker.approval_timeout", 2),
        ("[broker]\n\napproval_timeout = true\n", "broker.approval_timeout", 3),
        ("[broker]\napproval_timeout = [1]\n", "broker.approval_timeout", 2),
        # tenants
        ("tenants = 5\n", "tenants", 1),
        ('tenants = "acme"\n', "tenants", 1),
        ("[tenants]\nacme = 5\n", "tenants.acme", 2),
        ("[tenants.acme]\nname = 5\n", "tenants.acme.name", 2),
        ('[tenants.acme]\nname = "A"\nworkspaces = "~/x"\n', "tenants.acme.workspaces", 3),
        ("[tenants.acme]\nworkspaces = [1]\n", "tenants.acme.workspaces", 2),
        ('[tenants.acme]\nworkspaces = [""]\n', "tenants.acme.workspaces", 2),
        ("[tenants.acme]\ncredentials = 5\n", "tenants.acme.credentials", 2),
        ("[tenants.acme.credentials]\ngh = 5\n", "tenants.acme.credentials.gh", 2),
        # credentials
        ("[tenants.acme.credentials.gh]\nauth = 'bearer'\n", "tenants.acme.credentials.gh.base_url", 1),
        ("[tenants.acme.credentials.gh]\nbase_url = 5\n", "tenants.acme.credentials.gh.base_url", 2),
        ('[tenants.acme.credentials.gh]\nbase_url = "https://x"\nauth = 5\n', "tenants.acme.credentials.gh.auth", 3),
        (
            '[tenants.acme.credentials.gh]\nbase_url = "https://x"\nallow = "GET /x"\n',
            "tenants.acme.credentials.gh.allow",
            3,
        ),
        ('[tenants.acme.credentials.gh]\nbase_url = "https://x"\nask = [1]\n', "tenants.acme.credentials.gh.ask", 3),
        (
            '[tenants.acme.credentials.gh]\nbase_url = "https://x"\ndeny = {a = 1}\n',
            "tenants.acme.credentials.gh.deny",
            3,
        ),
    ],
)
def test_wrong_types_name_file_key_and_line(paths: Paths, text: str, key: str, line: int) -> None:
    message = config_error(paths, text)
    assert message.startswith(f"{paths.config_file}, line {line}: {key} "), message


@pytest.mark.parametrize("setting", sorted(DEFAULTS))
@pytest.mark.parametrize("value", ["0", "-1", "-0.5", '"10"', "true"])
def test_broker_settings_must_be_positive_numbers(paths: Paths, setting: str, value: str) -> None:
    message = config_error(paths, f"[broker]\n{setting} = {value}\n")
    assert message.startswith(f"{paths.config_file}, line 2: broker.{setting} "), message
    assert "positive" in message


@pytest.mark.parametrize("value", ["-1", "17", "1.5", "true", '"2"'])
def test_forward_workers_must_be_a_small_whole_number(paths: Paths, value: str) -> None:
    message = config_error(paths, f"[broker]\nforward_workers = {value}\n")
    assert message.startswith(f"{paths.config_file}, line 2: broker.forward_workers "), message


def test_forward_workers_may_be_zero(paths: Paths) -> None:
    write_config(paths, "[broker]\nforward_workers = 0\n")
    assert load_config(paths).broker.forward_workers == 0


def test_broker_settings_are_read(paths: Paths) -> None:
    write_config(paths, "[broker]\napproval_timeout = 5\nupstream_timeout = 2.5\nmax_request_bytes = 1000\n")
    b = load_config(paths).broker
    assert b.approval_timeout == 5
    assert b.upstream_timeout == 2.5
    assert b.max_request_bytes == 1000
    assert b.max_response_bytes == DEFAULTS["max_response_bytes"]


def test_fractional_seconds_are_kept(paths: Paths) -> None:
    # A sub-second timeout must not be truncated to 0 (which would mean "no time at all").
    write_config(paths, "[broker]\nupstream_timeout = 0.5\nalways_ttl = 1.5\n")
    b = load_config(paths).broker
    assert b.upstream_timeout == 0.5
    assert b.always_ttl == 1.5


def test_byte_limits_must_be_whole_numbers(paths: Paths) -> None:
    message = config_error(paths, "[broker]\nmax_request_bytes = 0.5\n")
    assert "broker.max_request_bytes" in message


@pytest.mark.parametrize("tid", ["bad name", "-acme", "ac/me", "", "a" * 65, "ác"])
def test_bad_tenant_ids(paths: Paths, tid: str) -> None:
    message = config_error(paths, f'[tenants."{tid}"]\nname = "x"\n')
    assert message.startswith(f"{paths.config_file}, line 1: tenants.{tid} "), message


@pytest.mark.parametrize("name", ["bad name", "_gh", "g/h", "", "g" * 65])
def test_bad_credential_names(paths: Paths, name: str) -> None:
    message = config_error(paths, f'[tenants.acme.credentials."{name}"]\nbase_url = "https://x"\n')
    assert message.startswith(f"{paths.config_file}, line 1: tenants.acme.credentials.{name} ")


@pytest.mark.parametrize(
    "url",
    [
        "api.github.com",  # no scheme
        "ftp://api.github.com",
        "file:///etc/passwd",
        "https://",
        "https:///path",
        "https://api.github.com/?per_page=100",
        "https://api.github.com/?",
        "https://api.github.com/#frag",
        "https://user@api.github.com",
        "https://user:pw@api.github.com",
        "https://:pw@api.github.com",
        "https://@api.github.com",
        "https://api.github.com:99999",
        "https://api.github.com:port",
        "https://api.github.com/a b",
        "https://api.github.com\n/x",
        "https://api.github.com/\tx",
    ],
)
def test_bad_base_urls(paths: Paths, url: str) -> None:
    message = config_error(paths, f"[tenants.acme.credentials.gh]\nbase_url = {tomli_string(url)}\n")
    assert message.startswith(f"{paths.config_file}, line 2: tenants.acme.credentials.gh.base_url "), message


@pytest.mark.parametrize("url", ["https://api.github.com", "http://127.0.0.1:8080/v1/", "https://[::1]:443/api"])
def test_good_base_urls(paths: Paths, url: str) -> None:
    write_config(paths, f"[tenants.acme.credentials.gh]\nbase_url = {tomli_string(url)}\n")
    cred = load_config(paths).tenants["acme"].credentials["gh"]
    assert cred.base_url == url.rstrip("/")


@pytest.mark.parametrize(
    "auth",
    [
        "token",
        "bearer:x",
        "basic",
        "basic:",
        "basic:a:b",
        "header",
        "header:",
        "header:Bad Header",
        "header:X:Y",
        "query",
        "query:",
        "query:a b",
        "",
        "BEARER",
    ],
)
def test_bad_auth_kinds(paths: Paths, auth: str) -> None:
    message = config_error(
        paths,
        f'[tenants.acme.credentials.gh]\nbase_url = "https://x"\nauth = {tomli_string(auth)}\n',
    )
    assert message.startswith(f"{paths.config_file}, line 3: tenants.acme.credentials.gh.auth ")
    assert "bearer" in message  # says what is allowed


@pytest.mark.parametrize(
    ("auth", "kind", "arg"),
    [
        ("bearer", "bearer", ""),
        ("basic:me", "basic", "me"),
        ("header:X-Api-Key", "header", "X-Api-Key"),
        ("query:api_key", "query", "api_key"),
    ],
)
def test_good_auth_kinds(paths: Paths, auth: str, kind: str, arg: str) -> None:
    write_config(paths, f'[tenants.a.credentials.c]\nbase_url = "https://x"\nauth = "{auth}"\n')
    cred = load_config(paths).tenants["a"].credentials["c"]
    assert (cred.auth.kind, cred.auth.arg, str(cred.auth)) == (kind, arg, auth)


@pytest.mark.parametrize("kind", ["allow", "ask", "deny"])
@pytest.mark.parametrize(
    "rule",
    ["/repos/**", "G@T /x", "GET repos", "GET /a**", "GET /a/**b", "GET /a/../b", "GET /a//b"],
)
def test_bad_rules(paths: Paths, kind: str, rule: str) -> None:
    message = config_error(
        paths,
        f'[tenants.acme.credentials.gh]\nbase_url = "https://x"\n{kind} = ["GET /ok", {tomli_string(rule)}]\n',
    )
    assert message.startswith(f"{paths.config_file}, line 3: tenants.acme.credentials.gh.{kind} "), message
    assert rule in message


def test_missing_file_is_an_empty_config(paths: Paths) -> None:
    config = load_config(paths)
    assert config.tenants == {}
    assert config.broker.approval_timeout == DEFAULTS["approval_timeout"]


def test_valid_config_is_read(paths: Paths, tmp_path: Path) -> None:
    write_config(
        paths,
        f"""\
        [tenants.acme]
        name = "Acme Corp"
        workspaces = ["{tmp_path}/web"]

        [tenants.acme.credentials.github]
        base_url = "https://api.github.com/"
        auth = "bearer"
        allow = ["GET /repos/**"]
        ask = ["POST /repos/*/issues"]
        deny = ["DELETE /**"]

        [tenants.acme.credentials.open]
        base_url = "https://example.com"
        """,
    )
    config = load_config(paths)
    acme = config.tenants["acme"]
    assert acme.name == "Acme Corp"
    assert acme.workspaces == (tmp_path / "web",)
    gh = acme.credentials["github"]
    assert gh.base_url == "https://api.github.com"
    assert gh.host == "api.github.com"
    assert (gh.allow, gh.ask, gh.deny) == (("GET /repos/**",), ("POST /repos/*/issues",), ("DELETE /**",))
    assert not acme.credentials["open"].has_rules
    assert config.credential_owners("github") == ["acme"]


# -- workspaces ---------------------------------------------------------------------


def test_same_folder_for_two_tenants_is_refused(paths: Paths, tmp_path: Path) -> None:
    message = config_error(
        paths,
        f"""\
        [tenants.acme]
        workspaces = ["{tmp_path}/shared"]
        [tenants.beta]
        workspaces = ["{tmp_path}/shared/"]
        """,
    )
    assert message.startswith(f"{paths.config_file}, line 4: tenants.beta.workspaces ")
    assert "acme" in message


def test_folder_inside_another_tenants_folder_is_refused(paths: Paths, tmp_path: Path) -> None:
    message = config_error(
        paths,
        f"""\
        [tenants.acme]
        workspaces = ["{tmp_path}/clients"]
        [tenants.beta]
        workspaces = ["{tmp_path}/clients/beta"]
        """,
    )
    assert "tenants.beta.workspaces" in message and "acme" in message


def test_folder_holding_another_tenants_folder_is_refused(paths: Paths, tmp_path: Path) -> None:
    message = config_error(
        paths,
        f"""\
        [tenants.acme]
        workspaces = ["{tmp_path}/clients/acme"]
        [tenants.beta]
        workspaces = ["{tmp_path}/clients"]
        """,
    )
    assert "tenants.beta.workspaces" in message and "acme" in message


def test_same_folder_through_a_symlink_is_refused(paths: Paths, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    message = config_error(
        paths,
        f"""\
        [tenants.acme]
        workspaces = ["{tmp_path}/real"]
        [tenants.beta]
        workspaces = ["{tmp_path}/link"]
        """,
    )
    assert "tenants.beta.workspaces" in message


def test_nesting_within_one_tenant_is_fine(paths: Paths, tmp_path: Path) -> None:
    write_config(
        paths,
        f"""\
        [tenants.acme]
        workspaces = ["{tmp_path}/acme", "{tmp_path}/acme/api"]
        [tenants.beta]
        workspaces = ["{tmp_path}/acmex"]
        """,
    )
    config = load_config(paths)
    assert config.tenants["acme"].workspaces == (tmp_path / "acme", tmp_path / "acme" / "api")


def test_workspaces_are_expanded_and_resolved(paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clients" / "acme").mkdir(parents=True)
    (tmp_path / "acme-link").symlink_to(tmp_path / "clients" / "acme")
    write_config(
        paths,
        """\
        [tenants.acme]
        workspaces = ["~/clients/web", "~/acme-link", "~/clients/../clients/api"]
        """,
    )
    ws = load_config(paths).tenants["acme"].workspaces
    real = tmp_path.resolve()
    assert ws == (real / "clients" / "web", real / "clients" / "acme", real / "clients" / "api")
    assert resolve_workspace("~/acme-link") == real / "clients" / "acme"


def test_workspace_for_takes_the_longest_prefix(paths: Paths, tmp_path: Path) -> None:
    write_config(
        paths,
        f"""\
        [tenants.acme]
        workspaces = ["{tmp_path}/acme", "{tmp_path}/acme/api"]
        [tenants.beta]
        workspaces = ["{tmp_path}/acme-beta"]
        """,
    )
    config = load_config(paths)

    def owner(rel: str) -> tuple[str, Path] | None:
        found = config.workspace_for(tmp_path / rel)
        return (found[0].id, found[1]) if found else None

    assert owner("acme") == ("acme", tmp_path / "acme")
    assert owner("acme/web/src") == ("acme", tmp_path / "acme")
    assert owner("acme/api") == ("acme", tmp_path / "acme" / "api")
    assert owner("acme/api/src/x.py") == ("acme", tmp_path / "acme" / "api")
    assert owner("acme-beta/x") == ("beta", tmp_path / "acme-beta")  # not a prefix of "acme"
    assert owner("acmex") is None
    assert config.workspace_for(tmp_path) is None


# -- round trip ----------------------------------------------------------------------


UNKNOWN_KEYS = """\
    x-future_top = "kept"

    [broker]
    approval_timeout = 60
    x-broker_note = [1, 2]

    [x-plugins.x]
    enabled = true

    [tenants.acme]
    name = "Acme"
    workspaces = []
    x-colour = "blue"

    [tenants.acme.credentials.gh]
    base_url = "https://api.github.com"
    x-note = "rotates monthly"
    allow = ["GET /repos/**"]

    [tenants.acme.credentials.gh.x-extra]
    nested = 1
    """


def test_unknown_keys_survive_an_edit(paths: Paths, tmp_path: Path) -> None:
    write_config(paths, UNKNOWN_KEYS)
    before = tomllib.loads(paths.config_file.read_text())
    editor = ConfigEditor(paths)
    editor.add_tenant("beta", "Beta")
    editor.add_workspace("beta", str(tmp_path / "beta"))
    editor.add_credential("acme", "jira", {"base_url": "https://jira.example"})
    editor.save()
    after = tomllib.loads(paths.config_file.read_text())
    assert after["x-future_top"] == "kept"
    assert after["x-plugins"] == {"x": {"enabled": True}}
    assert after["broker"] == before["broker"]
    assert after["tenants"]["acme"]["x-colour"] == "blue"
    gh = after["tenants"]["acme"]["credentials"]["gh"]
    assert gh == before["tenants"]["acme"]["credentials"]["gh"]
    assert after["tenants"]["beta"]["workspaces"] == [str(tmp_path / "beta")]
    assert after["tenants"]["acme"]["credentials"]["jira"] == {"base_url": "https://jira.example"}
    # and removing things leaves the rest alone
    editor = ConfigEditor(paths)
    editor.remove_tenant("beta")
    editor.remove_credential("acme", "jira")
    editor.save()
    assert tomllib.loads(paths.config_file.read_text()) == before


def test_editor_refuses_an_edit_that_would_not_validate(paths: Paths, tmp_path: Path) -> None:
    write_config(paths, f'[tenants.acme]\nworkspaces = ["{tmp_path}/a"]\n')
    original = paths.config_file.read_bytes()
    editor = ConfigEditor(paths)
    editor.add_tenant("beta", None)
    editor.add_workspace("beta", str(tmp_path / "a" / "inner"))
    with pytest.raises(ConfigError):
        editor.save()
    assert paths.config_file.read_bytes() == original


def test_editor_never_builds_on_a_malformed_file(paths: Paths) -> None:
    write_config(paths, "[tenants.acme]\nname = 5\n")
    with pytest.raises(ConfigError):
        ConfigEditor(paths)


def test_editor_errors_for_unknown_and_duplicate_names(paths: Paths, tmp_path: Path) -> None:
    editor = ConfigEditor(paths)
    editor.add_tenant("acme", None)
    with pytest.raises(ConfigError, match="already exists"):
        editor.add_tenant("acme", None)
    with pytest.raises(ConfigError, match="no tenant 'nope'"):
        editor.add_workspace("nope", str(tmp_path))
    editor.add_workspace("acme", str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="already a workspace"):
        editor.add_workspace("acme", str(tmp_path / "w" / ".." / "w"))
    with pytest.raises(ConfigError, match="not a mapped workspace"):
        editor.remove_workspace(str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="no credential"):
        editor.remove_credential("acme", "gh")
    assert editor.remove_workspace(str(tmp_path / "w")) == "acme"


def test_workspace_under_home_is_written_with_tilde(
    paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    editor = ConfigEditor(paths)
    editor.add_tenant("acme", None)
    editor.add_workspace("acme", str(tmp_path / "clients" / "acme"))
    config = editor.save()
    raw = tomllib.loads(paths.config_file.read_text())
    assert raw["tenants"]["acme"]["workspaces"] == ["~/clients/acme"]
    assert config.tenants["acme"].workspaces == (tmp_path.resolve() / "clients" / "acme",)


# -- atomic writes and permissions ---------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    # The state folder holds the approved copy (broker/config_approval.py); its temp files count too.
    keep = {"config.toml", "state", "config.approved.toml"}
    return sorted(p.name for p in folder.rglob("*") if p.name not in keep)


@pytest.mark.parametrize("fail_at", ["replace", "fsync", "write"])
def test_failed_write_leaves_the_old_file_whole(paths: Paths, monkeypatch: pytest.MonkeyPatch, fail_at: str) -> None:
    write_config(paths, UNKNOWN_KEYS)
    original = paths.config_file.read_bytes()
    editor = ConfigEditor(paths)
    editor.add_tenant("beta", None)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    if fail_at == "write":
        # The disk fills up half way through the temp file.
        real_fdopen = os.fdopen

        class Half:
            def __init__(self, f: object) -> None:
                self.f = f

            def __enter__(self) -> Half:
                return self

            def __exit__(self, *exc: object) -> None:
                self.f.close()  # type: ignore[attr-defined]

            def write(self, data: bytes) -> None:
                self.f.write(data[: len(data) // 2])  # type: ignore[attr-defined]
                boom()

        monkeypatch.setattr(broker.paths.os, "fdopen", lambda fd, m: Half(real_fdopen(fd, m)))
    else:
        monkeypatch.setattr(broker.paths.os, fail_at, boom)
    with pytest.raises(OSError):
        editor.save()
    monkeypatch.undo()
    assert paths.config_file.read_bytes() == original
    assert _leftovers(paths.config_file.parent) == []
    assert "beta" not in load_config(paths).tenants


def test_crash_between_write_and_rename_leaves_the_old_file_whole(paths: Paths) -> None:
    """A process that dies for real (no cleanup at all) just before the rename."""
    write_config(paths, UNKNOWN_KEYS)
    original = paths.config_file.read_bytes()
    script = textwrap.dedent("""\
        import os
        import broker.paths
        from broker.config import ConfigEditor
        from broker.paths import Paths

        real = os.replace
        # Only config.toml's own rename: the approved copy in the state folder goes first.
        broker.paths.os.replace = lambda s, d, *a: os._exit(9) if str(d).endswith("config.toml") else real(s, d, *a)
        editor = ConfigEditor(Paths.from_env())
        editor.add_tenant("beta", None)
        editor.save()
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert paths.config_file.read_bytes() == original
    # The orphan temp file holds the new document; it does not get in the way of later edits.
    assert [n for n in _leftovers(paths.config_file.parent) if n.endswith(".tmp")]
    # The approval of the new document was recorded before the crash, so the old file now
    # waits for the operator, who accepts it (what `outloop config accept` does offline).
    with pytest.raises(ConfigError, match="wait for the operator"):
        ConfigEditor(paths)
    config_approval.approve(paths, original)
    editor = ConfigEditor(paths)
    editor.add_tenant("gamma", None)
    editor.save()
    assert set(load_config(paths).tenants) == {"acme", "gamma"}


def test_files_are_0600_and_folders_0700(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "deep" / "home"
    monkeypatch.setenv("OUTLOOP_HOME", str(home))
    old_umask = os.umask(0o022)
    try:
        editor = ConfigEditor(Paths.from_env())
        editor.add_tenant("acme", None)
        editor.save()
    finally:
        os.umask(old_umask)
    assert mode(home) == 0o700
    assert mode(home / "config.toml") == 0o600


def test_rewrite_tightens_a_loose_file_and_folder(paths: Paths) -> None:
    write_config(paths, "[tenants.acme]\n")
    paths.config_file.chmod(0o644)
    paths.config_file.parent.chmod(0o755)
    editor = ConfigEditor(paths)
    editor.add_tenant("beta", None)
    editor.save()
    assert mode(paths.config_file) == 0o600
    assert mode(paths.config_file.parent) == 0o700


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.txt"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def tomli_string(text: str) -> str:
    """`text` as a TOML basic string."""
    import tomli_w

    return tomli_w.dumps({"v": text}).split("=", 1)[1].strip()


def test_tenant_scan_ignore_is_a_list_of_folder_patterns(tmp_path):
    from broker.config import ConfigError, validate

    raw = {"tenants": {"acme": {"workspaces": [str(tmp_path)], "scan_ignore": ["data/", " *.cache "]}}}
    assert validate(raw, tmp_path / "config.toml").tenants["acme"].scan_ignore == ("data/", "*.cache")
    assert validate({"tenants": {"b": {}}}, tmp_path / "config.toml").tenants["b"].scan_ignore == ()
    for bad in ("data/", [""], [3]):
        try:
            validate({"tenants": {"acme": {"scan_ignore": bad}}}, tmp_path / "config.toml")
        except ConfigError as e:
            assert "scan_ignore" in str(e)
        else:
            raise AssertionError(f"accepted scan_ignore={bad!r}")


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("[broker]\napproval_timout = 5\n", "broker.approval_timout", "did you mean 'approval_timeout'?"),
        (
            '[tenants.acme]\nworkspaces = []\n[tenants.acme.credentials.gh]\nbase_url = "https://x.example"\n'
            'alow = ["GET /**"]\n',
            "tenants.acme.credentials.gh.alow",
            "did you mean 'allow'?",
        ),
        ('[tenants.acme]\nworkspace = ["/tmp"]\n', "tenants.acme.workspace", "did you mean 'workspaces'?"),
        ("[brokr]\napproval_timeout = 5\n", "brokr", "did you mean 'broker'?"),
        ('notes = "mine"\n', "notes", "x-"),
    ],
)
def test_a_key_outloop_does_not_know_is_an_error_that_names_it(paths: Paths, text: str, key: str, hint: str) -> None:
    """A typo must not silently drop rules or settings: it names the key, its line, a likely fix."""
    message = config_error(paths, text)
    assert key in message and hint in message
    assert f"{paths.config_file}, line " in message


def test_tenant_ids_that_differ_only_in_case_are_refused(paths: Paths) -> None:
    message = config_error(paths, "[tenants.acme]\nworkspaces = []\n[tenants.ACME]\nworkspaces = []\n")
    assert "only in case" in message
