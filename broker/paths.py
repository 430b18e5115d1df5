"""Where Outloop keeps its files, and how it writes them safely.

`OUTLOOP_HOME` holds everything when set; otherwise the platform's user folders.
`OUTLOOP_SOCKET` overrides the socket path for broker and clients alike.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP = "outloop"

# sockaddr_un.sun_path, including the terminating NUL.
SOCKET_PATH_LIMIT = 104 if sys.platform == "darwin" else 108


class PathError(Exception):
    """A path Outloop needs is unusable; the message says why and what to do."""


class Paths:
    """The files and folders of one Outloop installation (a plain value; hooks start on it,
    so no dataclass: dataclasses imports inspect, a tenth of a hook's start-up)."""

    __slots__ = ("config_file", "state_dir", "socket")

    def __init__(self, config_file: Path, state_dir: Path, socket: Path) -> None:
        self.config_file = config_file
        self.state_dir = state_dir
        self.socket = socket

    def __repr__(self) -> str:
        return f"Paths(config_file={self.config_file!r}, state_dir={self.state_dir!r}, socket={self.socket!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Paths):
            return NotImplemented
        return (self.config_file, self.state_dir, self.socket) == (other.config_file, other.state_dir, other.socket)

    def __hash__(self) -> int:
        return hash((self.config_file, self.state_dir, self.socket))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Paths:
        """Resolve paths from OUTLOOP_HOME / OUTLOOP_SOCKET, else platformdirs."""
        env = os.environ if environ is None else environ
        home = env.get("OUTLOOP_HOME")
        if home:
            base = Path(home).expanduser().absolute()
            paths = cls(base / "config.toml", base / "state", base / "broker.sock")
        else:
            import warnings

            import platformdirs

            dirs = platformdirs.PlatformDirs(APP, appauthor=False)
            state = Path(dirs.user_state_dir)
            # Without XDG_RUNTIME_DIR platformdirs warns and guesses a shared /tmp path;
            # the private state folder is the better home for the socket then.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    runtime = Path(dirs.user_runtime_dir)
                except Exception:  # some platforms have no runtime dir
                    runtime = state
            if sys.platform.startswith("linux") and not env.get("XDG_RUNTIME_DIR"):
                runtime = state
            paths = cls(Path(dirs.user_config_dir) / "config.toml", state, runtime / "broker.sock")
        override = env.get("OUTLOOP_SOCKET")
        if override:
            paths = cls(paths.config_file, paths.state_dir, Path(override).expanduser().absolute())
        return paths

    @property
    def home(self) -> Path:
        return self.config_file.parent

    @property
    def audit_dir(self) -> Path:
        return self.state_dir / "audit"

    @property
    def alerts_file(self) -> Path:
        return self.state_dir / "alerts.jsonl"

    @property
    def operator_socket(self) -> Path:
        """Where an attached dashboard talks to the broker: in the private state folder, never the workspace."""
        return self.state_dir / "operator.sock"

    def check_socket_path(self) -> None:
        """Raise PathError if the socket path is longer than the OS accepts."""
        if len(os.fsencode(self.socket)) >= SOCKET_PATH_LIMIT:
            raise PathError(
                f"socket path {self.socket} is longer than the {SOCKET_PATH_LIMIT - 1} bytes "
                "this OS allows; set OUTLOOP_SOCKET to a shorter path"
            )


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed; the leaf is made 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file.

    The folder is made private (0700) and the result is 0600.
    """
    ensure_private_dir(path.parent)
    replace_file(path, data, 0o600)


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder.

    Leaves the folder's permissions alone (it may be the user's home or project).
    """
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or create in `path` durable (no-op where unsupported)."""
    try:
        dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
