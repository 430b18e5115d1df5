"""Test session setup: a private, real keyring and an isolated Outloop home per test.

When dbus-daemon and gnome-keyring-daemon exist, the session starts its own D-Bus
bus and an unlocked gnome-keyring-daemon (a real Secret Service) whose files live
under a fresh temporary XDG_DATA_HOME, so the developer's own keyring is never
opened. Otherwise it falls back to a file keyring in a temporary folder
(tests/support/isolated_keyring.py). The pytest header says which one ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# tests/support is a package (pytest puts tests/ on sys.path); its asserts read better rewritten.
pytest.register_assert_rewrite("support")
# Shared broker fixtures (two tenants, a real upstream, a running engine).
pytest_plugins = ("support.fixtures",)

_session: dict[str, object] = {}


def _start_secret_service(root: Path) -> str:
    """Start a private bus and gnome-keyring-daemon; return a description."""
    root.mkdir(mode=0o700)
    for sub in ("data", "runtime", "config"):
        (root / sub).mkdir(mode=0o700)
    os.environ["XDG_DATA_HOME"] = str(root / "data")
    os.environ["XDG_RUNTIME_DIR"] = str(root / "runtime")
    os.environ["XDG_CONFIG_HOME"] = str(root / "config")
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert bus.stdout is not None
    address = bus.stdout.readline().strip()
    if not address:
        bus.kill()
        raise RuntimeError("dbus-daemon printed no address")
    os.environ["DBUS_SESSION_BUS_ADDRESS"] = address
    daemon = subprocess.Popen(
        ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert daemon.stdin is not None
    daemon.stdin.write(b"test-session-password")
    daemon.stdin.close()
    _session["procs"] = [daemon, bus]
    os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.SecretService.Keyring"

    import keyring
    import keyring.backends.SecretService

    backend = keyring.backends.SecretService.Keyring()
    deadline = time.monotonic() + 10
    while True:
        try:
            backend.set_password("outloop-test-probe", "probe", "x")
            backend.delete_password("outloop-test-probe", "probe")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    keyring.set_keyring(backend)
    return "SecretService.Keyring (private dbus-daemon + gnome-keyring-daemon)"


def _start_file_keyring(root: Path) -> str:
    os.environ["OUTLOOP_TEST_KEYRING_DIR"] = str(root / "keyring")
    os.environ["PYTHON_KEYRING_BACKEND"] = "support.isolated_keyring.IsolatedKeyring"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    import keyring
    from support.isolated_keyring import IsolatedKeyring

    keyring.set_keyring(IsolatedKeyring())
    return "isolated file keyring in a temp folder (dbus-daemon/gnome-keyring-daemon not found)"


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # pragma: no cover - xdist workers inherit env
        return
    root = Path(tempfile.mkdtemp(prefix="outloop-keyring-"))
    _session["root"] = root
    # Child processes (the CLI under test) find the same keyring through the environment.
    if shutil.which("dbus-daemon") and shutil.which("gnome-keyring-daemon"):
        # A loaded machine now and then gets a daemon that never creates its login
        # collection ("Prompt dismissed"): start a fresh bus and daemon, a few times.
        for attempt in range(3):
            try:
                _session["backend"] = _start_secret_service(root / f"try{attempt}")
                break
            except Exception:
                for proc in _session.pop("procs", []):  # type: ignore[attr-defined]
                    proc.kill()
                if attempt == 2:
                    raise
    else:
        _session["backend"] = _start_file_keyring(root)


def pytest_unconfigure(config: pytest.Config) -> None:
    for proc in _session.get("procs", []):  # type: ignore[attr-defined]
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    root = _session.get("root")
    if isinstance(root, Path):
        shutil.rmtree(root, ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> str:
    return f"keyring: {_session.get('backend', 'not started')}"


def _clear_outloop_secrets() -> None:
    import keyring

    backend = keyring.get_keyring()
    if type(backend).__name__ == "IsolatedKeyring":
        backend.clear()  # type: ignore[attr-defined]
        return
    import secretstorage

    conn = secretstorage.dbus_init()
    try:
        collection = secretstorage.get_default_collection(conn)
        for item in collection.search_items({"service": "outloop"}):
            item.delete()
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def outloop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own OUTLOOP_HOME, a short socket path and an empty keyring."""
    home = tmp_path / "outloop-home"
    sock_dir = Path(tempfile.mkdtemp(prefix="ol-", dir="/tmp"))
    monkeypatch.setenv("OUTLOOP_HOME", str(home))
    monkeypatch.setenv("OUTLOOP_SOCKET", str(sock_dir / "b.sock"))
    monkeypatch.delenv("OUTLOOP_DEBUG", raising=False)
    yield home
    _clear_outloop_secrets()
    shutil.rmtree(sock_dir, ignore_errors=True)
