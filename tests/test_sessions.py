"""Agent sessions (DESIGN §10): `outloop run`, the identity order, loopback TCP, the SDKs.

Real processes and real sockets throughout: the broker serves on the test's Unix
socket and on 127.0.0.1 (an ephemeral port); `outloop run` is the console script;
the escapes are real shells, forks and `setsid`s; /proc is the kernel's.
"""

from __future__ import annotations

import contextlib
import json
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
    pytest.importorskip("openai")
    pytest.importorskip("anthropic")
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
