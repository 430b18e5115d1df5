"""Real trees with awkward parts, for the leak walk and watcher tests."""

from __future__ import annotations

import os
from pathlib import Path

PATH_MAX = 4096


def too_long_to_open(parent: Path) -> Path:
    """Make `parent` and, deep below it, a folder its parent lists but whose path is longer than
    PATH_MAX: nothing can open it by name, root included (permissions would not stop root).
    Returns that folder's path."""
    parent.mkdir()
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    name, length, path = "d" * 250, len(str(parent)), parent
    try:
        while length + len(name) + 1 < PATH_MAX:
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, length, path = inner, length + len(name) + 1, path / name
        os.mkdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    return path / name
