"""Shared fixtures for tests that need a real broker: two tenants, a real upstream, callers.

tests/conftest.py loads them as a plugin for every test module.

- `upstream`: a recording, echoing HTTP server on loopback (tests/support/upstream.py), and
  `other_host`: a second one, on another address, that must never be reached.
- `world`: tenants acme and globex with workspace folders under tmp_path, an unmapped
  folder, credentials whose secrets are in the session's real keyring
  (`SecretStore().set`), config.toml written with `ConfigEditor`. `world.agent(...)`,
  `world.outloop(...)` and `world.python(...)` run real subprocesses in a folder.
- `broker`: an `Engine(paths)` serving on the test's socket (serve=True, watch=False)
  in its own event loop on a background thread; `broker.run(coro)` and
  `broker.call(fn, ...)` run things on that loop. Stopped at teardown.
- `running_engine(paths)`: the same engine inside the caller's own event loop
  (`async with running_engine(world.paths) as engine:`), for async tests such as
  Textual's `run_test()`.

Every secret here is a test value; `world.assert_clean(text)` checks that none of
them appears in text, in any encoding the broker must redact.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

import pytest

from broker.audit import iter_records
from broker.config import ConfigEditor
from broker.engine import Engine
from broker.paths import Paths
from broker.secrets import Secret, SecretStore
from support.upstream import Upstream

T = TypeVar("T")

BIN = Path(sys.executable).parent
OUTLOOP = str(BIN / "outloop")

# Test secrets, chosen to differ in every encoding: '/', '+', '=', '"', '\\', '~' and
# non-ASCII letters all encode differently in base64, percent-encoding and JSON.
KEYS: dict[tuple[str, str], str] = {
    ("acme", "api"): 'sk-acme/Zq9+Tr4="Lw~x7Hq2Pk',
    ("acme", "openai"): "sk-proj-acme0penai+K3y/9QzT",
    ("acme", "search"): "acme-search-key/Q+9z==Vb",
    ("acme", "legacy"): "acme-legacy-pässwörd-Zx81",
    ("globex", "api"): "gx-globex+Key/8Wm=Rt5\\Ns3",
    ("globex", "crm"): "crm-globex-0123456789abcdef",
}

# A python agent: runs calls on the broker socket and prints what it got back, as JSON.
# argv[1] is a JSON list of items: {"payload": {...}} posts to /v1/request; or
# {"method", "target", "headers", "body"} sends that request as it is; or {"raw": text}
# sends those bytes (latin-1) on the socket and reads until it closes. argv[2] is the
# number of threads (default 1).
AGENT = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from broker.client import BrokerUnreachable, request
from broker.paths import Paths
sock = Paths.from_env().socket
items = json.loads(sys.argv[1])
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
def raw(data):
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(sock))
    s.sendall(data.encode("latin-1"))
    s.shutdown(socket.SHUT_WR)
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except OSError:
        pass
    s.close()
    text = b"".join(chunks).decode("latin-1")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/1.1 ") else 0
    headers = [tuple(h.split(": ", 1)) for h in lines[1:] if ": " in h]
    return {"status": status, "headers": headers, "body": body}
def one(item):
    if "raw" in item:
        return raw(item["raw"])
    if "payload" in item:
        method, target, body = "POST", "/v1/request", json.dumps(item["payload"]).encode()
        headers = {}
    else:
        method, target = item.get("method", "GET"), item["target"]
        body = item["body"].encode() if item.get("body") is not None else None
        headers = item.get("headers") or {}
    try:
        r = request(sock, method, target, body=body, headers=headers, timeout=120)
    except (BrokerUnreachable, OSError) as e:
        return {"status": 0, "headers": [], "body": type(e).__name__}
    return {"status": r.status, "headers": r.headers, "body": r.body.decode("latin-1")}
with ThreadPoolExecutor(threads) as pool:
    print(json.dumps(list(pool.map(one, items))))
"""


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "a condition") -> T:
    """Poll `predicate` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def secret_forms(secret: str) -> dict[str, str]:
    """Forms of `secret` that must never reach an agent, computed independently of broker/.

    For base64, only the characters that encode the secret's own bytes at each of the
    three alignments (trimmed by 3 at each end, where neighbouring bytes mix in).
    """
    raw = secret.encode("utf-8")
    forms = {
        "plain": secret,
        "pct": quote(secret, safe=""),
        "pct_path": quote(secret),
        "pct_plus": quote_plus(secret),
        "pct_lower": re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(secret, safe="")),
        "json": json.dumps(secret)[1:-1],
        "json_utf8": json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + raw).decode("ascii").rstrip("=")
        inner = enc[3:-3]
        forms[f"b64_{k}"] = inner
        forms[f"b64url_{k}"] = inner.translate(str.maketrans("+/", "-_"))
    # Forms that encode every character, letters and digits too.
    forms["hex"], forms["hex_upper"] = raw.hex(), raw.hex().upper()
    forms["pct_all"] = "".join(f"%{b:02X}" for b in raw)
    forms["pct_all_lower"] = forms["pct_all"].lower()
    units = secret.encode("utf-16-be")
    forms["u_all"] = "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))
    forms["u_all_upper"] = forms["u_all"].upper().replace("\\U", "\\u")
    for k in range(5):  # base32 at each alignment, trimmed by 8 at each end
        inner = base64.b32encode(b"\0" * k + raw).decode("ascii").rstrip("=")[8:-8]
        forms[f"b32_{k}"], forms[f"b32_{k}_lower"] = inner, inner.lower()
    return forms


@dataclass
class Ran:
    """A finished subprocess: exit code and output (text)."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def seen(self) -> str:
        return self.stdout + "\n" + self.stderr


@dataclass
class World:
    """Two tenants, their folders and credentials, a config, a keyring, an upstream."""

    paths: Paths
    root: Path
    acme: Path
    globex: Path
    unmapped: Path
    upstream: Upstream
    other_host: Upstream
    keys: dict[tuple[str, str], str] = field(default_factory=lambda: dict(KEYS), repr=False)

    @property
    def socket(self) -> Path:
        return self.paths.socket

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a subprocess: this test's home, socket and keyring."""
        env = dict(os.environ)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.pop("OUTLOOP_DEBUG", None)
        env.update(extra)
        return env

    def run(
        self,
        argv: list[str],
        cwd: Path,
        *,
        input: str | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> Ran:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            input=input,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            env=env or self.env(),
        )
        return Ran(proc.returncode, proc.stdout, proc.stderr)

    def outloop(self, *args: str, cwd: Path | None = None, input: str | None = None) -> Ran:
        """Run the `outloop` console script in `cwd` (default: the acme workspace)."""
        return self.run([OUTLOOP, *args], cwd or self.acme, input=input)

    def python(self, code: str, *args: str, cwd: Path | None = None) -> Ran:
        return self.run([sys.executable, "-c", code, *args], cwd or self.acme)

    def agent(self, cwd: Path, items: list[dict[str, Any]], threads: int = 1) -> list[dict[str, Any]]:
        """Run the python AGENT in `cwd`; returns one result per item (status, headers, body)."""
        ran = self.python(AGENT, json.dumps(items), str(threads), cwd=cwd)
        assert ran.returncode == 0, ran.stderr
        self.assert_clean(ran.seen)
        results: list[dict[str, Any]] = json.loads(ran.stdout)
        for result in results:
            self.assert_clean_deep(result["headers"])
            self.assert_clean_deep(result["body"])
        return results

    def agent_popen(self, cwd: Path, items: list[dict[str, Any]], threads: int = 1) -> subprocess.Popen[str]:
        """Start the AGENT without waiting (for calls that wait on the operator)."""
        return subprocess.Popen(
            [sys.executable, "-c", AGENT, json.dumps(items), str(threads)],
            cwd=cwd,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def leaks(self, text: str | bytes) -> list[str]:
        """'tenant/credential:form' for every secret form found in `text`."""
        __tracebackhide__ = True  # a failure must not print the text: it holds a secret
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return [
            f"{t}/{c}:{label}"
            for (t, c), secret in self.keys.items()
            for label, form in secret_forms(secret).items()
            if form in text
        ]

    def assert_clean(self, text: str | bytes) -> None:
        """Fail, naming only the credential and the encoding, if `text` holds a secret."""
        __tracebackhide__ = True
        found = self.leaks(text)
        # Never print the text itself: it may hold a secret.
        assert not found, f"secrets leaked: {found}"

    def assert_clean_deep(self, value: Any, depth: int = 0) -> None:
        """assert_clean on `value` and on everything decoded out of it: JSON, nested JSON."""
        __tracebackhide__ = True
        if isinstance(value, dict):
            for k, v in value.items():
                self.assert_clean_deep(k, depth)
                self.assert_clean_deep(v, depth)
        elif isinstance(value, list | tuple):
            for v in value:
                self.assert_clean_deep(v, depth)
        elif isinstance(value, str):
            self.assert_clean(value)
            if depth < 4 and value[:1] in ('"', "{", "["):
                with contextlib.suppress(ValueError):
                    self.assert_clean_deep(json.loads(value), depth + 1)

    def audit(self) -> list[dict[str, Any]]:
        """Every audit record on disk, in chain order."""
        return list(iter_records(self.paths.audit_dir))

    def audit_bytes(self) -> bytes:
        folder = self.paths.audit_dir
        if not folder.exists():
            return b""
        return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())

    def configure(self, **broker_settings: Any) -> None:
        """Set [broker] settings in config.toml (e.g. approval_timeout=0.5)."""
        editor = ConfigEditor(self.paths)
        editor.raw.setdefault("broker", {}).update(broker_settings)
        editor.save()


def credential_tables(up: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The credentials of acme and globex, pointing at the upstream `up`."""
    return {
        "acme": {
            "api": {
                "base_url": f"{up}/acme",
                "auth": "bearer",
                "allow": ["GET /**", "POST /echo/**", "POST /status/**"],
                "ask": ["POST /ask/**"],
                "deny": ["DELETE /**", "GET /admin/**"],
            },
            "openai": {"base_url": f"{up}/v1", "auth": "bearer", "allow": ["GET /models", "POST /chat/completions"]},
            "search": {"base_url": f"{up}/search", "auth": "query:key", "allow": ["GET /**"]},
            "legacy": {"base_url": f"{up}/legacy", "auth": "basic:user", "allow": ["GET /**"]},
        },
        "globex": {
            "api": {
                "base_url": f"{up}/globex",
                "auth": "bearer",
                "allow": ["GET /**", "POST /echo/**"],
                "ask": ["POST /ask/**"],
                "deny": ["DELETE /**"],
            },
            "crm": {"base_url": f"{up}/crm", "auth": "header:X-Api-Key", "allow": ["GET /**"]},
        },
    }


def make_world(tmp_path: Path, upstream: Upstream, other_host: Upstream) -> World:
    """Write config.toml and store the secrets for acme and globex; returns the World."""
    paths = Paths.from_env()
    root = tmp_path / "clients"
    acme, globex, unmapped = root / "acme", root / "globex", tmp_path / "elsewhere"
    for folder in (acme, globex, unmapped):
        folder.mkdir(parents=True)
    editor = ConfigEditor(paths)
    for tid, name, folder in (("acme", "Acme Corp", acme), ("globex", "Globex Inc", globex)):
        editor.add_tenant(tid, name)
        editor.add_workspace(tid, str(folder))
    for tid, creds in credential_tables(upstream.url).items():
        for cname, table in creds.items():
            editor.add_credential(tid, cname, table)
    editor.save()
    store = SecretStore()
    for (tid, cname), value in KEYS.items():
        store.set(tid, cname, Secret(value))
    return World(paths, root, acme.resolve(), globex.resolve(), unmapped.resolve(), upstream, other_host)


class BrokerThread:
    """An Engine serving on its socket, in an event loop on a background thread."""

    def __init__(self, paths: Paths, *, watch: bool = False) -> None:
        """`watch`: also run the leak watcher and Claude Code's transcript watcher."""
        self.paths = paths
        self.watch = watch
        self.engine = Engine(paths)
        self.events: list[object] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="test-broker", daemon=True)
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.engine.subscribe(self.events.append)
        try:
            self.loop.run_until_complete(self.engine.start(serve=True, watch=self.watch))
        except BaseException as e:  # surfaced by start()
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        self.loop.run_forever()

    def start(self) -> BrokerThread:
        self._thread.start()
        self._ready.result(timeout=30)
        return self

    def run(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the broker's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a plain function (e.g. engine.answer) on the broker's loop thread."""

        async def wrapper() -> T:
            return fn(*args, **kwargs)

        result: T = self.run(wrapper())
        return result

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.run(self.engine.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


@contextlib.asynccontextmanager
async def running_engine(paths: Paths, *, serve: bool = True) -> AsyncIterator[Engine]:
    """An Engine started in the running event loop (watch=False), stopped on exit."""
    engine = Engine(paths)
    await engine.start(serve=serve, watch=False)
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


@pytest.fixture
def other_host() -> Iterator[Upstream]:
    """A second upstream on another host, that a redirect points to and nothing may reach."""
    with Upstream("127.0.0.2") as up:
        yield up


@pytest.fixture
def world(tmp_path: Path, upstream: Upstream, other_host: Upstream) -> World:
    return make_world(tmp_path, upstream, other_host)


@pytest.fixture
def broker(world: World) -> Iterator[BrokerThread]:
    thread = BrokerThread(world.paths).start()
    try:
        yield thread
    finally:
        thread.stop()
