"""Claude Code's task outputs: where they live, and reading them as they grow.

A background `Bash` command (`run_in_background`) and a `Monitor` write what they
print to a file of Claude Code's temporary folder (Claude Code 2.1.332, verified
with the real binary):

    <tmp>/claude-<uid>/<project folder>/<session id>/tasks/<task id>.output

`<tmp>` is `CLAUDE_CODE_TMPDIR`, or else the OS's temporary folder (`TMPDIR`,
else `/tmp`); `<project folder>` is named like the transcripts' folder (the
project's path with every non-alphanumeric character replaced by '-'), and the
session id is the transcript's name. No PostToolUse hook sees that output: the
tool's answer only names the file, and Monitor's events reach the model as a
`<task-notification>`. So the transcript watcher follows these files too
(broker/claude/transcripts.py decides whose they are).

An output file can be large and is appended to while the task runs.
`GrowingFiles` reads each one from where it left off, in blocks of at most
`BLOCK` bytes, each scanned with the last `OVERLAP` bytes before it (a key cut
by a block boundary or by a write still in progress is seen whole); an
unfinished last line is scanned now and again once it grows. Memory stays at a
block or two whatever the file's size.

Plain I/O over files, no watching.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# A read of a growing file takes at most this much at a time.
BLOCK = 1 << 20
# Bytes of what came before that each block is scanned with; a multiple of 4, so a
# forced cut inside one long base64 line keeps the next window aligned with it.
OVERLAP = 8192
# An output file with a NUL byte in its first bytes is binary (an image, a core dump): not followed.
BINARY_PROBE = 8192
# Findings remembered per file so that overlapping windows report each one once.
MAX_REPORTED = 4096


def claude_tmp_roots(environ: Mapping[str, str] | None = None, configured: str | None = None) -> list[Path]:
    """Every `<tmp>/claude-<uid>` Claude Code may use: the default `/tmp`, the OS's
    temporary folder (`TMPDIR`), `CLAUDE_CODE_TMPDIR`, and `configured` ([broker]
    claude_code_tmpdir). The broker's environment need not be Claude Code's, so all
    of them are followed."""
    env = os.environ if environ is None else environ
    getuid = getattr(os, "getuid", None)
    if getuid is None:  # no uid, no such folder (Windows)
        return []
    name = f"claude-{getuid()}"
    roots: list[Path] = []
    for base in ("/tmp", env.get("TMPDIR"), env.get("CLAUDE_CODE_TMPDIR"), configured):  # noqa: S108 - Claude Code's default
        if not base:
            continue
        root = (Path(base).expanduser().absolute().resolve(strict=False)) / name
        if root not in roots:
            roots.append(root)
    return roots


def trusted_root(root: Path) -> bool:
    """Whether `root` is a real folder of this user: in a shared /tmp another user
    could have made `claude-<uid>`, or a symlink of that name, before Claude Code did."""
    try:
        st = os.lstat(root)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


@dataclass(frozen=True)
class Window:
    """Text to scan, and the number of the file's line it starts in."""

    text: str
    first_line: int


@dataclass
class _Tail:
    inode: int
    offset: int = 0  # bytes read and not to be read again (up to the last newline, or a forced cut)
    lines: int = 0  # newlines before `offset`
    line_start: int = 0  # where the line `offset` is in starts
    carry: bytes = b""  # the last OVERLAP bytes before `offset` (already scanned)
    binary: bool = False
    reported: set[tuple[str, str]] = field(default_factory=set)


class GrowingFiles:
    """How far each followed file has been read. Not thread-safe; one caller at a time."""

    def __init__(self) -> None:
        self._tails: dict[Path, _Tail] = {}

    def __len__(self) -> int:
        return len(self._tails)

    def skip(self, path: Path) -> None:
        """Start `path` at its end: what was written while nobody watched is for `outloop scan`."""
        fd = _open(path)
        if fd is None:
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                return
            tail = _Tail(st.st_ino)
            while block := os.read(fd, BLOCK):
                nl = block.rfind(b"\n")
                if nl >= 0:
                    tail.line_start = tail.offset + nl + 1
                tail.lines += block.count(b"\n")
                tail.offset += len(block)
            # No carry: what is before the start was never scanned, and a key in it must not
            # be reported as if it had just been written.
            self._tails[path] = tail
        except OSError:
            return
        finally:
            os.close(fd)

    def forget(self, path: Path) -> None:
        self._tails.pop(path, None)

    def windows(self, path: Path) -> Iterator[Window]:
        """The text of `path` not scanned yet, block by block (see the module docstring).

        A file that is new, replaced (another inode) or truncated is read from its
        start; a symlink, a device, a FIFO or another user's file is never opened.
        """
        fd = _open(path)
        if fd is None:
            self._tails.pop(path, None)
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                return
            tail = self._tails.get(path)
            if tail is None or tail.inode != st.st_ino or st.st_size < tail.offset:
                tail = self._tails[path] = _Tail(st.st_ino)
            while not tail.binary:
                os.lseek(fd, tail.offset, os.SEEK_SET)
                block = _read(fd, BLOCK)
                if not block:
                    return
                if tail.offset == 0 and b"\0" in block[:BINARY_PROBE]:
                    tail.binary = True
                    return
                nl = block.rfind(b"\n")
                if nl >= 0:
                    cut = nl + 1
                elif len(block) == BLOCK:
                    # One line longer than a block, taken in pieces that start a multiple of
                    # 4 bytes into the line, so a base64 line decodes from each window's start.
                    cut = len(block) - (tail.offset + len(block) - tail.line_start) % 4
                else:
                    cut = 0  # an unfinished last line: scanned now, read again when it grows
                window = tail.carry + block
                yield Window(window.decode("utf-8", "surrogateescape"), tail.lines - tail.carry.count(b"\n") + 1)
                taken = block[:cut]
                if nl >= 0:
                    tail.line_start = tail.offset + cut
                tail.offset += cut
                tail.lines += taken.count(b"\n")
                tail.carry = (tail.carry + taken)[-OVERLAP:]
                if len(block) < BLOCK:
                    return  # the end of the file
        except OSError:
            return
        finally:
            os.close(fd)

    def first_report(self, path: Path, rule: str, fingerprint: str) -> bool:
        """Whether (rule, fingerprint) is new in `path` (windows overlap; each finding counts once)."""
        tail = self._tails.get(path)
        if tail is None:
            return True
        key = (rule, fingerprint)
        if key in tail.reported:
            return False
        if len(tail.reported) < MAX_REPORTED:
            tail.reported.add(key)
        return True


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def _read(fd: int, size: int) -> bytes:
    """Up to `size` bytes, fewer only at the end of the file."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = os.read(fd, size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)
