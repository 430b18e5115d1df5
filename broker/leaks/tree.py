"""Walking a workspace: the folders never entered, and the walk itself.

A folder is never entered (so never scanned nor watched) when its name is in
SKIP_DIRS, when the tenant's `scan_ignore` patterns match it, or when git would
ignore it. Git's rules are read the way git reads them: the `.gitignore` in
every folder, each file's patterns relative to the folder holding it, a deeper
file overriding a shallower one and the last matching line of a file winning,
`!` re-including, a trailing `/` for folders only, `$GIT_DIR/info/exclude`
below every `.gitignore` of its repository, a nested repository (a folder
holding `.git`) starting afresh, and, for a workspace inside a repository, the
`.gitignore` files above it up to the repository's root. The patterns
themselves are compiled by pathspec's gitignore implementation (see Rules).

Only folders are skipped: a git-ignored file (`.env`, almost always) is still
read. The workspace folder itself is always entered, even when a repository
above it ignores it: the operator mapped it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pathspec.pattern import Pattern
from pathspec.util import lookup_pattern

# Dependency, build, cache and VCS folders: large, machine-written, and not where
# a person pastes a key. (`env/` is not here: it often holds real env files.)
SKIP_DIRS: frozenset[str] = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".jj",
        "node_modules",
        "bower_components",
        "jspm_packages",
        ".venv",
        "venv",
        "virtualenv",
        ".virtualenvs",
        "site-packages",
        "__pycache__",
        ".eggs",
        "dist",
        "build",
        "target",
        "out",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".hypothesis",
        ".cache",
        ".gradle",
        ".m2",
        ".cargo",
        "vendor",
        ".bundle",
        ".next",
        ".nuxt",
        ".svelte-kit",
        ".parcel-cache",
        ".turbo",
        ".vercel",
        ".yarn",
        ".pnpm-store",
        ".terraform",
        ".terragrunt-cache",
        ".serverless",
        ".direnv",
        "Pods",
        "DerivedData",
        "coverage",
        "htmlcov",
        ".nyc_output",
        ".dart_tool",
        ".pub-cache",
        ".stack-work",
        "_build",
        "deps",
        "elm-stuff",
        ".angular",
        ".expo",
        ".docusaurus",
    }
)

GITIGNORE = ".gitignore"
_MAX_IGNORE_BYTES = 256 * 1024  # a .gitignore larger than this is read this far
_GitPattern: Callable[[str], Pattern] = lookup_pattern("gitignore")


def is_skipped_dir(name: str) -> bool:
    """True for a folder name the scanner and the watcher never enter."""
    return name in SKIP_DIRS


_SELF, _ANY, _INSIDE = 0, 1, 2  # how a pattern's regex is applied to a folder (see Rules)


class Rules:
    """gitignore lines, compiled by pathspec, applied to folders the way git applies them.

    pathspec's regexes answer "is this path or a folder above it matched", which is
    what it needs for files. A walk that never enters an ignored folder asks about
    each folder on its own, so a line decides only when it matches that folder
    itself (`keepme/` re-includes keepme, not what keepme holds): the regex must
    match the whole relative path; `x/**` matches what is inside x, not x; `*`,
    `**` and `*/` (regexes pathspec shortens to `.` or `/`) match every folder.
    The last matching line wins.
    """

    __slots__ = ("_last_first",)

    def __init__(self, patterns: Iterable[tuple[re.Pattern[str], bool, int]]) -> None:
        self._last_first = tuple(reversed(list(patterns)))

    def __len__(self) -> int:
        return len(self._last_first)

    def verdict(self, rel: str) -> bool | None:
        """True (ignored), False (re-included by a `!` line) or None (no line matches) for
        the folder at `rel`, relative to the rules' folder and ending in a slash."""
        for regex, ignores, how in self._last_first:
            if how == _SELF:
                hit = regex.fullmatch(rel) is not None
            elif how == _ANY:
                hit = True
            else:
                found = regex.match(rel)
                hit = found is not None and found.end() < len(rel)
            if hit:
                return ignores
        return None


def compile_patterns(lines: Iterable[str]) -> Rules | None:
    """gitignore lines as Rules (None when no line is a pattern).

    A line git would reject is dropped on its own, never the whole file; a lone
    `/` matches nothing in git (pathspec would take it for everything).
    """
    compiled: list[tuple[re.Pattern[str], bool, int]] = []
    for line in lines:
        text = line.strip()
        if text in ("/", "!/"):
            continue
        try:
            pattern = _GitPattern(line)
        except ValueError:
            continue
        regex = getattr(pattern, "regex", None)
        if pattern.include is None or not isinstance(regex, re.Pattern):
            continue
        if regex.pattern in (".", "/"):
            how = _ANY
        elif text.endswith("/**"):
            how = _INSIDE
        else:
            how = _SELF
        compiled.append((regex, pattern.include, how))
    return Rules(compiled) if compiled else None


def _read_patterns(path: str) -> Rules | None:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_IGNORE_BYTES)
    except OSError:  # none there (the usual case), or unreadable: no rules from it
        return None
    return compile_patterns(data.decode("utf-8", "replace").splitlines())


@dataclass(frozen=True, slots=True)
class _Level:
    """One file of rules (a `.gitignore` or `info/exclude`) and the ones it overrides."""

    prefix: str  # the folder the patterns are relative to, with a trailing slash
    rules: Rules
    up: _Level | None


def _ignored(level: _Level | None, path: str) -> bool:
    """Whether git's rules in `level` ignore the folder at `path` (absolute)."""
    while level is not None:
        if path.startswith(level.prefix):
            verdict = level.rules.verdict(path[len(level.prefix) :] + "/")
            if verdict is not None:  # the deepest file with a matching line decides
                return verdict
        level = level.up
    return False


def _with_own_rules(level: _Level | None, folder: str, gitignore: bool, git: str | None) -> _Level | None:
    """The rules that apply inside `folder`: `level` (its parent's), restarted when it is
    a repository's root (`git` is "dir" or "file" for a `.git` there), then its own
    `.gitignore` when it has one."""
    prefix = folder.rstrip("/") + "/"
    if git is not None:
        level = None  # a repository of its own: the outer one's rules do not reach in
        if git == "dir":
            spec = _read_patterns(os.path.join(folder, ".git", "info", "exclude"))
            if spec is not None:
                level = _Level(prefix, spec, None)
    if gitignore:
        spec = _read_patterns(os.path.join(folder, GITIGNORE))
        if spec is not None:
            level = _Level(prefix, spec, level)
    return level


def _git_kind(folder: str) -> str | None:
    path = os.path.join(folder, ".git")
    try:
        return "dir" if os.path.isdir(path) else ("file" if os.path.lexists(path) else None)
    except OSError:
        return None


class FolderIgnore:
    """Which folders of the workspace at `root` are never entered (so never scanned nor
    watched): SKIP_DIRS by name, `extra` (the tenant's `scan_ignore`: gitignore lines
    relative to the workspace), and git's rules (see the module's docstring) unless
    `gitignore` is False.

    The rules found inside each folder are remembered as the walk reads them, so the
    watcher can judge a folder that appears later without reading them again. Two
    FolderIgnores are equal when built from the same root, `extra` and settings
    (what the `.gitignore` files say is the walk's business).
    """

    __slots__ = ("root", "_prefix", "names", "gitignore", "_extra_lines", "_extra", "_levels")

    def __init__(
        self,
        root: Path | str,
        extra: Iterable[str] = (),
        *,
        gitignore: bool = True,
        names: frozenset[str] = SKIP_DIRS,
    ) -> None:
        self.root = str(root).rstrip("/") or "/"
        self._prefix = self.root.rstrip("/") + "/"
        self.names = names
        self.gitignore = gitignore
        self._extra_lines = tuple(extra)
        self._extra = compile_patterns(self._extra_lines)
        self._levels: dict[str, _Level | None] = {}  # folder -> the git rules that apply inside it

    @classmethod
    def for_workspace(cls, root: Path, extra: Iterable[str] = ()) -> FolderIgnore:
        """The skip rules for the workspace at `root`: SKIP_DIRS, git's rules, then `extra`."""
        return cls(root, extra)

    @classmethod
    def names_only(cls) -> FolderIgnore:
        """SKIP_DIRS and nothing else (no file is read)."""
        return cls("/", gitignore=False)

    def _key(self) -> tuple[str, tuple[str, ...], bool, frozenset[str]]:
        return (self.root, self._extra_lines, self.gitignore, self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FolderIgnore) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"FolderIgnore({self.root!r}, {len(self._extra_lines)} extra patterns)"

    # --- the rules that apply inside a folder --------------------------------------------

    def rules_in(self, folder: str) -> _Level | None:
        """The git rules that apply to what `folder` holds (its own `.gitignore` included)."""
        folder = folder.rstrip("/") or "/"
        if not self.gitignore:
            return None
        if folder in self._levels:
            return self._levels[folder]
        if folder == self.root:
            level = self._top()
        elif folder.startswith(self._prefix):
            parent = os.path.dirname(folder)
            level = _with_own_rules(self.rules_in(parent), folder, True, _git_kind(folder))
        else:
            return None  # outside the workspace: only names and nothing of git's
        self._levels[folder] = level
        return level

    def entered(self, folder: str, parent: _Level | None, has_gitignore: bool, git: str | None) -> _Level | None:
        """Note the rules inside `folder`, which the walk has just listed (so it knows whether
        a `.gitignore` or `.git` is there), given its parent's rules."""
        if not self.gitignore:
            return None
        level = _with_own_rules(parent, folder, has_gitignore, git)
        self._levels[folder] = level
        return level

    def forget(self, folder: str) -> None:
        """Drop what was read at and below `folder` (a `.gitignore` there changed)."""
        below = folder.rstrip("/") + "/"
        for known in [k for k in self._levels if k == folder or k.startswith(below)]:
            del self._levels[known]

    def _top(self) -> _Level | None:
        """The rules inside the workspace folder: those of its repository's folders above it
        (when it lies inside one), then its own."""
        way = [self.root]  # the workspace up to its repository's root
        while _git_kind(way[-1]) is None:
            parent = os.path.dirname(way[-1])
            if parent == way[-1]:  # no repository holds the workspace: only its own rules
                return _with_own_rules(None, self.root, True, None)
            way.append(parent)
        level: _Level | None = None
        for folder in reversed(way):
            if level is not None and _ignored(level, folder):
                level = None  # the repository ignores the way to the workspace: start afresh there
            level = _with_own_rules(level, folder, True, _git_kind(folder))
        return level

    # --- judging a folder ------------------------------------------------------------------

    def skips(self, path: str, name: str) -> bool:
        """True when the folder at `path` (named `name`) is never entered."""
        if name in self.names:
            return True
        return self.skips_below(self.rules_in(os.path.dirname(path)), path, name)

    def skips_below(self, parent: _Level | None, path: str, name: str) -> bool:
        """`skips`, given the rules of the folder holding `path` (the walk has them)."""
        if name in self.names:
            return True
        if self._extra is not None and path.startswith(self._prefix):
            if self._extra.verdict(path[len(self._prefix) :] + "/"):
                return True
        return _ignored(parent, path)


def walk(
    root: Path,
    ignore: FolderIgnore | None = None,
    on_error: Callable[[OSError], None] | None = None,
) -> tuple[list[Path], list[Path]]:
    """(files, folders) under `root`, `root` itself among the folders, skipping what
    `ignore` skips (SKIP_DIRS only by default). Symlinked folders are not followed."""
    files: list[Path] = []
    folders: list[Path] = []
    skip = ignore or FolderIgnore.names_only()
    try:
        if not root.is_dir():
            if root.exists() or root.is_symlink():
                files.append(root)
            return files, folders
    except OSError as exc:
        if on_error:
            on_error(exc)
        return files, folders
    top = str(root)
    stack: list[tuple[str, _Level | None]] = [(top, None)]
    while stack:
        folder, parent = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            if on_error:
                on_error(exc)
            continue
        folders.append(Path(folder))
        subfolders: list[os.DirEntry[str]] = []
        has_gitignore = False
        git: str | None = None
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name == ".git":
                        git = "dir"
                    subfolders.append(entry)
                elif entry.is_file() or entry.is_symlink():
                    files.append(Path(entry.path))
                    if entry.name == GITIGNORE:
                        has_gitignore = True
                    elif entry.name == ".git":
                        git = "file"
            except OSError as exc:
                if on_error:
                    on_error(exc)
        if folder == top:
            rules = skip.rules_in(folder)
        else:
            rules = skip.entered(folder, parent, has_gitignore, git)
        for entry in subfolders:
            if not skip.skips_below(rules, entry.path, entry.name):
                stack.append((entry.path, rules))
    return files, folders


def iter_files(
    root: Path, on_error: Callable[[OSError], None] | None = None, ignore: FolderIgnore | None = None
) -> Iterator[Path]:
    """Every file under `root` (or `root` itself), skipping SKIP_DIRS (or what
    `ignore` skips).

    Symlinked folders are not followed, so a link loop cannot trap the walk;
    symlinked files are yielded (a `.env` linked from a shared folder is still
    a leak into this workspace).
    """
    yield from walk(root, ignore, on_error)[0]
