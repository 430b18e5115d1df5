"""Which folders the scanner and the watcher enter: SKIP_DIRS, scan_ignore, and git's own rules
(.gitignore files at every level, info/exclude, nested repositories), checked against git itself
on real trees."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.leaks.tree import SKIP_DIRS, FolderIgnore, walk

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, text=True)


def init(repo: Path) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    assert git(repo, "init", "-q").returncode == 0


def tree(root: Path, folders: list[str], files: dict[str, str]) -> None:
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def git_entered(root: Path, repos: list[Path]) -> set[str]:
    """The folders under `root` (relative) that git does not ignore, none inside SKIP_DIRS:
    each folder asked of the innermost repository holding it."""
    every = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        every.extend(Path(dirpath) / d for d in dirnames)
    ignored: set[Path] = set()
    for repo in repos:
        mine = [
            p
            for p in every
            if p.is_relative_to(repo)
            and max((r for r in repos if p.is_relative_to(r)), key=lambda r: len(r.parts)) == repo
        ]
        if not mine:
            continue
        out = git(repo, "check-ignore", "--stdin", stdin="".join(f"{p.relative_to(repo)}\n" for p in mine))
        assert out.returncode in (0, 1), out.stderr
        ignored |= {repo / line for line in out.stdout.splitlines()}

    def kept(p: Path) -> bool:
        return not any(a in ignored for a in (p, *p.parents))

    return {"."} | {str(p.relative_to(root)) for p in every if kept(p)}


def entered(root: Path, ignore: FolderIgnore | None = None) -> set[str]:
    _files, folders = walk(root, ignore or FolderIgnore.for_workspace(root))
    return {str(p.relative_to(root)) for p in folders}


GITIGNORED_TREE_FOLDERS = [
    "generated/deep",
    "tmp",
    "a.egg-info",
    "logs",
    "private-build/x",
    "src/cache",
    "src/local",
    "src/lib/local",
    "src/lib/cache",
    "src/x.tmp",
    "src/important-cache",
    "other/cache",
    "other/local",
    "pkg/a/b",
    "pkg/keepme/inner",
    "docs/tmp/deeper",
    "docs/api",
    "node_modules/x",
    "app/build",
    "nested/gen",
    "nested/tmp",
    "nested/src/gen",
    "data/2024",
    "data/keep",
]
GITIGNORED_TREE_FILES = {
    ".gitignore": "# top\n/generated/\ntmp/\n*.egg-info\nlogs\n!logs\ndata/*\n!data/keep/\n",
    "src/.gitignore": "cache/\n/local/\n!important-cache/\n*.tmp/\n*cache/\n",
    "pkg/.gitignore": "*\n!.gitignore\n!keepme/\n",
    "docs/.gitignore": "!/tmp/\n",
    "nested/.gitignore": "gen/\n",
}


def test_nested_gitignores_match_git_itself(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    init(ws)
    init(ws / "nested")  # a repository of its own: the outer tmp/ does not reach into it
    tree(ws, GITIGNORED_TREE_FOLDERS, GITIGNORED_TREE_FILES)
    (ws / ".git" / "info").mkdir(exist_ok=True)
    (ws / ".git" / "info" / "exclude").write_text("private-build/\n")
    expected = git_entered(ws, [ws, ws / "nested"])
    assert entered(ws) == expected
    # Spelled out, so the test says what git decided:
    for gone in ("generated", "tmp", "a.egg-info", "private-build", "src/cache", "src/local", "src/lib/cache"):
        assert gone not in expected
    for gone in ("src/x.tmp", "pkg/a", "pkg/keepme/inner", "nested/gen", "nested/src/gen", "data/2024"):
        assert gone not in expected
    for kept in ("logs", "src/lib/local", "other/cache", "other/local", "pkg/keepme", "docs/tmp", "docs/tmp/deeper"):
        assert kept in expected
    for kept in ("nested/tmp", "data/keep", "app"):
        assert kept in expected
    assert "src/important-cache" not in expected  # `*cache/` comes after its `!`: the last line wins


def test_env_files_in_gitignored_folders_of_git_ignored_files_are_still_read(tmp_path: Path) -> None:
    init(tmp_path)
    tree(tmp_path, ["app"], {".gitignore": ".env\n*.env\n", "app/.gitignore": "secrets.env\n"})
    (tmp_path / "app" / ".env").write_text("T=1\n")
    (tmp_path / "app" / "secrets.env").write_text("T=1\n")
    files, _ = walk(tmp_path, FolderIgnore.for_workspace(tmp_path))
    assert {p.name for p in files} >= {".env", "secrets.env"}  # only folders are ever skipped


def test_a_workspace_inside_a_repository_takes_the_rules_above_it(tmp_path: Path) -> None:
    repo = tmp_path / "mono"
    init(repo)
    tree(
        repo,
        ["packages/api/gen", "packages/api/src", "packages/api/coverage-x", "ignored-ws/src/gen", "ignored-ws/lib"],
        {
            ".gitignore": "gen/\n/ignored-ws/\n",
            "packages/.gitignore": "coverage-*/\n",
            "ignored-ws/.gitignore": "lib/\n",
        },
    )
    api = repo / "packages" / "api"
    by_git = git_entered(repo, [repo])
    assert {p for p in by_git if p.startswith("packages/api/")} == {"packages/api/src"}
    assert entered(api) == {".", "src"}
    # A workspace its repository ignores is still entered, and its own rules still apply
    # (the repository's rules above it no longer do: git would say everything is ignored).
    assert entered(repo / "ignored-ws") == {".", "src", "src/gen"}


def test_scan_ignore_is_relative_to_the_workspace_and_cannot_be_undone_by_a_gitignore(tmp_path: Path) -> None:
    tree(tmp_path, ["fixtures/big", "src/fixtures", "keep"], {"keep/.gitignore": "!fixtures/\n"})
    ignore = FolderIgnore.for_workspace(tmp_path, ["/fixtures/", "keep"])
    assert entered(tmp_path, ignore) == {".", "src", "src/fixtures"}


def test_skips_judges_a_new_folder_by_the_rules_of_its_parents(tmp_path: Path) -> None:
    init(tmp_path)
    tree(tmp_path, ["src"], {"src/.gitignore": "gen/\n"})
    ignore = FolderIgnore.for_workspace(tmp_path)
    walk(tmp_path, ignore)
    (tmp_path / "src" / "gen").mkdir()
    (tmp_path / "src" / "lib" / "gen").mkdir(parents=True)
    (tmp_path / "gen").mkdir()
    assert ignore.skips(str(tmp_path / "src" / "gen"), "gen")
    assert ignore.skips(str(tmp_path / "src" / "lib" / "gen"), "gen")  # src/lib was never walked
    assert not ignore.skips(str(tmp_path / "gen"), "gen")
    assert ignore.skips(str(tmp_path / "node_modules"), "node_modules")


def test_odd_lines_do_not_skip_everything(tmp_path: Path) -> None:
    tree(tmp_path, ["src/a", "b"], {".gitignore": "/\n!\n\\\n   \n# only comments\n"})
    assert entered(tmp_path) == {".", "src", "src/a", "b"}


def test_without_gitignore_rules_only_names_are_skipped(tmp_path: Path) -> None:
    tree(tmp_path, ["gen", "node_modules/x"], {".gitignore": "gen/\n"})
    assert entered(tmp_path, FolderIgnore.names_only()) == {".", "gen"}
