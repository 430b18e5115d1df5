"""Claude Code itself: the real `claude` binary, a scripted Messages API, a real broker.

npm installs `@anthropic-ai/claude-code` at a pinned version into a cache folder
(~/.cache/outloop-ci/claude-<version>; the native binary comes from the registry
package `@anthropic-ai/claude-code-linux-x64`). `outloop claude install` registers the
MCP server and hooks in a throw-away HOME, then `claude -p ... --output-format
stream-json` runs a script of tool calls against tests/support/fake_messages.py on
127.0.0.1: no traffic leaves loopback (telemetry and the auto-updater are off).

What the fake API received is exactly what a model would have seen: the tests assert
that no key is in it, in any encoding, that each leak is reported to the model once,
and that the broker audited the MCP call and stored the alerts with the tenant.

Skipped only when npm is absent (.ci/run installs it); a failing install fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support.fake_messages import Call, FakeMessages
from support.fixtures import OUTLOOP, BrokerThread, World

from broker.config import ConfigEditor
from broker.secrets import Secret, SecretStore

pytestmark = pytest.mark.claude_real

CLAUDE_VERSION = "2.1.332"
CACHE = Path(os.environ.get("OUTLOOP_CI_CACHE", Path.home() / ".cache" / "outloop-ci")) / f"claude-{CLAUDE_VERSION}"
REQUEST = "mcp__outloop__outloop_request"
CREDENTIALS = "mcp__outloop__outloop_credentials"


@pytest.fixture(scope="module")
def claude_bin() -> Path:
    """The pinned `claude`, installed with npm on first use."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed (.ci/run installs nodejs and npm)")
    binary = CACHE / "node_modules" / ".bin" / "claude"
    if not binary.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        ran = subprocess.run(
            [npm, "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--loglevel=error"]
            + [f"@anthropic-ai/claude-code@{CLAUDE_VERSION}"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert ran.returncode == 0, f"npm install failed: {ran.stderr[-2000:]}"
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    assert CLAUDE_VERSION in version.stdout, version.stdout + version.stderr
    return binary


def claude_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".claude.json").write_text(json.dumps({"hasCompletedOnboarding": True}))
    return home


def claude_env(world: World, home: Path, fake_url: str) -> dict[str, str]:
    env = {k: v for k, v in world.env().items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update(
        HOME=str(home),
        ANTHROPIC_BASE_URL=fake_url,
        ANTHROPIC_API_KEY="sk-ant-test-fake-messages-api",  # the fake accepts anything
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_TELEMETRY="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_ERROR_REPORTING="1",
        IS_SANDBOX="1",  # --dangerously-skip-permissions as root
        MCP_TIMEOUT="30000",
    )
    return env


def run_claude(
    claude: Path, world: World, home: Path, fake: FakeMessages, *extra: str, env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    argv = [str(claude), "-p", "Work on this project.", "--output-format", "stream-json", "--verbose"]
    argv += ["--dangerously-skip-permissions", *extra]
    ran = subprocess.run(
        argv,
        cwd=world.acme,
        env={**claude_env(world, home, fake.url), **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
    )
    world.assert_clean(ran.stdout + ran.stderr)
    assert ran.returncode == 0, ran.stderr[-2000:]
    return [json.loads(line) for line in ran.stdout.splitlines() if line.strip()]


def every_encoding_clean(world: World, value: Any) -> None:
    """No key in `value`: as JSON (ASCII and UTF-8), and in every string nested in it."""
    __tracebackhide__ = True
    world.assert_clean(json.dumps(value))
    world.assert_clean(json.dumps(value, ensure_ascii=False))
    world.assert_clean_deep(value)
    for text in _strings(value):
        world.assert_clean(text.encode().hex())


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def alerts(world: World) -> list[dict[str, Any]]:
    f = world.paths.alerts_file
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def assert_outloop_mcp_listed(init: dict[str, Any]) -> None:
    """Outloop's MCP server is in Claude Code's init event, connected or still connecting:
    Claude Code connects MCP servers in the background, so under load the init event can
    come first ("pending"). The tests check its tools' results as well; "failed" fails here."""
    servers = {s["name"]: s["status"] for s in init["mcp_servers"]}
    assert servers.get("outloop") in ("connected", "pending"), init["mcp_servers"]


def test_a_session_never_shows_the_model_a_key(
    claude_bin: Path, world: World, broker: BrokerThread, tmp_path: Path
) -> None:
    """Read .env, `cat .en?`, a file printing the managed secret, base64 of it, a >30 KB
    output, and the Outloop MCP tools, in one `claude -p` run."""
    secret = world.keys[("acme", "openai")]
    (world.acme / ".env").write_text(f"OPENAI_API_KEY={secret}\n")
    (world.acme / "notes.txt").write_text(f"the token is {secret}\n")
    (world.acme / "big.log").write_text("line of build output\n" * 2000 + f"token={secret}\n")
    home = claude_home(tmp_path)
    installed = world.run([OUTLOOP, "claude", "install"], world.acme, env={**world.env(), "HOME": str(home)})
    assert installed.returncode == 0, installed.stderr

    script: list[list[Call]] = [
        [("Read", {"file_path": str(world.acme / ".env")})],
        [("Bash", {"command": "cat .en?", "description": "show config"})],
        [("Bash", {"command": "cat notes.txt", "description": "notes"})],
        [("Bash", {"command": "base64 notes.txt", "description": "notes, encoded"})],
        [("Bash", {"command": "cat big.log", "description": "build log"})],
        [("ToolSearch", {"query": f"select:{REQUEST},{CREDENTIALS}", "max_results": 5})],
        [(CREDENTIALS, {})],
        [(REQUEST, {"credential": "api", "method": "GET", "path": "/echo/claude", "reason": "real claude test"})],
    ]
    with FakeMessages(script) as fake:
        out = run_claude(claude_bin, world, home, fake)

    assert out[-1]["type"] == "result" and not out[-1].get("is_error"), out[-1]
    init = out[0]
    assert init["type"] == "system" and init["subtype"] == "init"
    assert_outloop_mcp_listed(init)

    # Nothing the model was sent holds a key, whatever the encoding.
    assert fake.requests
    every_encoding_clean(world, fake.requests)
    results = fake.tool_results()
    ids = {name: f"toolu_{turn:02d}_00_outloop" for turn, ((name, _),) in enumerate(script) if name}
    by_turn = [results.get(f"toolu_{turn:02d}_00_outloop") for turn in range(len(script))]
    assert all(r is not None for r in by_turn), [i for i, r in enumerate(by_turn) if r is None]
    text = [json.dumps(r) for r in by_turn]

    assert "Outloop blocked" in text[0]  # Read .env: the pre hook
    assert "Outloop blocked" in text[1]  # cat .en?: the pre hook sees through the glob
    assert "[REDACTED:" in text[2]  # cat notes.txt: the post hook, updatedToolOutput
    assert "[REDACTED:" in text[3]  # base64 of it
    # The large output: the model gets a preview; the hook scanned the whole saved file.
    assert "persisted-output" in text[4] or "[REDACTED:" in text[4]
    assert "tenant" in text[6] and "acme" in text[6]  # outloop_credentials
    assert '\\"status\\": 200' in text[7] or '"status": 200' in text[7], text[7][:300]
    assert "REDACTED" in text[7]  # the upstream echoed the key; the broker redacted it
    assert ids

    # Each leak is reported to the model once (one warning per tool call, not two).
    conversation = json.dumps(fake.conversation())
    for turn in (2, 3, 4):
        tool_id = f"toolu_{turn:02d}_00_outloop"
        assert tool_id in conversation
    assert conversation.count("Outloop redacted") == conversation.count("PostToolUse:Bash hook additional context")
    assert conversation.count("Outloop redacted") >= 3
    assert "holds them too: do not read it" in conversation  # the >30 KB output's saved file

    # Claude Code's transcript keeps the redacted output too.
    transcripts = list((home / ".claude" / "projects").rglob("*.jsonl"))
    assert transcripts
    for t in transcripts:
        world.assert_clean(t.read_bytes())

    # The broker audited the MCP call, with the tenant of the folder Claude Code runs in.
    calls = [r for r in world.audit() if r.get("path") == "/echo/claude" and r.get("status") == 200]
    assert calls and calls[-1]["tenant"] == "acme" and calls[-1]["credential"] == "api"
    world.assert_clean(world.audit_bytes())

    # The post hook's alerts are in the broker's store (OUTLOOP_HOME came from install).
    found = alerts(world)
    world.assert_clean(world.paths.alerts_file.read_bytes())
    assert found and all(a["tenant"] == "acme" for a in found)
    assert any(a["rule"] == "managed-secret:acme/openai" for a in found)


def test_the_large_output_is_redacted_past_30000_characters(
    claude_bin: Path, world: World, broker: BrokerThread, tmp_path: Path
) -> None:
    """Claude Code gives the hook the first 30,000 characters and `persistedOutputPath`."""
    secret = world.keys[("acme", "openai")]
    (world.acme / "big.log").write_text("line of build output\n" * 2500 + f"token={secret}\n")
    home = claude_home(tmp_path)
    installed = world.run([OUTLOOP, "claude", "install"], world.acme, env={**world.env(), "HOME": str(home)})
    assert installed.returncode == 0, installed.stderr
    with FakeMessages([[("Bash", {"command": "cat big.log", "description": "log"})]]) as fake:
        run_claude(claude_bin, world, home, fake)
    every_encoding_clean(world, fake.requests)
    assert "Outloop redacted" in json.dumps(fake.conversation())
    assert any(a["rule"] == "managed-secret:acme/openai" for a in alerts(world))


@pytest.mark.parametrize("scope", ["user", "project"])
def test_install_and_uninstall_leave_home_and_project_byte_identical(
    claude_bin: Path, world: World, tmp_path: Path, scope: str
) -> None:
    """And between them the real binary sees the server and the hooks."""
    home = claude_home(tmp_path)
    (home / ".claude").mkdir()
    (home / ".claude" / "settings.json").write_text('{"theme":"dark",  "permissions":{"allow":["Bash(ls)"]}}')
    (world.acme / ".mcp.json").write_text('{\n    "mcpServers": {}\n}')

    def snapshot() -> dict[str, bytes | None]:
        return {
            str(p): None if p.is_dir() else p.read_bytes()
            for root in (home, world.acme)
            for p in sorted(root.rglob("*"))
        }

    before = snapshot()
    env = {**world.env(), "HOME": str(home)}
    ran = world.run([OUTLOOP, "claude", "install", "--scope", scope], world.acme, env=env)
    assert ran.returncode == 0, ran.stderr
    if scope == "project":
        assert "trust" in ran.stdout
    ran = world.run([OUTLOOP, "claude", "uninstall", "--scope", scope], world.acme, env=env)
    assert ran.returncode == 0, ran.stderr
    assert snapshot() == before

    # Installed again, the real binary sees the server (in project scope: pending approval).
    ran = world.run([OUTLOOP, "claude", "install", "--scope", scope], world.acme, env=env)
    assert ran.returncode == 0, ran.stderr
    listed = subprocess.run(
        [str(claude_bin), "mcp", "list"],
        cwd=world.acme,
        env=claude_env(world, home, "http://127.0.0.1:9"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "outloop" in listed.stdout, listed.stdout + listed.stderr
    if scope == "user":
        assert "Connected" in listed.stdout or "connected" in listed.stdout, listed.stdout


ANTHROPIC_KEY = "sk-ant-api03-acme-claude-real-Q9+zT4k/Lw7Hq2Pk81"


def give_acme_anthropic(world: World, fake_url: str) -> None:
    """An Anthropic credential for acme whose API is the fake, and a loopback listener, before the broker starts."""
    editor = ConfigEditor(world.paths)
    editor.add_credential(
        "acme",
        "anthropic",
        {"base_url": fake_url, "auth": "header:x-api-key", "allow": ["POST /v1/messages", "POST /v1/messages/**"]},
    )
    editor.raw.setdefault("broker", {})["listen"] = "127.0.0.1:0"
    editor.save()
    SecretStore().set("acme", "anthropic", Secret(ANTHROPIC_KEY))
    world.keys[("acme", "anthropic")] = ANTHROPIC_KEY


def test_outloop_claude_runs_claude_code_in_a_session(claude_bin: Path, world: World, tmp_path: Path) -> None:
    """`outloop claude -p ...` with nothing installed: the session's MCP server and hooks
    come with it, and the MCP call is identified by the session, not by the folder. Claude
    Code's own model traffic goes through the broker on acme's Anthropic credential: the
    operator's ANTHROPIC_AUTH_TOKEN and ANTHROPIC_API_KEY never reach it."""
    secret = world.keys[("acme", "openai")]
    (world.acme / "notes.txt").write_text(f"the token is {secret}\n")
    # What the agent's shells hold, said without printing a value (the guard refuses `env`).
    (world.acme / "which_keys.sh").write_text(
        'if [ -n "${ANTHROPIC_AUTH_TOKEN+x}" ]; then echo AUTH_TOKEN=present; else echo AUTH_TOKEN=absent; fi\n'
        'case "$ANTHROPIC_API_KEY" in outloop_s_*) echo API_KEY=session ;; *) echo API_KEY=other ;; esac\n'
    )
    home = claude_home(tmp_path)
    script: list[list[Call]] = [
        [("Bash", {"command": "cat notes.txt", "description": "notes"})],
        [("ToolSearch", {"query": f"select:{REQUEST}", "max_results": 5})],
        [(REQUEST, {"credential": "api", "method": "GET", "path": "/echo/session", "reason": "outloop claude"})],
        [("Bash", {"command": "sh which_keys.sh", "description": "which keys"})],
    ]
    with FakeMessages(script) as fake:
        give_acme_anthropic(world, fake.url)
        broker = BrokerThread(world.paths).start()
        try:
            env = claude_env(world, home, fake.url)
            # What the operator's shell exports: both of Claude Code's Anthropic credentials.
            env["ANTHROPIC_API_KEY"] = "sk-ant-api03-operator-own-key-Zq9Tr4Lw7Hq2Pk81"
            env["ANTHROPIC_AUTH_TOKEN"] = "sk-ant-oat01-operator-login-Zq9Tr4Lw7Hq2Pk81"
            env["PATH"] = f"{claude_bin.parent}{os.pathsep}{env['PATH']}"
            argv = [OUTLOOP, "claude", "-p", "Work on this project.", "--output-format", "stream-json", "--verbose"]
            ran = subprocess.run(
                [*argv, "--dangerously-skip-permissions"],
                cwd=world.acme,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
            )
        finally:
            broker.stop()
    world.assert_clean(ran.stdout + ran.stderr)
    assert ran.returncode == 0, ran.stderr[-2000:]
    out = [json.loads(line) for line in ran.stdout.splitlines() if line.strip()]
    assert_outloop_mcp_listed(out[0])
    every_encoding_clean(world, fake.requests)
    assert "[REDACTED:" in json.dumps(fake.tool_results().get("toolu_00_00_outloop"))  # the post hook
    held = json.dumps(fake.tool_results().get("toolu_03_00_outloop"))
    assert "AUTH_TOKEN=absent" in held and "API_KEY=session" in held, held
    # Every model call came through the broker: acme's key, never the operator's nor the session token.
    assert fake.credentials and set(fake.credentials) == {(ANTHROPIC_KEY, None)}, "not acme's key alone"
    models = [r for r in world.audit() if r.get("event") == "attempt" and r.get("credential") == "anthropic"]
    assert models and {(r["identity"], r["tenant"], r["decision"]) for r in models} == {("session", "acme", "allow")}
    calls = [r for r in world.audit() if r.get("path") == "/echo/session" and r.get("status") == 200]
    assert calls, [r.get("event") for r in world.audit()]
    assert calls[-1]["identity"] == "session" and calls[-1]["session"] and calls[-1]["tenant"] == "acme"
    assert not (home / ".claude" / "settings.json").exists()  # nothing was installed
    opened = [r for r in world.audit() if r.get("event") == "session_open"]
    assert opened and opened[-1]["tenant"] == "acme"
    world.assert_clean(world.audit_bytes())


def test_background_and_monitor_output_is_watched_by_the_broker(
    claude_bin: Path, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background Bash and a Monitor print the managed secret: Claude Code writes their output
    to $CLAUDE_CODE_TMPDIR/claude-<uid>/<project>/<session>/tasks/<id>.output, which no hook
    sees; the broker (watching, with CLAUDE_CODE_TMPDIR in its environment) alerts for acme."""
    secret = world.keys[("acme", "openai")]
    (world.acme / "notes.txt").write_text(f"the token is {secret}\n")
    tmpdir = tmp_path / "cctmp"
    monkeypatch.setenv("CLAUDE_CODE_TMPDIR", str(tmpdir))
    home = claude_home(tmp_path)
    installed = world.run([OUTLOOP, "claude", "install"], world.acme, env={**world.env(), "HOME": str(home)})
    assert installed.returncode == 0, installed.stderr
    script: list[list[Call]] = [
        [("Bash", {"command": "cat notes.txt", "description": "notes", "run_in_background": True})],
        [("ToolSearch", {"query": "select:Monitor", "max_results": 5})],
        [("Monitor", {"command": "cat notes.txt", "description": "notes events"})],
    ]
    broker = BrokerThread(world.paths, watch=True).start()
    try:
        assert broker.engine.transcripts is not None
        broker.run(broker.engine.transcripts.ready())
        with FakeMessages(script) as fake:
            run_claude(claude_bin, world, home, fake, env={"CLAUDE_CODE_TMPDIR": str(tmpdir)})
        root = tmpdir / f"claude-{os.getuid()}"
        outputs = sorted(root.glob("*/*/tasks/*.output"))
        assert len(outputs) == 2, outputs  # the layout this build writes
        # The background command's answer only names its file: nothing for a hook to redact.
        assert str(outputs[0].parent) in json.dumps(fake.tool_results().get("toolu_00_00_outloop"))
        # (Monitor's events reach the model in a <task-notification> no hook sees: the
        # alert below is what the operator gets; docs/claude.md says so.)
        found = wait_for_alerts(world, {str(p) for p in outputs})
    finally:
        broker.stop()
    assert {(a["tenant"], a["rule"]) for a in found} == {("acme", "managed-secret:acme/openai")}
    assert {a["workspace"] for a in found} == {str(world.acme)}
    world.assert_clean(world.paths.alerts_file.read_bytes())


def wait_for_alerts(world: World, paths: set[str], timeout: float = 180) -> list[dict[str, Any]]:
    """The alerts on each of `paths`, once there is one for every path (a generous bound, not a measure)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [a for a in alerts(world) if a.get("path") in paths]
        if {a["path"] for a in found} == paths or time.monotonic() > deadline:
            assert {a["path"] for a in found} == paths, f"alerts on {len(found)} of {len(paths)} task outputs"
            return found
        time.sleep(0.1)
