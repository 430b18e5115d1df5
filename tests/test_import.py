"""`outloop import` (issue 18): a workspace's .env keys into the keyring, the code still working.

Real files, the session's real keyring, the real console script; crashes are kill -9
of a child paused between the steps (broker/importer.py's test hook); the end-to-end
test runs a project with the openai SDK and python-dotenv, and one with
`node --env-file`, before and after the import, against a loopback upstream.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import keyring.backend
import keyring.errors
import pytest
from support.fixtures import OUTLOOP, BrokerThread, wait_for
from textual.widgets import Static

from broker import importer, manage
from broker.config import ConfigEditor, load_config
from broker.leaks.alerts import AlertStore
from broker.leaks.rules import RULES_BY_ID, find_secrets
from broker.leaks.scan import scan_file
from broker.paths import Paths
from broker.placeholders import placeholder
from broker.policy import parse_rule
from broker.providers import PROVIDERS, provider_named
from broker.secrets import Secret, SecretStore, SecretStoreError


def sample(rule: str, n: int = 0) -> str:
    """A key of `rule`'s format, taken from the rule's own true-positive examples."""
    text = RULES_BY_ID[rule].true_positives[n]
    (match,) = [m for m in find_secrets(text, env_like=True) if m.rule_id == rule]
    return match.value(text)


OPENAI = sample("openai-project-key")
STRIPE = sample("stripe-secret-key")
GITHUB = sample("github-ghp")
ANTHROPIC = sample("anthropic-api-key")
SLACK = sample("slack-bot-token")
PEM = RULES_BY_ID["private-key"].true_positives[0]
UNKNOWN = "Zx81Qw0pLm29Vb47Nc56Rt13Yh08Gf"  # a strong value under a secret-named variable


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    folder = (tmp_path / "acme").resolve()
    folder.mkdir()
    editor = ConfigEditor(Paths.from_env())
    editor.add_tenant("acme", "Acme")
    editor.add_workspace("acme", str(folder))
    editor.save()
    return folder


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.pop("OUTLOOP_SESSION", None)
    return out


def outloop(*args: str, cwd: Path, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OUTLOOP, *args],
        cwd=cwd,
        env={**env(), **(extra or {})},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def credentials() -> dict[str, dict[str, Any]]:
    config = load_config(Paths.from_env())
    return {
        c.name: {"base_url": c.base_url, "auth": str(c.auth), "allow": c.allow, "ask": c.ask}
        for c in config.credentials()
    }


def keyring_holds() -> dict[str, str]:
    """Every secret the keyring holds for acme's configured credentials (and nothing for others)."""
    store = SecretStore()
    out = {}
    for name in credentials():
        secret = store.get("acme", name)
        if secret is not None:
            out[name] = secret.reveal()
    return out


def assert_no_key(text: str, *keys: str) -> None:
    __tracebackhide__ = True
    leaked = [i for i, k in enumerate(keys) if k in text]
    assert not leaked, f"key(s) #{leaked} shown"  # never the text: it holds the key


# -- the catalog -----------------------------------------------------------------------


def test_every_catalog_entry_names_real_rules_and_valid_defaults() -> None:
    from broker.config import Auth

    names = {p.name for p in PROVIDERS}
    wanted = "openai anthropic github gitlab stripe slack twilio sendgrid huggingface google-ai mistral groq"
    assert set(wanted.split()) | {"cohere", "replicate", "vercel", "cloudflare", "supabase", "linear"} <= names
    assert {"notion", "postmark"} <= names
    for p in PROVIDERS:
        for rule in p.rules:
            assert rule in RULES_BY_ID, (p.name, rule)
        for rule in (*p.allow, *p.ask):
            parse_rule(rule)
        assert all(r.startswith("GET ") for r in p.allow), p.name  # read-only allow
        assert p.ask == ("* /**",), p.name  # everything else asks
        if "{" not in p.auth:
            Auth.parse(p.auth)
        assert p.key_names, p.name


def test_credential_add_with_a_provider_fills_base_url_auth_and_rules(ws: Path) -> None:
    ran = subprocess.run(
        [OUTLOOP, "credential", "add", "acme", "claude", "--provider", "anthropic"],
        input=ANTHROPIC + "\n",
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    anthropic = provider_named("anthropic")
    assert anthropic is not None
    assert credentials()["claude"] == {
        "base_url": "https://api.anthropic.com",
        "auth": "header:x-api-key",
        "allow": anthropic.allow,
        "ask": ("* /**",),
    }
    assert SecretStore().get("acme", "claude") == Secret(ANTHROPIC)
    ran = outloop("credential", "add", "acme", "x", "--provider", "nope", cwd=ws)
    assert ran.returncode == 1 and "not in the catalog" in ran.stderr and "openai" in ran.stderr
    ran = outloop("credential", "add", "acme", "db", "--provider", "supabase", cwd=ws)
    assert ran.returncode == 1 and "give --base-url" in ran.stderr
    ran = outloop("credential", "add", "acme", "y", cwd=ws)
    assert ran.returncode == 64 and "--provider" in ran.stderr


# -- round trips over every bad input --------------------------------------------------

BAD_ENV = (
    "# Acme's settings\r\n"
    f'export OPENAI_API_KEY="{OPENAI}"\r\n'
    f"STRIPE_SECRET_KEY='{STRIPE}'   # live, careful\r\n"
    f"GITHUB_TOKEN={GITHUB} # inline comment\r\n"
    "\r\n"
    f'APP_PRIVATE_KEY="{PEM}"\r\n'
    f"OPENAI_API_KEY={OPENAI}\r\n"  # a duplicate, same value
    f"SLACK_BOT_TOKEN={SLACK}\r\n"
    "ANTHROPIC_API_KEY=outloop:acme/anthropic\r\n"
    f"INTERNAL_API_SECRET={UNKNOWN}\r\n"
    "DEBUG=true\r\n"
    "DATABASE_URL=postgres://app:Sup3rS3cretPassw0rd44@db.internal:5432/app\r\n"
)


def test_import_replaces_exactly_the_imported_values_and_the_keyring_holds_exactly_them(ws: Path) -> None:
    (ws / ".env").write_bytes(BAD_ENV.encode())
    # A symlinked .env (rewritten at its target, the link kept) and a read-only one (left alone).
    shared = ws / "shared"
    shared.mkdir()
    (shared / "common.env").write_text(f"ANTHROPIC_API_KEY={ANTHROPIC}\n")
    (ws / "api").mkdir()
    (ws / "api" / ".env").symlink_to(shared / "common.env")
    locked = ws / "api" / ".env.production"
    locked.write_text(f"SENDGRID_API_KEY={sample('sendgrid-api-key')}\n")
    locked.chmod(0o444)
    before = {p: p.read_bytes() for p in (ws / ".env", shared / "common.env", locked)}

    ran = outloop("import", "--dry-run", cwd=ws)
    assert ran.returncode == 0, ran.stderr
    assert_no_key(ran.stdout + ran.stderr, OPENAI, STRIPE, GITHUB, ANTHROPIC, SLACK, UNKNOWN)
    assert "dry run" in ran.stdout and (ws / ".env").read_bytes() == before[ws / ".env"]
    assert "-> acme/openai (OpenAI" in ran.stdout and "base URL https://api.openai.com/v1" in ran.stdout

    ran = outloop("import", "--yes", "--base-url", "INTERNAL_API_SECRET=https://internal.example.com/api", cwd=ws)
    assert ran.returncode == 0, ran.stderr
    seen = ran.stdout + ran.stderr
    assert_no_key(seen, OPENAI, STRIPE, GITHUB, ANTHROPIC, SLACK, UNKNOWN)
    assert "read-only" in seen and "private key" in seen and "already a placeholder" in seen
    assert "inside a longer value" in seen  # the database URL's password: by hand

    expected = BAD_ENV
    for value, name in ((OPENAI, "openai"), (STRIPE, "stripe"), (GITHUB, "github"), (SLACK, "slack")):
        expected = expected.replace(value, placeholder("acme", name))
    expected = expected.replace(UNKNOWN, placeholder("acme", "internal-api"))
    assert (ws / ".env").read_bytes() == expected.encode()
    assert (ws / "api" / ".env").is_symlink()
    assert (shared / "common.env").read_text() == "ANTHROPIC_API_KEY=outloop:acme/anthropic\n"
    assert locked.read_bytes() == before[locked]
    assert keyring_holds() == {
        "openai": OPENAI,
        "stripe": STRIPE,
        "github": GITHUB,
        "slack": SLACK,
        "anthropic": ANTHROPIC,
        "internal-api": UNKNOWN,
    }
    creds = credentials()
    assert creds["internal-api"] == {
        "base_url": "https://internal.example.com/api",
        "auth": "bearer",
        "allow": (),
        "ask": (),
    }
    assert creds["anthropic"]["auth"] == "header:x-api-key"
    assert creds["github"]["allow"] == ("GET /**",) and creds["github"]["ask"] == ("* /**",)
    # No copy anywhere in the workspace holds an imported key; no temporary file is left.
    for path in ws.rglob("*"):
        if path.is_file() and path != locked:
            assert_no_key(path.read_text(errors="replace"), OPENAI, STRIPE, GITHUB, ANTHROPIC, SLACK, UNKNOWN)
        assert not path.name.startswith(importer.TEMP_PREFIX)
    # A second run finds nothing to move and changes nothing.
    again = outloop("import", "--yes", cwd=ws)
    assert again.returncode == 0 and "no key to move" in again.stdout
    assert (ws / ".env").read_bytes() == expected.encode()


def test_unknown_provider_without_a_base_url_is_left_in_place_and_said_so(ws: Path) -> None:
    (ws / ".env").write_text(f"INTERNAL_API_SECRET={UNKNOWN}\n")
    ran = outloop("import", "--yes", cwd=ws)
    assert ran.returncode == 0
    assert "unknown provider" in ran.stdout and "--base-url INTERNAL_API_SECRET=URL" in ran.stdout
    assert (ws / ".env").read_text() == f"INTERNAL_API_SECRET={UNKNOWN}\n"
    assert credentials() == {}


def test_a_value_already_managed_is_not_stored_twice(ws: Path) -> None:
    paths = Paths.from_env()
    new = manage.check_credential(paths, "acme", "oa", base_url="https://api.openai.com/v1")
    manage.add_credential(new, Secret(OPENAI), SecretStore())
    (ws / ".env").write_text(f"OPENAI_API_KEY={OPENAI}\nOTHER_OPENAI_KEY={OPENAI}\n")
    ran = outloop("import", "--yes", cwd=ws)
    assert ran.returncode == 0, ran.stderr
    assert "already in the keyring" in ran.stdout
    assert (ws / ".env").read_text() == "OPENAI_API_KEY=outloop:acme/oa\nOTHER_OPENAI_KEY=outloop:acme/oa\n"
    assert keyring_holds() == {"oa": OPENAI}


def test_a_workspace_of_no_tenant_and_a_wrong_tenant_are_refused(ws: Path, tmp_path: Path) -> None:
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / ".env").write_text(f"OPENAI_API_KEY={OPENAI}\n")
    ran = outloop("import", "--yes", cwd=stray)
    assert ran.returncode == 1 and "no tenant's workspace" in ran.stderr and "outloop workspace add" in ran.stderr
    ran = outloop("import", str(ws), "--tenant", "globex", "--yes", cwd=stray)
    assert ran.returncode == 1 and "belongs to tenant 'acme'" in ran.stderr
    assert (stray / ".env").read_text() == f"OPENAI_API_KEY={OPENAI}\n"


def test_import_is_refused_inside_a_session(ws: Path) -> None:
    (ws / ".env").write_text(f"OPENAI_API_KEY={OPENAI}\n")
    ran = outloop("import", "--yes", cwd=ws, extra={"OUTLOOP_SESSION": "outloop_s_x"})
    assert ran.returncode == 1 and "outside every session" in ran.stderr
    assert (ws / ".env").read_text() == f"OPENAI_API_KEY={OPENAI}\n" and credentials() == {}


def test_not_at_a_terminal_without_yes_nothing_changes(ws: Path) -> None:
    (ws / ".env").write_text(f"OPENAI_API_KEY={OPENAI}\n")
    ran = outloop("import", cwd=ws)
    assert ran.returncode == 1 and "--yes" in ran.stderr
    assert (ws / ".env").read_text() == f"OPENAI_API_KEY={OPENAI}\n" and credentials() == {}


# -- failures between the steps ---------------------------------------------------------


class FailingKeyring(keyring.backend.KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def get_password(self, service: str, username: str) -> str | None:
        return None

    def set_password(self, service: str, username: str, password: str) -> None:
        raise keyring.errors.PasswordSetError("locked")

    def delete_password(self, service: str, username: str) -> None:
        raise keyring.errors.PasswordDeleteError("none")


def test_a_keyring_that_refuses_leaves_the_file_untouched(ws: Path) -> None:
    (ws / ".env").write_text(f"OPENAI_API_KEY={OPENAI}\n")
    paths = Paths.from_env()
    store = SecretStore(FailingKeyring())
    plan = importer.plan_import(paths, ws, secrets=store)
    with pytest.raises(SecretStoreError):
        importer.apply_import(plan, paths, store)
    assert (ws / ".env").read_text() == f"OPENAI_API_KEY={OPENAI}\n"
    assert credentials() == {}


def test_a_file_changed_since_the_plan_stops_the_import(ws: Path) -> None:
    (ws / ".env").write_text(f"OPENAI_API_KEY={OPENAI}\n")
    paths = Paths.from_env()
    plan = importer.plan_import(paths, ws)
    (ws / ".env").write_text(f"OPENAI_API_KEY={OPENAI}\nNEW=1\n")  # edited while the operator read the plan
    with pytest.raises(importer.FileChanged, match="changed since the plan"):
        importer.apply_import(plan, paths)
    assert (ws / ".env").read_text() == f"OPENAI_API_KEY={OPENAI}\nNEW=1\n"
    assert credentials() == {} and keyring_holds() == {}


def _paused_import(ws: Path, step: str, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    marker = tmp_path / f"paused-{step}"
    proc = subprocess.Popen(
        [OUTLOOP, "import", "--yes"],
        cwd=ws,
        env={**env(), importer.PAUSE_ENV: f"{step}:{marker}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    wait_for(marker.exists, what=f"the import to pause at {step}")
    return proc, marker


def test_a_file_edited_during_the_rewrite_rolls_the_credential_back(ws: Path, tmp_path: Path) -> None:
    (ws / ".env").write_text(f"OPENAI_API_KEY={OPENAI}\n")
    proc, marker = _paused_import(ws, "before-rename", tmp_path)
    assert keyring_holds() == {"openai": OPENAI}  # step 2 is done
    (ws / ".env").write_text(f"OPENAI_API_KEY={OPENAI}\nEDITED=1\n")
    marker.unlink()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "changed while it was being imported" in err
    assert_no_key(out + err, OPENAI)
    assert (ws / ".env").read_text() == f"OPENAI_API_KEY={OPENAI}\nEDITED=1\n"
    assert credentials() == {} and SecretStore().get("acme", "openai") is None
    assert not [p for p in ws.iterdir() if p.name.startswith(importer.TEMP_PREFIX)]


@pytest.mark.parametrize("step", ["after-keyring", "before-rename"])
def test_kill_9_between_the_steps_leaves_a_consistent_state_that_a_rerun_finishes(
    ws: Path, tmp_path: Path, step: str
) -> None:
    original = f"# keys\nOPENAI_API_KEY={OPENAI}\r\nSTRIPE_SECRET_KEY={STRIPE}\n"
    (ws / ".env").write_text(original, newline="")
    (ws / "web").mkdir()
    (ws / "web" / ".env.local").write_text(f"GITHUB_TOKEN={GITHUB}\n")
    proc, _marker = _paused_import(ws, step, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    # Either file is whole: old or new, never half; each configured credential has its secret.
    env_files = [ws / ".env", ws / "web" / ".env.local"]
    assert (ws / ".env").read_bytes().decode() == original  # the first file's rename never happened
    assert (ws / "web" / ".env.local").read_text() == f"GITHUB_TOKEN={GITHUB}\n"
    held = keyring_holds()
    assert set(held) == set(credentials())
    assert held == {"openai": OPENAI, "stripe": STRIPE}
    leftovers = [p for p in ws.iterdir() if p.name.startswith(importer.TEMP_PREFIX)]
    for temp in leftovers:  # a temporary file holds the new content, never an imported key
        assert_no_key(temp.read_text(), OPENAI, STRIPE)
    ran = outloop("import", "--yes", cwd=ws)
    assert ran.returncode == 0, ran.stderr
    assert (ws / ".env").read_bytes().decode() == (
        "# keys\nOPENAI_API_KEY=outloop:acme/openai\r\nSTRIPE_SECRET_KEY=outloop:acme/stripe\n"
    )
    assert (ws / "web" / ".env.local").read_text() == "GITHUB_TOKEN=outloop:acme/github\n"
    assert keyring_holds() == {"openai": OPENAI, "stripe": STRIPE, "github": GITHUB}
    assert not [p for p in ws.rglob("*") if p.name.startswith(importer.TEMP_PREFIX)]
    for path in env_files:
        assert_no_key(path.read_text(), OPENAI, STRIPE, GITHUB)


# -- from an alert -----------------------------------------------------------------------


def test_an_alerts_key_moves_into_the_keyring_and_the_alert_resolves(ws: Path) -> None:
    paths = Paths.from_env()
    env_file = ws / ".env"
    env_file.write_text(f"FOO=1\nOPENAI_API_KEY={OPENAI}\nSTRIPE_SECRET_KEY={STRIPE}\n")
    store = AlertStore(paths.alerts_file)
    store.reconcile_file(env_file, scan_file(env_file, tenant="acme", workspace=ws).findings)
    alert = next(a for a in store.open_alerts() if a.rule == "openai-project-key")
    assert importer.importable_alert(alert.path, alert.line, alert.rule) == "OpenAI"
    plan = importer.plan_import(paths, Path(alert.path), only_fingerprints={alert.fingerprint})
    assert [k.credential for k in plan.ready()] == ["openai"]
    importer.apply_import(plan, paths)
    assert env_file.read_text() == f"FOO=1\nOPENAI_API_KEY=outloop:acme/openai\nSTRIPE_SECRET_KEY={STRIPE}\n"
    events = store.reconcile_file(env_file, scan_file(env_file, tenant="acme", workspace=ws).findings)
    assert [type(e).__name__ for e in events] == ["AlertResolved"]
    assert store.get(alert.id) is not None and store.get(alert.id).status == "resolved"  # type: ignore[union-attr]
    assert [a.rule for a in store.open_alerts()] == ["stripe-secret-key"]


# -- the code keeps working: python-dotenv + openai SDK, and node --env-file ----------

MODELS = {"object": "list", "data": [{"id": "gpt-acme", "object": "model", "created": 1, "owned_by": "acme-org"}]}


class OpenAILike(BaseHTTPRequestHandler):
    key = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        ok = self.path == "/v1/models" and self.headers.get("Authorization") == f"Bearer {self.key}"
        body = json.dumps(MODELS if ok else {"error": {"message": "bad key"}}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def openai_like() -> Iterator[str]:
    handler = type("Handler", (OpenAILike,), {"key": OPENAI})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


APP_PY = """
import json
from dotenv import load_dotenv
load_dotenv()  # override=False: a variable outloop run set is kept
from openai import OpenAI
models = OpenAI().models.list()
print(json.dumps({"id": models.data[0].id, "owned_by": models.data[0].owned_by}))
"""

APP_JS = """
const base = process.env.OPENAI_BASE_URL;
fetch(base + "/models", {headers: {Authorization: "Bearer " + process.env.ACME_AI_KEY}})
  .then((r) => r.json())
  .then((d) => console.log(JSON.stringify({id: d.data[0].id, owned_by: d.data[0].owned_by})));
"""


def test_a_dotenv_project_gets_the_same_answer_before_and_after_import_under_outloop_run(
    ws: Path, openai_like: str
) -> None:
    node = shutil.which("node")
    project = ws / "chatbot"
    project.mkdir()
    (project / "app.py").write_text(APP_PY)
    (project / "app.js").write_text(APP_JS)
    (project / ".env").write_text(
        f"OPENAI_BASE_URL={openai_like}\nOPENAI_API_KEY={OPENAI}\n# the node side names it its own way\n"
        f"ACME_AI_KEY={OPENAI}\n"
    )
    bare = {k: v for k, v in env().items() if not k.startswith(("OPENAI_", "OUTLOOP_SESSION"))}

    def run(argv: list[str]) -> dict[str, Any]:
        ran = subprocess.run(argv, cwd=project, env=bare, capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr[-2000:].replace(OPENAI, "<key>")
        assert_no_key(ran.stdout + ran.stderr, OPENAI)
        result: dict[str, Any] = json.loads(ran.stdout.strip().splitlines()[-1])
        return result

    before_py = run([sys.executable, "app.py"])
    assert before_py == {"id": "gpt-acme", "owned_by": "acme-org"}
    before_js = run([node, "--env-file=.env", "app.js"]) if node else None

    ran = outloop("import", "--yes", cwd=project)
    assert ran.returncode == 0, ran.stderr
    assert credentials()["openai"]["base_url"] == openai_like  # the project's own base URL, from its .env
    for path in ws.rglob("*"):
        if path.is_file():
            assert_no_key(path.read_text(errors="replace"), OPENAI)

    editor = ConfigEditor(Paths.from_env())
    editor.raw.setdefault("broker", {})["listen"] = "127.0.0.1:0"
    editor.save()
    broker = BrokerThread(Paths.from_env()).start()
    try:
        after_py = run([OUTLOOP, "run", "--", sys.executable, "app.py"])
        assert after_py == before_py
        if node:
            assert run([OUTLOOP, "run", "--", node, "--env-file=.env", "app.js"]) == before_js
        # From inside the session, an import is refused by the broker even with the variable unset.
        inner = f"unset OUTLOOP_SESSION; {OUTLOOP} import --yes"
        ran = subprocess.run(
            [OUTLOOP, "run", "--", "bash", "-c", inner], cwd=project, env=bare, capture_output=True, text=True
        )
        assert ran.returncode == 1 and "outside every session" in ran.stderr
    finally:
        broker.stop()
    calls = [r for r in broker.engine.recent_audit(100) if r.get("event") == "attempt" and r.get("credential")]
    assert len(calls) == (2 if node else 1) and {r["credential"] for r in calls} == {"openai"}
    assert {r["identity"] for r in calls} == {"session"} and {r["decision"] for r in calls} == {"allow"}


async def test_the_alert_screen_moves_a_dotenv_key_into_the_keyring(ws: Path) -> None:
    """The dashboard: enter on the alert, m, y; the same plan and guarantees as `outloop import`."""
    from broker.engine import Engine
    from outloop_tui.app import OutloopApp
    from outloop_tui.widgets.alerts import AlertScreen
    from outloop_tui.widgets.confirm import ConfirmScreen

    paths = Paths.from_env()
    env_file = ws / ".env"
    env_file.write_text(f"OPENAI_API_KEY={OPENAI}\n")
    engine = Engine(paths)
    engine.alerts = AlertStore(paths.alerts_file)
    engine.alerts.reconcile_file(env_file, scan_file(env_file, tenant="acme", workspace=ws).findings)
    app = OutloopApp(engine, watch=False, serve=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await asyncio.wait_for(app.ready.wait(), 15)
        app.dashboard.refresh_view()
        app.screen.query_one("#alerts").focus()
        await pilot.press("enter")
        await _until(pilot, lambda: isinstance(app.screen, AlertScreen))
        assert app.screen.query("#move")
        await pilot.press("m")
        await _until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        shown = " ".join(str(w.content) for w in app.screen.query(Static))
        assert "acme/openai" in shown and "OpenAI" in shown
        assert_no_key(shown, OPENAI)
        await pilot.press("y")
        await _until(pilot, lambda: env_file.read_text() == "OPENAI_API_KEY=outloop:acme/openai\n")
    assert keyring_holds() == {"openai": OPENAI}
    engine.alerts.reconcile_file(env_file, scan_file(env_file, tenant="acme", workspace=ws).findings)
    assert engine.alerts.open_alerts() == []  # resolved: the file no longer holds the value


async def _until(pilot: Any, predicate: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await pilot.pause(0.05)
