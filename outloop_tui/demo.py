"""`outloop demo`: the dashboard on a throw-away home, with everything alive.

Builds, in a temporary folder that is removed on exit:
- an OUTLOOP_HOME with two tenants (Acme Corp and Globex) and their workspaces;
- an in-memory keyring, for this process only (the user's keyring is never touched);
- a small HTTP API on loopback standing in for GitHub and Stripe;
- a planted `.env` leak, and later a managed secret pasted into the wrong client's folder;
- a scripted agent: real `outloop call` processes started in the workspace folders,
  making allowed, ask, denied, wrong-tenant and unmapped calls through the real socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import keyring
from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError

from broker.config import ConfigEditor
from broker.paths import Paths
from broker.secrets import Secret, SecretStore


class MemoryKeyring(KeyringBackend):
    """A keyring that lives and dies with the demo process."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # keyring's base class is untyped
        self._items: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self._items.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self._items[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self._items.pop((service, username), None) is None:
            raise PasswordDeleteError(username)


# -- the upstream API ------------------------------------------------------------


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # the demo's screen is the TUI
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        auth = self.headers.get("Authorization", "")
        # Echo the credential back, as a chatty API might: the broker redacts it.
        body = json.dumps({"ok": True, "method": self.command, "path": self.path, "you_sent": auth}).encode()
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer


class Upstream:
    """A tiny JSON API on 127.0.0.1, in a thread."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _UpstreamHandler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-upstream", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Upstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- the world -------------------------------------------------------------------


@dataclass
class DemoWorld:
    root: Path
    paths: Paths
    workspaces: dict[str, Path]  # "acme-web", "acme-api", "globex-shop"
    secrets: dict[str, Secret] = field(default_factory=dict)


def fake_key(prefix: str, length: int) -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length))


def build_world(root: Path, upstream_url: str, store: SecretStore | None = None) -> DemoWorld:
    """Two tenants, three workspaces, two credentials and a planted `.env` leak under `root`."""
    home = root / "home"
    paths = Paths(home / "config.toml", home / "state", root / "s.sock")
    ws = {
        "acme-web": root / "clients" / "acme" / "web",
        "acme-api": root / "clients" / "acme" / "api",
        "globex-shop": root / "clients" / "globex" / "shop",
    }
    for folder in ws.values():
        folder.mkdir(parents=True, exist_ok=True)
    (root / "scratch").mkdir(exist_ok=True)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths.config_file.write_text("[broker]\napproval_timeout = 90\nalways_ttl = 600\n")
    editor = ConfigEditor(paths)
    editor.add_tenant("acme", "Acme Corp")
    editor.add_workspace("acme", str(ws["acme-web"]))
    editor.add_workspace("acme", str(ws["acme-api"]))
    editor.add_credential(
        "acme",
        "github",
        {
            "base_url": f"{upstream_url}/github",
            "auth": "bearer",
            "allow": ["GET /repos/**"],
            "ask": ["POST /repos/*/*/issues"],
            "deny": ["DELETE /**"],
        },
    )
    editor.add_tenant("globex", "Globex")
    editor.add_workspace("globex", str(ws["globex-shop"]))
    editor.add_credential(
        "globex",
        "stripe",
        {
            "base_url": f"{upstream_url}/stripe",
            "auth": "bearer",
            "allow": ["GET /v1/**"],
            "ask": ["POST /v1/refunds"],
            "deny": ["POST /v1/payouts"],
        },
    )
    editor.save()
    store = store or SecretStore()
    world = DemoWorld(root, paths, ws)
    world.secrets = {"github": Secret(fake_key("ghp_", 36)), "stripe": Secret(fake_key("sk_live_", 24))}
    store.set("acme", "github", world.secrets["github"])
    store.set("globex", "stripe", world.secrets["stripe"])
    # The leak every agency has: a key pasted into a client's .env.
    (ws["acme-web"] / ".env").write_text(
        "NODE_ENV=development\nPORT=3000\n"
        f"OPENAI_API_KEY={fake_key('sk-proj-', 48)}\n"
        "DATABASE_URL=postgres://localhost/acme\n"
    )
    return world


# -- the scripted agent ----------------------------------------------------------

# (workspace, credential, method, path, extra outloop-call arguments)
SCRIPT: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("acme-web", "github", "GET", "/repos/acme/web", ()),
    (
        "acme-api",
        "github",
        "POST",
        "/repos/acme/api/issues",
        ("--json", '{"title": "Flaky test in CI"}', "--reason", "file the failing test as an issue"),
    ),
    ("acme-web", "github", "GET", "/repos/acme/web/pulls", ()),
    ("globex-shop", "stripe", "GET", "/v1/charges", ("-q", "limit=3")),
    ("acme-web", "github", "DELETE", "/repos/acme/web", ("--reason", "clean up the old repo")),
    ("globex-shop", "github", "GET", "/repos/acme/web", ("--reason", "look at Acme's code")),
    (
        "globex-shop",
        "stripe",
        "POST",
        "/v1/refunds",
        ("--json", '{"charge": "ch_1042"}', "--reason", "refund order 1042"),
    ),
    ("scratch", "github", "GET", "/user", ()),
    ("acme-api", "github", "GET", "/repos/acme/api/actions/runs", ()),
)
MAX_WAITING = 2  # ask calls the agent leaves waiting at once


class ScriptedAgent:
    """Runs SCRIPT forever, one `outloop call` process per step, from the workspace folders."""

    def __init__(self, world: DemoWorld, pause: float = 2.5) -> None:
        self.world = world
        self.pause = pause
        self.procs: set[asyncio.subprocess.Process] = set()
        self.waiting = 0

    def folder(self, name: str) -> Path:
        return self.world.root / "scratch" if name == "scratch" else self.world.workspaces[name]

    async def run(self) -> None:
        step = 0
        while True:
            ws, cred, method, path, extra = SCRIPT[step % len(SCRIPT)]
            step += 1
            asks = method == "POST"
            if asks and self.waiting >= MAX_WAITING:
                continue
            await self.call(ws, cred, method, path, extra, asks)
            if step == len(SCRIPT) + 3:
                self.paste_secret()
            await asyncio.sleep(self.pause)

    async def call(self, ws: str, cred: str, method: str, path: str, extra: tuple[str, ...], asks: bool) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "outloop_tui.cli",
            "call",
            cred,
            method,
            path,
            *extra,
            cwd=self.folder(ws),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.procs.add(proc)
        if asks:
            self.waiting += 1
        asyncio.get_running_loop().create_task(self._reap(proc, asks))

    async def _reap(self, proc: asyncio.subprocess.Process, asks: bool) -> None:
        try:
            await proc.wait()
        finally:
            self.procs.discard(proc)
            if asks:
                self.waiting -= 1

    def paste_secret(self) -> None:
        """The agent copies Acme's GitHub token into Globex's folder: a cross-tenant leak."""
        token = self.world.secrets["github"].reveal()
        (self.world.workspaces["globex-shop"] / "debug.log").write_text(f"retrying with token {token}\n")

    def stop(self) -> None:
        for proc in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


# -- the app -----------------------------------------------------------------------


def make_demo_app(world: DemoWorld, *, agent: bool = True, **kwargs: Any) -> Any:
    from textual import work

    from broker.engine import Engine
    from outloop_tui.app import OutloopApp

    class DemoApp(OutloopApp):
        TITLE = "Outloop demo"

        def __init__(self) -> None:
            super().__init__(Engine(world.paths), **kwargs)
            self.agent = ScriptedAgent(world) if agent else None

        def on_mount(self) -> None:
            # Textual runs OutloopApp.on_mount too (handlers run along the MRO).
            self.set_banner(
                "demo",
                f"Demo: a throw-away home in {world.root}, removed on exit. "
                "A scripted agent is calling; answer its asks with y / n / a.",
            )
            if self.agent is not None:
                self.run_agent()

        @work(group="demo-agent", exit_on_error=False, name="demo-agent")
        async def run_agent(self) -> None:
            await self.ready.wait()
            if self.agent is not None and self.started:
                await self.agent.run()

        async def stop_engine(self) -> None:
            if self.agent is not None:
                self.agent.stop()
            await super().stop_engine()

    return DemoApp()


@contextlib.contextmanager
def demo_world() -> Iterator[tuple[DemoWorld, Upstream]]:
    """The demo's world in a temp folder, with its keyring and upstream; all gone afterwards."""
    # mkdtemp makes a private (0700) folder with a random name. /tmp rather than $TMPDIR:
    # macOS's per-user TMPDIR is long enough to push the socket past the 104-byte limit.
    short = "/tmp" if os.path.isdir("/tmp") else None  # noqa: S108
    root = Path(tempfile.mkdtemp(prefix="outloop-demo-", dir=short))
    previous = keyring.get_keyring()
    keyring.set_keyring(MemoryKeyring())
    upstream = Upstream().start()
    saved = {k: os.environ.get(k) for k in ("OUTLOOP_HOME", "OUTLOOP_SOCKET")}
    try:
        world = build_world(root.resolve(), upstream.url)
        os.environ["OUTLOOP_HOME"] = str(world.paths.home)
        os.environ["OUTLOOP_SOCKET"] = str(world.paths.socket)
        yield world, upstream
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        upstream.stop()
        keyring.set_keyring(previous)
        shutil.rmtree(root, ignore_errors=True)


def run_demo(args: argparse.Namespace) -> int:
    with demo_world() as (world, _upstream):
        app = make_demo_app(world)
        app.run()
    return 0
