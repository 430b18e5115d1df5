"""`outloop run --sandbox` (DESIGN §10) under the real bubblewrap, and the operator-only commands.

The world here lives outside /tmp (in /var/tmp, with its own HOME), so that what the
sandbox hides it hides by name (Outloop's folder, the other tenant's workspace, the
keyring's files) and not merely because /tmp is private inside. The keyring is the
test session's real Secret Service (tests/conftest.py); outside the sandbox
`secret-tool` and the keyring module read the key, inside they must not.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fixtures import BIN, OUTLOOP, BrokerThread, Ran, World, make_world, wait_for
from support.upstream import Upstream

from broker import sandbox
from broker.config import ConfigEditor, load_config

PY = sys.executable


def _bwrap_works() -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap (bwrap) is not installed: apt-get install bubblewrap (.ci/run does)")
    ok, why = sandbox.probe()
    if not ok:
        pytest.skip(f"bwrap cannot create namespaces on this machine: {why}")


# Runs inside the sandbox and reports what it could reach, as JSON. argv: the paths to try.
PROBE = r"""
import json, os, socket, sys, urllib.request
from broker.client import request
from broker.paths import Paths
want = json.loads(sys.argv[1])
out = {"pid": os.getpid()}
def readable(p):
    try:
        if os.path.isdir(p):
            return sorted(os.listdir(p))
        with open(p, "rb") as f:
            return f.read(64) != b""
    except OSError as e:
        return "error:" + type(e).__name__
for name in ("config", "state", "globex", "keyrings", "bus"):
    out[name] = readable(want[name])
out["broker_proc_visible"] = os.path.exists(f"/proc/{want['broker_pid']}")
try:
    s = socket.socket(socket.AF_UNIX); s.connect(want["operator"]); out["operator"] = "connected"
except OSError as e:
    out["operator"] = "error:" + type(e).__name__
for name, path in (("workspace", want["workspace_file"]), ("home", want["home_file"])):
    try:
        with open(path, "w") as f:
            f.write("x")
        out["write_" + name] = "ok"
    except OSError as e:
        out["write_" + name] = "error:" + type(e).__name__
sock = Paths.from_env().socket
who = request(sock, "GET", "/v1/whoami", timeout=60)
out["whoami"] = json.loads(who.body)
body = json.dumps({"credential": "api", "method": "GET", "path": "/echo/sandboxed"}).encode()
r = request(sock, "POST", "/v1/request", body=body, timeout=60)
out["call"] = r.status
url = os.environ["OPENAI_BASE_URL"] + "/models"
req = urllib.request.Request(url, headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
with urllib.request.urlopen(req, timeout=60) as resp:
    out["tcp_call"] = resp.status
try:
    import keyring
    out["keyring"] = "got it" if keyring.get_password("outloop", "acme/api") else "nothing"
except Exception as e:
    out["keyring"] = "error:" + type(e).__name__
print(json.dumps(out))
"""


@pytest.fixture
def far(tmp_path: Path, upstream: Upstream, other_host: Upstream, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """The two-tenant world under /var/tmp: HOME, OUTLOOP_HOME, workspaces and a keyring file there."""
    _bwrap_works()
    base = Path(tempfile.mkdtemp(prefix="outloop-sbx-", dir="/var/tmp"))  # noqa: S108 - outside /tmp on purpose
    home = base / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OUTLOOP_HOME", str(home / ".outloop"))
    world = make_world(home, upstream, other_host)
    world.configure(listen="127.0.0.1:0")
    keyrings = home / ".local/share/keyrings"
    keyrings.mkdir(parents=True)
    (keyrings / "login.keyring").write_text("a keyring file")
    (world.globex / "plan.txt").write_text("globex's plans")
    try:
        yield world
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def served(far: World) -> Iterator[BrokerThread]:
    thread = BrokerThread(far.paths).start()
    try:
        yield thread
    finally:
        thread.stop()


def sandboxed(world: World, *command: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Ran:
    ran = world.run([OUTLOOP, "run", "--sandbox", "--", *command], cwd or world.acme, env=env)
    world.assert_clean(ran.seen)
    return ran


def test_a_sandboxed_agent_reaches_the_broker_and_nothing_of_the_keyring_config_or_other_tenants(
    far: World, served: BrokerThread
) -> None:
    home = Path(os.environ["HOME"])
    want = {
        "config": str(far.paths.config_file),
        "state": str(far.paths.state_dir),
        "operator": str(far.paths.operator_socket),
        "globex": str(far.globex),
        "keyrings": str(home / ".local/share/keyrings"),
        "bus": os.environ.get("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent").partition("path=")[2].split(",")[0],
        "broker_pid": os.getpid(),
        "workspace_file": str(far.acme / "written.txt"),
        "home_file": str(home / "written.txt"),
    }
    assert far.paths.operator_socket.exists() and Path(want["bus"]).exists()
    ran = sandboxed(far, PY, "-c", PROBE, json.dumps(want))
    assert ran.returncode == 0, ran.seen
    got = json.loads(ran.stdout.strip().splitlines()[-1])
    # Hidden: Outloop's config and state (and the operator channel in it), the other tenant, the keyring.
    assert got["config"] == "error:FileNotFoundError"
    assert got["state"] in ([], "error:FileNotFoundError") and got["operator"].startswith("error:")
    assert got["globex"] == [] and got["keyrings"] == []
    assert got["bus"] == "error:FileNotFoundError"
    assert got["keyring"] != "got it"
    assert got["broker_proc_visible"] is False  # its own pid namespace: the broker's /proc is out of reach
    # The workspace is writable, the rest of the home is not.
    assert (got["write_workspace"], got["write_home"]) == ("ok", "error:OSError")
    assert (far.acme / "written.txt").exists() and not (home / "written.txt").exists()
    # Calls work, on the socket and on loopback TCP, and are the session's.
    assert got["whoami"]["tenant"] == "acme" and got["whoami"]["identity"] == "session"
    assert (got["call"], got["tcp_call"]) == (200, 200)
    assert [r.path for r in far.upstream.records] == ["/acme/echo/sandboxed", "/v1/models"]
    session = got["whoami"]["session"]
    attempts = [r for r in far.audit() if r.get("event") == "attempt"]
    assert len(attempts) == 2 and {(r["session"], r["identity"], r["tenant"]) for r in attempts} == {
        (session, "session", "acme")
    }
    wait_for(lambda: not served.engine.sessions.live(), what="the session to end with its root")


def test_the_keyring_is_readable_outside_and_not_inside(far: World, served: BrokerThread) -> None:
    if shutil.which("secret-tool") is None:
        pytest.fail("secret-tool is not installed: apt-get install libsecret-tools (.ci/run does)")
    lookup = ["secret-tool", "lookup", "service", "outloop", "username", "acme/api"]
    read = "import keyring, sys; sys.exit(0 if keyring.get_password('outloop', 'acme/api') else 1)"
    # Outside any sandbox, any process of the user reads it: the hole the sandbox closes.
    outside = far.run(lookup, far.acme)
    assert outside.returncode == 0 and outside.stdout.strip() == far.keys[("acme", "api")]
    assert far.run([PY, "-c", read], far.acme).returncode == 0
    inside = sandboxed(far, *lookup)
    assert inside.returncode != 0 and inside.stdout == ""
    assert sandboxed(far, PY, "-c", read).returncode != 0


def test_the_command_is_the_sessions_and_gets_its_signals(far: World, served: BrokerThread) -> None:
    assert sandboxed(far, PY, "-c", "import sys; sys.exit(7)").returncode == 7
    code = (
        "import os, signal, sys, time\n"
        # Ends at once: without a terminal, outloop run passes the ^C on as well, and that copy may
        # arrive late; in Python's shutdown (handlers back at their defaults) it would end us with 130.
        "signal.signal(signal.SIGTERM, lambda *a: os._exit(42))\n"
        "signal.signal(signal.SIGINT, lambda *a: print('int', flush=True))\n"
        "print('up', flush=True)\n"
        "sys.stdin.readline()\n"
        "time.sleep(120)"
    )
    proc = subprocess.Popen(
        [OUTLOOP, "run", "--sandbox", "--", PY, "-c", code],
        cwd=far.acme,
        env=far.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "up"
    # ^C at the terminal reaches the whole process group: the command handles it, the sandbox lives on.
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.stdout.readline().startswith("int")  # (twice, maybe: outloop run passes it on too)
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.terminate()  # SIGTERM to `outloop run`, passed on to the command inside
    assert proc.wait(60) == 42


def test_tiocsti_is_refused_inside(far: World, served: BrokerThread) -> None:
    code = (
        "import fcntl, termios, errno, sys\n"
        "try:\n    fcntl.ioctl(0, termios.TIOCSTI, b'x')\nexcept OSError as e:\n    sys.exit(e.errno)\n"
    )
    # stdin is no terminal here: without the filter this is ENOTTY, with it EPERM.
    assert far.run([PY, "-c", code], far.acme).returncode == errno.ENOTTY
    assert sandboxed(far, PY, "-c", code).returncode == errno.EPERM


def test_without_bwrap_nothing_runs(far: World, served: BrokerThread) -> None:
    marker = far.acme / "ran"
    env = far.env(PATH=str(BIN))  # the venv's python and outloop, no bwrap
    ran = sandboxed(far, PY, "-c", f"open({str(marker)!r}, 'w')", env=env)
    assert ran.returncode == 4 and "bubblewrap" in ran.stderr and "nothing was run" in ran.stderr
    assert not marker.exists()
    assert not [r for r in far.audit() if r.get("event") == "session_open"]  # not even a session


def test_a_bwrap_that_fails_to_start_is_a_clear_error(far: World, served: BrokerThread, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "bwrap").write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    (fake / "bwrap").chmod(0o755)
    marker = far.acme / "ran"
    env = far.env(PATH=f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}")
    ran = sandboxed(far, PY, "-c", f"open({str(marker)!r}, 'w')", env=env)
    assert ran.returncode == 4, ran.seen
    assert "the sandbox could not start (bwrap: No permissions to create new namespace); nothing was run" in ran.stderr
    assert not marker.exists()


def test_a_workspace_the_sandbox_cannot_bind_is_a_clear_error(far: World, served: BrokerThread) -> None:
    marker = far.acme / "ran"
    editor = ConfigEditor(far.paths)
    editor.raw["sandbox"] = {"hide": [str(far.acme.parent)]}
    editor.save()
    ran = sandboxed(far, PY, "-c", f"open({str(marker)!r}, 'w')")
    assert ran.returncode == 4, ran.seen
    assert f"the workspace {far.acme} lies inside {far.acme.parent}, which the sandbox hides" in ran.stderr
    assert not marker.exists()
    # Extra read-write folders must exist.
    editor = ConfigEditor(far.paths)
    editor.raw["sandbox"] = {"read_write": [str(far.root / "no-such-folder")]}
    editor.save()
    ran = sandboxed(far, PY, "-c", f"open({str(marker)!r}, 'w')")
    assert ran.returncode == 4 and "is not a folder" in ran.stderr and not marker.exists()


def test_sandbox_table_adds_writable_and_hidden_paths(far: World, served: BrokerThread) -> None:
    cache, secret = far.root / "cache", far.root / "dot-aws"
    cache.mkdir()
    secret.mkdir()
    (secret / "credentials").write_text("aws keys")
    editor = ConfigEditor(far.paths)
    editor.raw["sandbox"] = {"read_write": [str(cache)], "hide": [str(secret)]}
    editor.save()
    code = f"import os; open({str(cache / 'x')!r}, 'w').write('x'); print(os.listdir({str(secret)!r}))"
    ran = sandboxed(far, PY, "-c", code)
    assert ran.returncode == 0, ran.seen
    assert ran.stdout.strip() == "[]" and (cache / "x").exists()


# -- management commands refuse inside a session ------------------------------------------


def test_policy_commands_refuse_inside_a_session(world: World) -> None:
    thread = BrokerThread(world.paths).start()
    try:
        before = world.paths.config_file.read_bytes()
        for argv in (
            ["workspace", "add", "acme", str(world.unmapped)],
            ["tenant", "add", "evil"],
            ["credential", "edit", "acme", "api", "--allow", "* /**"],
            ["credential", "rm", "acme", "api", "--yes"],
            ["claude", "install", "--dry-run"],
        ):
            ran = world.run([OUTLOOP, "run", "--", OUTLOOP, *argv], world.acme)
            assert ran.returncode == 2, (argv, ran.seen)
            assert "cannot act as the operator" in ran.stderr and "is for the operator" in ran.stderr
        # Without the token in its environment the process tree still says so.
        ran = world.run(
            [OUTLOOP, "run", "--", "env", "-u", "OUTLOOP_SESSION", OUTLOOP, "tenant", "add", "evil"], world.acme
        )
        assert ran.returncode == 2 and "inside tenant 'acme''s session" in ran.stderr, ran.seen
        assert world.paths.config_file.read_bytes() == before
        # The operator, outside every session, is not refused.
        assert world.outloop("tenant", "add", "newco").returncode == 0
        assert "newco" in load_config(world.paths).tenants
    finally:
        thread.stop()


def test_refusals_never_tell_the_agent_to_give_itself_access(world: World) -> None:
    thread = BrokerThread(world.paths).start()
    try:
        ran = world.outloop("call", "api", "GET", "/echo/x", cwd=world.unmapped)
        assert ran.returncode == 2 and "unmapped_workspace" in ran.stderr
        assert "until the operator maps it" in ran.stderr
        assert "outloop workspace add" not in ran.stderr and "; map it with" not in ran.stderr
    finally:
        thread.stop()


# -- the pure parts ---------------------------------------------------------------------


def plan(tmp: Path, **changes: Any) -> sandbox.Plan:
    fields: dict[str, Any] = {
        "workspace": tmp / "ws",
        "cwd": tmp / "ws",
        "socket": tmp / "run/outloop/b.sock",
        "hide_dirs": (tmp / "home/.config/outloop", tmp / "globex", tmp / "ws/.secrets"),
        "hide_files": (tmp / "bus",),
        "read_write": (tmp / "cache",),
        "private": (Path("/private-tmp"),),
    }
    fields.update(changes)
    return sandbox.Plan(**fields)


def test_bwrap_args_bind_the_workspace_then_hide_then_bind_the_socket(tmp_path: Path) -> None:
    p = plan(tmp_path)
    args = sandbox.bwrap_args(p, seccomp_fd=5, status_fd=6)
    assert args[:6] == ["--ro-bind", "/", "/", "--dev", "/dev", "--proc"]
    ws = args.index("--bind")
    assert args[ws : ws + 3] == ["--bind", str(p.workspace), str(p.workspace)]
    hidden = [args[i + 1] for i, a in enumerate(args) if a == "--tmpfs"]
    assert hidden == [
        "/private-tmp",
        str(tmp_path / "home/.config/outloop"),
        str(tmp_path / "globex"),
        str(tmp_path / "ws/.secrets"),
    ]
    # A hidden path inside the workspace is covered after the workspace is bound.
    assert args.index(str(tmp_path / "ws/.secrets")) > ws
    assert ["--ro-bind", "/dev/null", str(tmp_path / "bus")] == args[
        args.index("/dev/null") - 1 : args.index("/dev/null") + 2
    ]
    sock = len(args) - 1 - args[::-1].index("--bind")
    assert args[sock + 1] == str(
        tmp_path / "run/outloop"
    )  # the socket's own folder: a restarted broker stays reachable
    assert sock > max(i for i, a in enumerate(args) if a == "--tmpfs")
    for flag in ("--unshare-pid", "--unshare-ipc", "--die-with-parent"):
        assert flag in args
    assert args[args.index("--cap-drop") + 1] == "ALL"
    assert "--unshare-net" not in args  # agents need their model's API
    assert args[args.index("--seccomp") + 1] == "5" and args[args.index("--json-status-fd") + 1] == "6"
    assert "--new-session" in sandbox.bwrap_args(p, new_session=True) and "--new-session" not in args


def test_the_socket_file_is_bound_alone_when_its_folder_is_hidden(tmp_path: Path) -> None:
    home = tmp_path / "home/.outloop"
    p = plan(tmp_path, socket=home / "broker.sock", hide_dirs=(home,))
    args = sandbox.bwrap_args(p)
    assert args[len(args) - 1 - args[::-1].index("--bind") + 1] == str(home / "broker.sock")


def test_classify_refuses_what_it_cannot_show(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(sandbox.SandboxError, match="root folder"):
        sandbox.classify(workspace=Path("/"), cwd=Path("/"), socket=tmp_path / "s", hide=[])
    with pytest.raises(sandbox.SandboxError, match="lies inside"):
        sandbox.classify(workspace=ws, cwd=ws, socket=tmp_path / "s", hide=[tmp_path])
    p = sandbox.classify(workspace=ws, cwd=ws, socket=tmp_path / "s", hide=[tmp_path / "missing", ws / "x"])
    assert p.hide_dirs == () and p.hide_files == ()  # nothing there, nothing to hide


def test_bus_addresses(tmp_path: Path) -> None:
    assert sandbox.bus_paths("unix:path=/run/user/1000/bus,guid=ab") == [Path("/run/user/1000/bus")]
    assert sandbox.bus_paths(None) == []
    for address in ("unix:abstract=/tmp/dbus-x,guid=1", "tcp:host=localhost,port=1"):
        with pytest.raises(sandbox.SandboxError, match="cannot hide"):
            sandbox.bus_paths(address)


def test_the_tiocsti_filter_is_fourteen_instructions_ending_in_allow_and_eperm() -> None:
    prog = sandbox.tiocsti_filter("x86_64")
    assert prog is not None and len(prog) == 14 * 8
    ops = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    assert ops[-2] == (0x06, 0, 0, 0x7FFF0000) and ops[-1] == (0x06, 0, 0, 0x00050001)
    assert (0x15, 2, 0, 0x5412) in ops  # TIOCSTI -> EPERM
    assert sandbox.tiocsti_filter("sparc") is None


def test_seatbelt_profile_has_the_same_intent(tmp_path: Path) -> None:
    p = plan(tmp_path, hide_dirs=(tmp_path / 'cfg "x"', tmp_path / "globex"))
    text = sandbox.seatbelt_profile(p)
    assert text.startswith("(version 1)\n(allow default)\n")
    assert "(deny file-write*)" in text
    assert f'(subpath "{tmp_path / "ws"}")' in text and f'(subpath "{tmp_path / "cache"}")' in text
    assert f'(subpath "{tmp_path}/cfg \\"x\\"")' in text  # quotes escaped
    assert f'(literal "{tmp_path / "bus"}")' in text
    assert '(global-name "com.apple.securityd")' in text
    assert "(deny network-outbound (remote unix-socket))" in text
    assert f'(path-literal "{tmp_path / "run/outloop/b.sock"}")' in text
    assert "network-outbound (remote ip" not in text  # TCP stays on


def test_doctor_says_whether_sandboxing_works(world: World) -> None:
    ran = world.outloop("doctor", "--json")
    rows = [c for c in json.loads(ran.stdout)["checks"] if c["what"].startswith("sandbox")]
    assert len(rows) == 1
    ok, why = sandbox.probe()
    assert rows[0]["status"] == ("ok" if ok else "note") and why in rows[0]["what"]


def test_what_the_command_needs_stays_visible_under_a_private_tmp(tmp_path: Path) -> None:
    """A venv or a checkout under /tmp (CI's, say) is shown read-only over the empty private /tmp."""
    ws = tmp_path / "ws"
    venv = tmp_path / "venv"
    ws.mkdir()
    venv.mkdir()
    plan = sandbox.classify(
        workspace=ws, cwd=ws, socket=tmp_path / "s", hide=[], private=[tmp_path], keep=[venv, tmp_path / "gone"]
    )
    args = sandbox.bwrap_args(plan)
    private_at = args.index("--tmpfs")
    kept_at = args.index(str(venv)) - 1
    assert args[private_at + 1] == str(tmp_path) and args[kept_at] == "--ro-bind" and kept_at > private_at
    assert plan.keep == (venv.resolve(),)  # a folder that does not exist is left out
