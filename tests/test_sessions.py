"""Agent sessions (DESIGN §10): `outloop run`, the identity order, loopback TCP, the SDKs.

Real processes and real sockets throughout: the broker serves on the test's Unix
socket and on 127.0.0.1 (an ephemeral port); `outloop run` is the console script;
the escapes are real shells, forks and `setsid`s; /proc is the kernel's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fixtures import OUTLOOP, BrokerThread, Ran, World, wait_for

from broker.calls.identity import process_start
from broker.calls.sessions import TOKEN_PREFIX
from broker.config import ConfigEditor

PY = sys.executable
BIN_LLM = str(Path(sys.executable).parent / "llm")

# Makes one call through the broker (socket, or TCP with only the session's env) and
# prints what it got, as JSON. argv[1]: "socket" | "whoami"; run from any folder.
CALL = r"""
import json, sys
from broker.client import request
from broker.paths import Paths
what = sys.argv[1]
sock = Paths.from_env().socket
if what == "whoami":
    r = request(sock, "GET", "/v1/whoami", timeout=60)
else:
    body = json.dumps({"credential": "api", "method": "GET", "path": "/echo/" + what}).encode()
    r = request(sock, "POST", "/v1/request", body=body, timeout=60)
print(json.dumps({"status": r.status, "body": json.loads(r.body)}))
"""


@pytest.fixture
def served(world: World) -> Iterator[BrokerThread]:
    """The broker with a loopback TCP listener on an ephemeral port."""
    world.configure(listen="127.0.0.1:0")
    thread = BrokerThread(world.paths).start()
    try:
        yield thread
    finally:
        thread.stop()


def run_in_session(world: World, cwd: Path, *command: str, env: dict[str, str] | None = None) -> Ran:
    ran = world.run([OUTLOOP, "run", "--", *command], cwd, env=env)
    world.assert_clean(ran.seen)
    return ran


def last_json(text: str) -> Any:
    return json.loads(text.strip().splitlines()[-1])


def session_records(world: World) -> list[dict[str, Any]]:
    return [r for r in world.audit() if r.get("event") in ("attempt", "outcome")]


# -- the end-to-end slice ------------------------------------------------------------------


def test_run_opens_a_session_that_the_command_and_its_children_are_identified_by(
    world: World, served: BrokerThread
) -> None:
    ran = run_in_session(world, world.acme, PY, "-c", CALL, "whoami")
    assert ran.returncode == 0, ran.seen
    who = last_json(ran.stdout)["body"]
    assert (who["tenant"], who["identity"]) == ("acme", "session")
    assert who["session"]
    # A child that cds into globex's folder is still acme's: the session binds the tenant.
    script = f"cd {world.globex} && {PY} -c '{CALL}' probe"
    ran = run_in_session(world, world.acme, "bash", "-c", script)
    assert ran.returncode == 0, ran.seen
    result = last_json(ran.stdout)
    assert result["status"] == 200 and result["body"]["status"] == 200
    (received,) = world.upstream.records
    assert received.path == "/acme/echo/probe"
    records = session_records(world)
    assert {r["identity"] for r in records} == {"session"}
    assert len({r["session"] for r in records}) == 1 and None not in {r["session"] for r in records}
    # The session ended with its root.
    wait_for(lambda: not served.engine.sessions.live(), what="the sessions to end with their roots")
    wait_for(lambda: len([r for r in world.audit() if r.get("event") == "session_end"]) == 2, what="session_end")


def test_run_exits_with_the_commands_status_and_passes_signals_on(world: World, served: BrokerThread) -> None:
    assert run_in_session(world, world.acme, PY, "-c", "import sys; sys.exit(7)").returncode == 7
    assert run_in_session(world, world.acme, "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    proc = subprocess.Popen(
        [
            OUTLOOP,
            "run",
            "--",
            PY,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\nprint('up', flush=True)\ntime.sleep(120)",
        ],
        cwd=world.acme,
        env=world.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    proc.terminate()  # SIGTERM to `outloop run`, passed on to the command
    assert proc.wait(60) == 42


def test_run_refuses_what_it_cannot_bind(world: World, served: BrokerThread) -> None:
    ran = world.outloop("run", cwd=world.acme)
    assert ran.returncode == 2 and "name the command" in ran.stderr
    ran = world.outloop("run", "--", "true", cwd=world.unmapped)
    assert ran.returncode == 2 and "unmapped_workspace" in ran.stderr
    ran = world.outloop("run", "--tenant", "globex", "--", "true", cwd=world.acme)
    assert ran.returncode == 2 and "wrong_tenant" in ran.stderr
    ran = world.outloop("run", "--", "no-such-command-outloop", cwd=world.acme)
    assert ran.returncode == 127 and "command not found" in ran.stderr
    # From inside acme's session, a session for globex is refused; one for acme cannot outlive it.
    nested = f"cd {world.globex} && {OUTLOOP} run -- true"
    ran = run_in_session(world, world.acme, "bash", "-c", nested)
    assert ran.returncode == 2 and "wrong_tenant" in ran.stderr, ran.seen
    decisions = [r["decision"] for r in world.audit() if r.get("event") == "attempt"]
    assert decisions.count("wrong_tenant") == 2 and "unmapped_workspace" in decisions


def test_the_session_cap_is_a_clear_refusal(world: World, served: BrokerThread) -> None:
    world.configure(max_sessions=2)
    holder = "import time, sys; print('up', flush=True); sys.stdin.read()"
    procs = [
        subprocess.Popen(
            [OUTLOOP, "run", "--", PY, "-c", holder],
            cwd=world.acme,
            env=world.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        ran = world.outloop("run", "--", "true", cwd=world.acme)
        assert ran.returncode == 2 and "session_limit" in ran.stderr
        assert "outloop session revoke" in ran.stderr
    finally:
        for proc in procs:
            proc.communicate("", timeout=60)


# -- escapes that work with the folder rule alone, and not in a session ----------------------


def test_a_cd_slash_subshell_no_longer_hides_the_shell_that_started_it(world: World, served: BrokerThread) -> None:
    escape = f"cd / && (cd {world.acme} && {OUTLOOP} call api GET /echo/escape)"
    # The agent (here a Python process) runs in globex's folder and gives its shell the line.
    agent = "import subprocess, sys; sys.exit(subprocess.run(['bash', '-c', sys.argv[1]]).returncode)"
    # Folder rule, hardened: the whole ancestor chain is read, past the shell parked in /.
    ran = world.python(agent, escape, cwd=world.globex)
    assert ran.returncode == 2 and "wrong_tenant" in ran.stderr, ran.seen
    # In globex's session the call is globex's, wherever the subshell stands.
    ran = run_in_session(world, world.globex, PY, "-c", agent, escape)
    assert ran.returncode == 0, ran.seen
    assert [r.path for r in world.upstream.records] == ["/globex/echo/escape"]


def orphan_script(world: World, how: str, out: Path) -> list[str]:
    """A command that leaves an orphan (double fork, setsid + fork, or nohup &) to call from globex."""
    if how == "nohup":
        inner = (
            f"cd {world.globex} && {OUTLOOP} call api GET /echo/nohup > {out}.body 2>{out}.err; "
            f"echo $? > {out}.tmp && mv {out}.tmp {out}"
        )
        return [
            "bash",
            "-c",
            f"(nohup bash -c '{inner}' >/dev/null 2>&1 &) ; while [ ! -s {out} ]; do sleep 0.02; done",
        ]
    code = (
        "import os, sys, time\n"
        "how, target, out, outloop = sys.argv[1:5]\n"
        "if os.fork() == 0:\n"
        "    if how == 'setsid':\n"
        "        os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.chdir(target)\n"
        "        r = os.system(f'{outloop} call api GET /echo/{how} > {out}.body 2>{out}.err; echo $? > {out}.tmp')\n"
        "        os.rename(out + '.tmp', out)\n"
        "        os._exit(0)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "while not os.path.exists(out):\n"
        "    time.sleep(0.02)\n"
    )
    return [PY, "-c", code, how, str(world.globex), str(out), OUTLOOP]


@pytest.mark.parametrize("how", ["double-fork", "setsid", "nohup"])
def test_an_orphan_stays_in_the_session(world: World, served: BrokerThread, tmp_path: Path, how: str) -> None:
    out = tmp_path / f"{how}.rc"
    ran = run_in_session(world, world.acme, *orphan_script(world, how, out))
    assert ran.returncode == 0, ran.seen
    assert out.read_text().strip() == "0", (tmp_path / f"{how}.rc.err").read_text()
    world.assert_clean(Path(f"{out}.body").read_text())
    # Served as acme although it stood in globex's folder with no ancestor left but the root.
    assert [r.path for r in world.upstream.records] == [f"/acme/echo/{how}"]
    (record,) = [r for r in world.audit() if r.get("event") == "attempt"]
    assert record["identity"] == "session" and record["tenant"] == "acme"


# -- loopback TCP: the SDKs and curl with nothing but the session's env ----------------------

SDKS = r"""
import json, os
from openai import OpenAI
import anthropic
oa = OpenAI()
models = oa.models.list()
chat = oa.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
msg = anthropic.Anthropic().messages.create(
    model="claude-test", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
)
print(json.dumps({
    "owned_by": models.data[0].owned_by,
    "chat": chat.choices[0].message.content,
    "claude": msg.content[0].text,
    "base": os.environ["OPENAI_BASE_URL"],
}))
"""


def add_anthropic(world: World) -> None:
    from broker.secrets import Secret, SecretStore

    editor = ConfigEditor(world.paths)
    editor.add_credential(
        "acme",
        "anthropic",
        {"base_url": f"{world.upstream.url}/anthropic", "auth": "header:x-api-key", "allow": ["POST /v1/messages"]},
    )
    editor.save()
    world.keys[("acme", "anthropic")] = "sk-ant-acme-Qz9/+Ww8=Kp"
    SecretStore().set("acme", "anthropic", Secret(world.keys[("acme", "anthropic")]))


def assert_no_token_upstream(world: World) -> None:
    for rec in world.upstream.records:
        assert TOKEN_PREFIX not in json.dumps([rec.target, rec.headers, rec.body.decode("latin-1")])


def test_the_openai_and_anthropic_sdks_and_curl_work_over_tcp_with_the_session_env(
    world: World, served: BrokerThread
) -> None:
    add_anthropic(world)
    ran = run_in_session(world, world.acme, PY, "-c", SDKS)
    assert ran.returncode == 0, ran.seen
    out = last_json(ran.stdout)
    assert out["base"].startswith(served.engine.listen_url + "/v1/proxy/openai")
    assert out["owned_by"] == out["chat"][5:] == "[REDACTED:openai]"
    assert out["claude"] == "echo [REDACTED:anthropic]"
    models, chat, messages = world.upstream.records
    assert (models.path, chat.path, messages.path) == ("/v1/models", "/v1/chat/completions", "/anthropic/v1/messages")
    assert chat.header("Authorization") == f"Bearer {world.keys[('acme', 'openai')]}"
    assert messages.header("x-api-key") == world.keys[("acme", "anthropic")]
    assert_no_token_upstream(world)
    calls = [r for r in world.audit() if r.get("event") == "attempt"]
    assert [r["identity"] for r in calls] == ["session"] * 3  # found from the TCP peer's process tree
    if shutil.which("curl"):
        world.upstream.clear()
        curl = 'curl -sS "$OPENAI_BASE_URL/models" -H "Authorization: Bearer $OPENAI_API_KEY"'
        ran = run_in_session(world, world.acme, "bash", "-c", curl)
        assert ran.returncode == 0, ran.seen
        assert json.loads(ran.stdout)["data"][0]["owned_by"] == "[REDACTED:openai]"
        assert_no_token_upstream(world)


HOLD_ENV = "import json, os, sys; print(json.dumps(dict(os.environ)), flush=True); sys.stdin.read()"


class HeldSession:
    """A session kept open by a command that printed its environment and waits on stdin."""

    def __init__(self, world: World, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [OUTLOOP, "run", "--label", "held", "--", PY, "-c", HOLD_ENV],
            cwd=cwd,
            env=world.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.env: dict[str, str] = json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.communicate("", timeout=60)


def copied_env(world: World, held: HeldSession) -> dict[str, str]:
    """A fresh process's environment with the session's variables copied in (a token taken elsewhere)."""
    env = world.env()
    for k in ("OUTLOOP_SESSION", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        env[k] = held.env[k]
    return env


def test_a_token_identifies_its_session_and_nowhere_else(world: World, served: BrokerThread) -> None:
    held = HeldSession(world, world.acme)
    try:
        token = held.env["OUTLOOP_SESSION"]
        base = held.env["OPENAI_BASE_URL"]
        assert held.env["OPENAI_API_KEY"] == token and token.startswith(TOKEN_PREFIX)
        curl = ["curl", "-sS", f"{base}/models", "-H", f"Authorization: Bearer {token}"]
        # From an unmapped folder, outside any session: the token's session.
        ran = world.run(curl, world.unmapped)
        assert json.loads(ran.stdout)["data"][0]["owned_by"] == "[REDACTED:openai]", ran.seen
        # The same token copied into globex's folder: wrong_tenant, on TCP and on the socket.
        ran = world.run(curl, world.globex)
        assert json.loads(ran.stdout)["error"]["code"] == "wrong_tenant", ran.seen
        ran = world.run([PY, "-c", CALL, "copied"], world.globex, env=copied_env(world, held))
        assert last_json(ran.stdout)["body"]["error"]["code"] == "wrong_tenant"
        # Used from inside globex's own session: wrong_tenant too.
        ran = world.run([OUTLOOP, "run", "--", *curl], world.globex)
        assert json.loads(ran.stdout)["error"]["code"] == "wrong_tenant", ran.seen
        # In a query string: refused, whoever sends it.
        ran = world.run(["curl", "-sS", f"{base}/models?api_key={token}"], world.unmapped)
        assert json.loads(ran.stdout)["error"]["code"] == "bad_request"
        assert "never in the URL" in json.loads(ran.stdout)["error"]["message"]
        # Listed, revoked, and then a clear refusal.
        listed = world.outloop("session", "list", "--json", cwd=world.unmapped)
        (session,) = json.loads(listed.stdout)
        assert session["label"] == "held" and session["tenant"] == "acme"
        assert token not in listed.stdout
        inside = world.run([OUTLOOP, "run", "--", OUTLOOP, "session", "list"], world.acme)
        assert inside.returncode == 2 and "denied_by_policy" in inside.stderr
        assert world.outloop("session", "revoke", session["id"], cwd=world.unmapped).returncode == 0
        ran = world.run(curl, world.unmapped)
        error = json.loads(ran.stdout)["error"]
        assert error["code"] == "no_session" and "revoked" in error["message"]
    finally:
        held.close()
    assert_no_token_upstream(world)
    assert len(world.upstream.records) == 1
    records = world.audit()
    identities = [r["identity"] for r in records if r.get("event") == "attempt" and r.get("credential")]
    assert identities[0] == "token"
    assert token not in json.dumps(records)
    (revoked,) = [r for r in records if r.get("event") == "session_end" and r["session"] == session["id"]]
    assert revoked["reason"] == "revoked"


def test_require_session_refuses_calls_from_outside_with_a_message_for_the_operator(
    world: World, served: BrokerThread
) -> None:
    world.configure(require_session=True)
    ran = world.outloop("call", "api", "GET", "/echo/outside", cwd=world.acme)
    assert ran.returncode == 2 and "no_session" in ran.stderr
    assert "outloop run" in ran.stderr and "operator" in ran.stderr
    ran = run_in_session(world, world.acme, OUTLOOP, "call", "api", "GET", "/echo/inside")
    assert ran.returncode == 0, ran.seen
    assert [r.path for r in world.upstream.records] == ["/acme/echo/inside"]
    (refused,) = [r for r in world.audit() if r.get("decision") == "no_session"]
    assert refused["session"] is None and refused["identity"] == "folder"


def test_an_idle_tcp_connection_is_closed_and_audited(world: World, served: BrokerThread) -> None:
    import socket
    from urllib.parse import urlsplit

    world.configure(idle_timeout=0.3)
    served.call(served.engine.refresh_config)
    parts = urlsplit(served.engine.listen_url or "")
    conns = [socket.create_connection((parts.hostname, parts.port), timeout=60) for _ in range(3)]
    for conn in conns:
        assert conn.recv(1024) == b""  # closed by the broker, not by our timeout
        conn.close()
    wait_for(
        lambda: (
            len([r for r in world.audit() if r.get("status") == 408 or "sent nothing" in r.get("message", "")]) >= 3
        ),
        what="the idle closes audited",
    )


def test_a_session_survives_a_broker_restart_only_if_its_root_is_the_same_process(world: World) -> None:
    world.configure(listen="127.0.0.1:0")
    thread = BrokerThread(world.paths).start()
    held = HeldSession(world, world.acme)
    try:
        state = world.paths.state_dir / "sessions.json"
        assert state.stat().st_mode & 0o777 == 0o600
        assert held.env["OUTLOOP_SESSION"] not in state.read_text()
        thread.stop()
        # A second session whose root has the held root's pid but another start time: a reused pid.
        doc = json.loads(state.read_text())
        (row,) = doc["sessions"]
        impostor = dict(row, id="impostor", root_start=row["root_start"] - 1, token_hash="0" * 64)
        doc["sessions"].append(impostor)
        state.write_text(json.dumps(doc))
        thread = BrokerThread(world.paths).start()
        assert [s.id for s in thread.engine.sessions.live()] == [row["id"]]
        assert process_start(row["root_pid"]) == row["root_start"]
        ran = world.run([PY, "-c", CALL, "after-restart"], world.unmapped, env=copied_env(world, held))
        assert last_json(ran.stdout)["body"]["status"] == 200
    finally:
        held.close()
        thread.stop()
    # Its root has exited: after another restart, the session is gone.
    thread = BrokerThread(world.paths).start()
    try:
        assert thread.engine.sessions.live() == []
    finally:
        thread.stop()


@pytest.mark.parametrize("address", ["0.0.0.0:7878", "192.168.1.4:7878", "[::]:7878", "example.com:7878", "7878"])
def test_a_listen_address_off_loopback_is_refused_at_config_load(world: World, address: str) -> None:
    from broker.config import ConfigError, load_config

    world.configure()
    raw = world.paths.config_file.read_text()
    world.paths.config_file.write_text(
        f'[broker]\nlisten = "{address}"\n' + raw.replace("[broker]\n", "[x-broker-old]\n")
    )
    with pytest.raises(ConfigError, match="broker.listen"):
        load_config(world.paths)


def test_loopback_listen_addresses_are_accepted() -> None:
    from broker.config import parse_listen

    assert parse_listen("127.0.0.1:7878") == ("127.0.0.1", 7878)
    assert parse_listen("localhost:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:7878") == ("::1", 7878)


def test_nodes_fetch_works_with_nothing_but_the_session_env(world: World, served: BrokerThread) -> None:
    """A Node program that reads OPENAI_BASE_URL and OPENAI_API_KEY, as SDKs do, goes through the broker."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (.ci/run installs it)")
    script = (
        "const r = await fetch(`${process.env.OPENAI_BASE_URL}/models`,"
        " {headers: {Authorization: `Bearer ${process.env.OPENAI_API_KEY}`}});"
        " console.log(JSON.stringify({status: r.status, body: await r.json()}));"
    )
    ran = run_in_session(world, world.acme, node, "--input-type=module", "-e", script)
    assert ran.returncode == 0, ran.seen
    out = last_json(ran.stdout)
    assert out["status"] == 200 and out["body"]["data"][0]["owned_by"] == "[REDACTED:openai]"
    (models,) = world.upstream.records
    assert models.header("Authorization") == f"Bearer {world.keys[('acme', 'openai')]}"
    assert_no_token_upstream(world)
    assert [r["identity"] for r in world.audit() if r.get("event") == "attempt"] == ["session"]


def test_what_the_command_leaves_running_ends_with_the_session(world: World, served: BrokerThread) -> None:
    """A background job outliving CMD would act for its folder outside any session: `run` ends it."""
    import psutil

    leave = "(setsid nohup sleep 300 >/dev/null 2>&1 & echo $!) ; (sleep 300 & echo $!)"
    ran = run_in_session(world, world.acme, "bash", "-c", leave)
    assert ran.returncode == 0, ran.seen
    pids = [int(line) for line in ran.stdout.split() if line.isdigit()]
    assert len(pids) == 2
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"{pid} outlived its session"


def test_killing_the_session_root_does_not_set_its_processes_free(
    world: World, served: BrokerThread, tmp_path: Path
) -> None:
    """kill -9 of `outloop run` ends the session; what it started stays refused, wherever it goes."""
    import signal as signals

    pid_file, gate, out = tmp_path / "leftover.pid", tmp_path / "go", tmp_path / "leftover.out"
    leftover = (
        f"echo $$ > {pid_file}; while [ ! -e {gate} ]; do sleep 0.05; done; cd {world.globex}; "
        f"env -u OUTLOOP_SESSION {OUTLOOP} call api GET /echo/leftover > {out}.body 2> {out}.err; echo $? > {out}"
    )
    root = subprocess.Popen(
        [OUTLOOP, "run", "--", "bash", "-c", f"setsid bash -c '{leftover}' & sleep 300"],
        cwd=world.acme,
        env=world.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(pid_file.exists, 30, "the leftover to start")
        child = int(pid_file.read_text())

        def noted() -> bool:
            members = broker_members(served)
            return any(pid == child for pid, _ in members)

        wait_for(noted, 30, "the broker to note the session's processes")
        root.send_signal(signals.SIGKILL)
        root.wait(30)
        wait_for(lambda: not served.call(served.engine.sessions.live), 30, "the session to end")
        gate.touch()
        wait_for(out.exists, 60, "the leftover's call")
        assert out.read_text().strip() == "2"  # refused
        assert "no_session" in Path(f"{out}.err").read_text()
        assert not [r for r in world.upstream.records if r.path.endswith("/echo/leftover")]
    finally:
        with contextlib.suppress(ProcessLookupError):
            root.kill()
        subprocess.run(["pkill", "-f", str(gate)], check=False)


def broker_members(served: BrokerThread) -> list[tuple[int, int]]:
    sessions = served.engine.sessions
    return served.call(lambda: [m for ms in sessions._members.values() for m in ms])


# -- `llm` (Simon Willison's CLI) with nothing but the session's env -------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["no-stream", "stream"])
def test_llm_works_with_nothing_but_the_session_env(
    world: World, served: BrokerThread, tmp_path: Path, stream: bool
) -> None:
    """`outloop run -- llm -m gpt-4o-mini hi`: llm's OpenAI models build `openai.OpenAI(api_key=...)`
    with no base URL, so the SDK reads OPENAI_BASE_URL, and llm reads OPENAI_API_KEY (a key
    stored with `llm keys set openai` would win over it: the throw-away LLM_USER_PATH holds none)."""
    real = world.keys[("acme", "openai")]
    env_dump, user_path = tmp_path / "agent.env", tmp_path / "llm-user"
    user_path.mkdir()
    # The operator's own shell holds the real key and OpenAI's own base URL: neither may reach llm.
    operator_env = world.env(
        LLM_USER_PATH=str(user_path), OPENAI_API_KEY=real, OPENAI_BASE_URL="https://api.openai.com/v1"
    )
    args = ["-m", "gpt-4o-mini", *([] if stream else ["--no-stream"]), "hi"]
    script = f'env > {env_dump} && exec {BIN_LLM} "$@"'
    ran = run_in_session(world, world.acme, "sh", "-c", script, "sh", *args, env=operator_env)
    assert ran.returncode == 0, ran.seen
    assert ran.stdout.strip() == "echo [REDACTED:openai]"  # the answer, redacted on its way back
    # The agent's environment: the session token as the key, the broker as the base URL, no key.
    agent_env = dict(line.split("=", 1) for line in env_dump.read_text().splitlines() if "=" in line)
    world.assert_clean(env_dump.read_text())
    token = agent_env["OPENAI_API_KEY"]
    assert token.startswith(TOKEN_PREFIX) and token == agent_env["OUTLOOP_SESSION"]
    assert agent_env["OPENAI_BASE_URL"].startswith(served.engine.listen_url + "/v1/proxy/openai")
    # The upstream saw the real key and never the token.
    (chat,) = world.upstream.records
    assert (chat.method, chat.path) == ("POST", "/v1/chat/completions")
    assert chat.header("Authorization") == f"Bearer {real}"
    assert json.loads(chat.body)["model"] == "gpt-4o-mini"
    assert json.loads(chat.body).get("stream", False) is stream
    assert_no_token_upstream(world)
    # Audited as the session's call (found from the TCP peer's process tree).
    (attempt,) = [r for r in world.audit() if r.get("event") == "attempt"]
    assert (attempt["credential"], attempt["method"], attempt["path"]) == ("openai", "POST", "/chat/completions")
    assert attempt["identity"] == "session" and attempt["session"] and attempt["tenant"] == "acme"
    assert attempt["decision"] == "allow"
    assert token not in json.dumps(world.audit())


@pytest.mark.parametrize("key_name", [None, "openai"], ids=["dummy-key", "api_key_name"])
def test_an_llm_extra_openai_model_reaches_the_broker_by_its_api_base(
    world: World, served: BrokerThread, tmp_path: Path, key_name: str | None
) -> None:
    """A model of extra-openai-models.yaml with its own api_base ignores OPENAI_BASE_URL: pointed
    at the broker it works, sending llm's dummy key (the session is found from the process tree)
    or, with api_key_name, the session token."""
    user_path = tmp_path / "llm-user"
    user_path.mkdir()
    model = {"model_id": "via-outloop", "model_name": "gpt-4o-mini"}
    model["api_base"] = served.engine.listen_url + "/v1/proxy/openai"
    if key_name:
        model["api_key_name"] = key_name
    lines = [f"- model_id: {model.pop('model_id')}"] + [f"  {k}: {v}" for k, v in model.items()]
    (user_path / "extra-openai-models.yaml").write_text("\n".join(lines) + "\n")
    env = world.env(LLM_USER_PATH=str(user_path))
    ran = run_in_session(world, world.acme, BIN_LLM, "-m", "via-outloop", "--no-stream", "hi", env=env)
    assert ran.returncode == 0, ran.seen
    assert ran.stdout.strip() == "echo [REDACTED:openai]"
    (chat,) = world.upstream.records
    assert chat.header("Authorization") == f"Bearer {world.keys[('acme', 'openai')]}"
    assert json.loads(chat.body)["model"] == "gpt-4o-mini"
    assert_no_token_upstream(world)
    (attempt,) = [r for r in world.audit() if r.get("event") == "attempt"]
    assert (attempt["identity"], attempt["decision"]) == ("session", "allow")


# -- a setuid program inside a session --------------------------------------------------------

# Run by a copy of the system Python made setuid to `nobody` (started by root: real uid 0,
# effective and saved uid nobody). Each step calls GET $OPENAI_BASE_URL/models and prints
# what it got, with the uids it had: over a Unix socket connection its parent opened (fd
# argv[1]) and over TCP with the session token, both as nobody; over TCP with the real uid
# nobody and the effective uid root; then back to root for good, from a forked child that
# cds into globex's folder (argv[2]) and sends no token.
SETUID_STEPS = r"""
import http.client, json, os, socket, sys
from urllib.parse import urlsplit
fd, globex = int(sys.argv[1]), sys.argv[2]
base = urlsplit(os.environ["OPENAI_BASE_URL"])
token = os.environ["OUTLOOP_SESSION"]
def call(step, conn, auth):
    headers = {"Authorization": "Bearer " + token} if auth else {}
    conn.request("GET", base.path + "/models", headers=headers)
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    error = body.get("error") or {}
    owned = body["data"][0]["owned_by"] if "data" in body else None
    return {"step": step, "uids": list(os.getresuid()), "status": r.status, "code": error.get("code"),
            "message": error.get("message"), "owned_by": owned}
def tcp():
    return http.client.HTTPConnection(base.hostname, base.port, timeout=60)
out = []
unix = http.client.HTTPConnection("outloop", timeout=60)
unix.sock = socket.socket(fileno=fd)
out.append(call("inherited-unix", unix, False))
out.append(call("tcp-token", tcp(), True))
os.setresuid(os.geteuid(), 0, 0)  # real nobody, effective root
out.append(call("tcp-real-nobody", tcp(), False))
os.setresuid(0, 0, 0)
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.chdir(globex)
    os.write(write, json.dumps(call("child-back-to-root", tcp(), False)).encode())
    os._exit(0)
os.close(write)
data = b""
while chunk := os.read(read, 65536):
    data += chunk
os.waitpid(pid, 0)
out.append(json.loads(data))
print(json.dumps(out))
"""

# Inside the session, as root: opens a connection to the broker's Unix socket and runs the
# setuid copy (argv[1]) with it.
SETUID_DRIVER = r"""
import os, socket, subprocess, sys
su_python, steps, globex = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["OUTLOOP_SOCKET"])
fd = s.fileno()
os.set_inheritable(fd, True)
sys.exit(subprocess.run([su_python, "-I", "-S", "-c", steps, str(fd), globex], pass_fds=[fd]).returncode)
"""


def setuid_copy(program: str, folder: Path, uid: int) -> Path:
    """A copy of `program` owned by `uid` with the setuid bit (needs root)."""
    copy = folder / Path(program).name
    shutil.copy2(program, copy)
    os.chown(copy, uid, -1)
    os.chmod(copy, 0o4755)
    return copy


def test_a_setuid_program_in_a_session_is_another_users_and_the_session_stays_with_the_tree(
    world: World, served: BrokerThread, tmp_path: Path
) -> None:
    """A process of the session whose real, effective or saved uid is another user's is refused
    as that user's peer (on the Unix socket and on TCP, with a token or not); once every uid is
    the operator's again, it and its children are the session's, wherever they cd."""
    import pwd

    if os.getuid() != 0:
        pytest.skip("a program setuid to another user needs root to make (CI runs as root)")
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3 to copy")
    nobody = pwd.getpwnam("nobody").pw_uid
    folder = tmp_path / "setuid"
    folder.mkdir()
    su_python = setuid_copy(os.path.realpath(system_python), folder, nobody)
    probe = subprocess.run([su_python, "-I", "-S", "-c", "import os; print(os.geteuid())"], capture_output=True)
    if probe.stdout.strip() != str(nobody).encode():
        pytest.skip(f"the setuid bit has no effect here (a nosuid mount?): {probe.stdout!r} {probe.stderr!r}")
    ran = run_in_session(world, world.acme, PY, "-c", SETUID_DRIVER, str(su_python), SETUID_STEPS, str(world.globex))
    assert ran.returncode == 0, ran.seen
    steps = {s["step"]: s for s in last_json(ran.stdout)}
    # The uids each step ran with: the program did change its credentials.
    assert steps["inherited-unix"]["uids"] == [0, nobody, nobody]
    assert steps["tcp-token"]["uids"] == [0, nobody, nobody]
    assert steps["tcp-real-nobody"]["uids"] == [nobody, 0, 0]
    assert steps["child-back-to-root"]["uids"] == [0, 0, 0]
    for name in ("inherited-unix", "tcp-token", "tcp-real-nobody"):
        step = steps[name]
        assert (step["status"], step["code"]) == (403, "wrong_tenant"), step
        assert "OS user" in step["message"], step
    back = steps["child-back-to-root"]
    assert (back["status"], back["owned_by"]) == (200, "[REDACTED:openai]"), back
    # Only the last call reached the upstream, with acme's key: the session, not globex's folder.
    (models,) = world.upstream.records
    assert models.header("Authorization") == f"Bearer {world.keys[('acme', 'openai')]}"
    assert_no_token_upstream(world)
    attempts = [r for r in world.audit() if r.get("event") == "attempt"]
    assert [r["decision"] for r in attempts] == ["wrong_tenant"] * 3 + ["allow"]
    assert (attempts[-1]["identity"], attempts[-1]["tenant"]) == ("session", "acme")
    assert attempts[-1]["session"] and served.call(served.engine.sessions.live) == []
