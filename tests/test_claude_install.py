"""`outloop claude install|uninstall`: merging into Claude Code's files of several shapes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from outloop_tui.cli import main
from outloop_tui.cmd_claude import PRE_MATCHER, TOOLS

FIXTURES = Path(__file__).parent / "fixtures" / "claude"
USER_KEY = "sk-ant-user-own-key-0123456789abcdefXYZ"  # a user's own value, never printed


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("CLAUDE_CONFIG_DIR", raising=False)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    return home


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["claude", *args])
    out, err = capsys.readouterr()
    return code, out, err


def write(path: Path, doc: Any) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(doc, indent=4).encode()
    path.write_bytes(data)
    return data


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".outloop-backup-*"))


def our_commands(settings: dict[str, Any], event: str) -> list[str]:
    return [
        h["command"]
        for g in settings.get("hooks", {}).get(event, [])
        for h in g["hooks"]
        if "hook" in h["command"] and "outloop" in h["command"]
    ]


SETTINGS_SHAPES: dict[str, Any] = {
    "other hooks, env, permissions": {
        "model": "opus",
        "env": {"ANTHROPIC_API_KEY": USER_KEY, "NODE_ENV": "development"},
        "permissions": {"allow": ["Bash(npm test:*)"], "deny": ["Read(./secrets/**)"]},
        "hooks": {
            "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "~/bin/audit.sh"}]}],
            "Stop": [{"hooks": [{"type": "command", "command": "notify-send done"}]}],
        },
        "someFutureKey": {"nested": [1, 2, 3]},
    },
    "empty hooks and permissions": {"hooks": {}, "permissions": {}},
    "just a theme": {"theme": "dark"},
    "an old outloop install beside a user hook": {
        "hooks": {
            "PreToolUse": [
                {
                    "matcher": "Bash|Read",
                    "hooks": [
                        {"type": "command", "command": "/old/venv/bin/outloop hook pre", "timeout": 5},
                        {"type": "command", "command": "lint-guard"},
                    ],
                }
            ]
        },
    },
}


@pytest.mark.parametrize("shape", list(SETTINGS_SHAPES))
def test_install_merges_keeps_everything_and_backs_up(
    home: Path, capsys: pytest.CaptureFixture[str], shape: str
) -> None:
    settings_file = home / ".claude" / "settings.json"
    global_file = home / ".claude.json"
    original_settings = write(settings_file, SETTINGS_SHAPES[shape])
    original_global = write(
        global_file,
        {
            "numStartups": 12,
            "projects": {"/x": {"allowedTools": []}},
            "mcpServers": {"github": {"command": "npx", "args": ["gh-mcp"], "env": {"GITHUB_TOKEN": USER_KEY}}},
        },
    )
    os.chmod(global_file, 0o644)

    code, out, err = run(capsys, "install")
    assert code == 0, err
    assert USER_KEY not in out + err

    settings = load(settings_file)
    before = SETTINGS_SHAPES[shape]
    for key, value in before.items():
        if key not in ("hooks", "permissions"):
            assert settings[key] == value
    # The user's hooks are all still there.
    for event, groups in before.get("hooks", {}).items():
        for group in groups:
            for h in group["hooks"]:
                if "outloop" not in h["command"]:
                    assert any(h in g["hooks"] for g in settings["hooks"][event])
    assert len(our_commands(settings, "PreToolUse")) == 1
    assert our_commands(settings, "PreToolUse")[0].endswith("hook pre")
    assert "/old/venv" not in json.dumps(settings)
    assert len(our_commands(settings, "PostToolUse")) == 1
    pre_group = next(g for g in settings["hooks"]["PreToolUse"] if g["matcher"] == PRE_MATCHER)
    assert pre_group["hooks"][0]["type"] == "command"
    for tool in TOOLS:
        assert tool in settings["permissions"]["allow"]
    for rule in before.get("permissions", {}).get("allow", []):
        assert rule in settings["permissions"]["allow"]
    if "deny" in before.get("permissions", {}):
        assert settings["permissions"]["deny"] == before["permissions"]["deny"]

    glob = load(global_file)
    assert glob["numStartups"] == 12 and glob["projects"] == {"/x": {"allowedTools": []}}
    assert glob["mcpServers"]["github"]["env"]["GITHUB_TOKEN"] == USER_KEY
    server = glob["mcpServers"]["outloop"]
    assert server["type"] == "stdio" and server["args"][-1] == "mcp"
    assert stat.S_IMODE(global_file.stat().st_mode) == 0o644  # mode kept
    assert stat.S_IMODE(home.stat().st_mode) == 0o755  # the home folder is left alone

    # One backup of each file, byte for byte, private.
    (sb,) = backups(settings_file)
    (gb,) = backups(global_file)
    assert sb.read_bytes() == original_settings and gb.read_bytes() == original_global
    assert stat.S_IMODE(sb.stat().st_mode) == 0o600

    # Idempotent: nothing changes the second time, and no new backup.
    snapshot = (settings_file.read_bytes(), global_file.read_bytes())
    code, out, _ = run(capsys, "install")
    assert code == 0 and "nothing to change" in out
    assert (settings_file.read_bytes(), global_file.read_bytes()) == snapshot
    assert len(backups(settings_file)) == 1 and len(backups(global_file)) == 1

    # Uninstall removes only what install added.
    code, out, _ = run(capsys, "uninstall")
    assert code == 0
    after = load(settings_file)
    expected = json.loads(json.dumps(before))
    if shape == "an old outloop install beside a user hook":
        expected["hooks"]["PreToolUse"][0]["hooks"] = [{"type": "command", "command": "lint-guard"}]
    if shape == "empty hooks and permissions":
        expected = {"hooks": {}, "permissions": {}}
    assert _without_empty(after) == _without_empty(expected)
    assert load(global_file) == json.loads(original_global)
    code, out, _ = run(capsys, "uninstall")
    assert "nothing to change" in out


def _without_empty(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v not in ({}, [])}


def test_install_into_nothing_creates_files(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "install")
    assert code == 0
    assert "new file" in out
    settings = load(home / ".claude" / "settings.json")
    assert our_commands(settings, "PreToolUse") and our_commands(settings, "PostToolUse")
    assert load(home / ".claude.json")["mcpServers"]["outloop"]["args"][-1] == "mcp"
    assert stat.S_IMODE((home / ".claude.json").stat().st_mode) == 0o600
    assert not backups(home / ".claude.json")


def test_dry_run_writes_nothing_and_shows_only_outloops_entries(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings_file = home / ".claude" / "settings.json"
    original = write(settings_file, SETTINGS_SHAPES["other hooks, env, permissions"])
    code, out, err = run(capsys, "install", "--dry-run")
    assert code == 0
    assert "would update" in out and "would create" in out and "dry run" in out
    assert "hook pre" in out and "mcpServers.outloop" in out
    assert USER_KEY not in out + err
    assert settings_file.read_bytes() == original
    assert not (home / ".claude.json").exists()
    assert not backups(settings_file)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"hooks": []}', '{"hooks": {"PreToolUse": {}}}'])
def test_unexpected_shapes_are_refused_untouched(home: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    settings_file = home / ".claude" / "settings.json"
    settings_file.parent.mkdir()
    settings_file.write_text(content)
    code, _out, err = run(capsys, "install")
    assert code == 1
    assert str(settings_file) in err and "Traceback" not in err
    assert settings_file.read_text() == content
    assert not backups(settings_file)


def test_empty_settings_file_is_an_empty_object(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings_file = home / ".claude" / "settings.json"
    settings_file.parent.mkdir()
    settings_file.write_text("")
    assert run(capsys, "install")[0] == 0
    assert our_commands(load(settings_file), "PreToolUse")


def test_project_scope(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = Path.cwd()
    project.chmod(0o755)
    write(project / ".mcp.json", {"mcpServers": {"db": {"command": "db-mcp"}}})
    code, _, _ = run(capsys, "install", "--scope", "project")
    assert code == 0
    servers = load(project / ".mcp.json")["mcpServers"]
    assert servers["db"] == {"command": "db-mcp"}
    assert servers["outloop"]["args"][-1] == "mcp"
    assert our_commands(load(project / ".claude" / "settings.json"), "PreToolUse")
    assert not (home / ".claude.json").exists()
    assert stat.S_IMODE(project.stat().st_mode) & 0o077  # the project folder is left alone
    run(capsys, "uninstall", "--scope", "project")
    assert load(project / ".mcp.json") == {"mcpServers": {"db": {"command": "db-mcp"}}}


def test_claude_config_dir_moves_the_user_files(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = tmp_path / "claude-config"
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(moved))
    assert run(capsys, "install")[0] == 0
    assert our_commands(load(moved / "settings.json"), "PostToolUse")
    assert "outloop" in load(moved / ".claude.json")["mcpServers"]
    assert not (home / ".claude").exists() and not (home / ".claude.json").exists()


def test_installed_hook_command_runs_and_blocks(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "install")[0] == 0
    settings = load(home / ".claude" / "settings.json")
    (command,) = our_commands(settings, "PreToolUse")
    payload = (
        (FIXTURES / "pre_read_env.json")
        .read_text()
        .replace("{cwd}", str(Path.cwd()))
        .replace("{transcript}", "/tmp/t.jsonl")
    )
    ran = subprocess.run(["/bin/sh", "-c", command], input=payload, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2 and "mcp__outloop__outloop_request" in ran.stderr


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file and folder under `roots`: path -> bytes (None for a folder)."""
    out: dict[str, bytes | None] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = None if p.is_dir() else p.read_bytes()
    return out


@pytest.mark.parametrize("scope", ["user", "project"])
@pytest.mark.parametrize("existing", [False, True])
def test_install_then_uninstall_leaves_everything_byte_identical(
    home: Path, capsys: pytest.CaptureFixture[str], scope: str, existing: bool
) -> None:
    """No `{}` left, no backup left, no backup of a file that did not exist, formatting kept."""
    project = Path.cwd()
    if existing:
        # Odd formatting on purpose: only the original bytes compare equal.
        for path in (home / ".claude.json", home / ".claude" / "settings.json", project / ".mcp.json"):
            path.parent.mkdir(exist_ok=True)
            path.write_text('{"mcpServers":{"x":{"command":"x"}},   "hooks" : {}, "env": {"A": "1"}}')
        (project / ".claude").mkdir()
        (project / ".claude" / "settings.json").write_text('{ "permissions": { "allow": ["Bash(ls)"] } }\n')
    before = snapshot(home, project)
    code, _out, _err = run(capsys, "install", "--scope", scope)
    assert code == 0
    assert snapshot(home, project) != before
    if not existing:
        assert not list(home.rglob("*" + ".outloop-backup-*")) and not list(project.rglob("*.outloop-backup-*"))
    code, out, _err = run(capsys, "uninstall", "--scope", scope)
    assert code == 0, out
    assert snapshot(home, project) == before


def test_project_scope_files_hold_no_path_of_this_machine(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = Path.cwd()
    code, out, _err = run(capsys, "install", "--scope", "project")
    assert code == 0
    assert "trust" in out and "Pending approval" in out
    for name in (".mcp.json", ".claude/settings.json"):
        text = (project / name).read_text()
        assert str(home) not in text and str(project) not in text and os.environ["OUTLOOP_HOME"] not in text
    local = load(project / ".claude" / "settings.local.json")
    assert local["env"]["OUTLOOP_HOME"] == os.environ["OUTLOOP_HOME"]


def test_user_scope_hooks_carry_the_broker_location(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, _err = run(capsys, "install")
    assert code == 0
    settings = load(home / ".claude" / "settings.json")
    for event in ("PreToolUse", "PostToolUse"):
        (command,) = our_commands(settings, event)
        assert f"OUTLOOP_HOME={os.environ['OUTLOOP_HOME']}" in command
        assert f"OUTLOOP_SOCKET={os.environ['OUTLOOP_SOCKET']}" in command


def test_outloop_claude_without_claude_on_path_says_so(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(home))  # no claude here
    monkeypatch.delenv("OUTLOOP_CLAUDE", raising=False)
    code, out, err = run(capsys, "-p", "hello")
    assert code == 127 and "not on PATH" in err and "OUTLOOP_CLAUDE" in err


def test_outloop_claude_passes_the_session_flags_only_when_not_installed(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from outloop_tui.cmd_claude import session_flags

    flags = session_flags(Path.cwd())
    assert flags[0::2] == ["--mcp-config", "--settings"]
    settings = json.loads(flags[3])
    assert [h["hooks"][0]["command"].split()[-2:] for h in settings["hooks"]["PreToolUse"]] == [["hook", "pre"]]
    assert "outloop" in json.loads(flags[1])["mcpServers"]
    assert run(capsys, "install")[0] == 0
    assert session_flags(Path.cwd()) == []  # installed: Claude Code has them already, not twice
