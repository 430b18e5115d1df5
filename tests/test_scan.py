"""File scanning: classification, skips, managed and cross-tenant matches, no secret output."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from broker.leaks import rules as L
from broker.leaks.scan import (
    ManagedSecrets,
    is_env_like,
    iter_files,
    mask,
    scan_file,
    scan_text,
    scan_tree,
)

GH = "ghp_" + L.fake(L.A62, 36, "scan-gh")
MANAGED = "mk_" + L.fake(L.A62, 40, "scan-managed")  # no provider format: only managed matching


@pytest.mark.parametrize(
    "name,env",
    [
        (".env", True),
        (".env.local", True),
        (".env.production", True),
        ("prod.env", True),
        (".envrc", True),
        ("env", False),
        ("environment.py", False),
        (".envoy.yaml", False),
        ("app.py", False),
    ],
)
def test_env_like(name: str, env: bool):
    assert is_env_like(Path("/w") / name) is env


def test_mask_shows_at_most_four_and_two():
    assert mask(GH) == GH[:4] + "****" + GH[-2:]
    assert mask("abcdefghij") == "ab****"
    assert mask("abc") == "****"


def test_skips_dependency_folders_binaries_and_big_files(tmp_path: Path):
    for folder in ("node_modules/pkg", ".git", ".venv/lib", "__pycache__", "dist", "src"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "leak.js").write_text(f"k = '{GH}'\n")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" + GH.encode())
    (tmp_path / "huge.txt").write_text(f"{GH}\n" + "x" * 5000)
    report = scan_tree(tmp_path, max_bytes=4096)
    assert [str(f.path.relative_to(tmp_path)) for f in report.findings] == ["src/leak.js"]
    assert report.skipped == {"binary": 1, "too_large": 1}


def test_symlink_loops_dangling_links_and_unreadable_files_never_crash(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "loop").symlink_to(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    locked = tmp_path / "a" / "locked"
    locked.mkdir()
    (locked / ".env").write_text(f"T={GH}\n")
    secret_file = tmp_path / "a" / "secret.txt"
    secret_file.write_text(GH)
    locked.chmod(0)
    secret_file.chmod(0)
    try:
        report = scan_tree(tmp_path)
    finally:
        locked.chmod(0o700)
        secret_file.chmod(0o600)
    if os.geteuid() != 0:  # root reads everything
        assert report.skipped.get("unreadable", 0) >= 1
    assert report.skipped.get("missing") == 1


def test_linked_env_file_is_scanned(tmp_path: Path):
    shared = tmp_path / "shared.env"
    shared.write_text(f"GITHUB_TOKEN={GH}\n")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".env").symlink_to(shared)
    assert [f.rule for f in scan_tree(ws).findings] == ["github-ghp"]


def test_env_files_get_every_rule_other_files_only_confident(tmp_path: Path):
    generic = "SESSION_SECRET=" + L.fake(L.A62, 30, "scan-generic") + "\n"
    (tmp_path / ".env.local").write_text(generic)
    (tmp_path / "notes.txt").write_text(generic)
    assert [f.path.name for f in scan_tree(tmp_path).findings] == [".env.local"]
    assert {f.path.name for f in scan_tree(tmp_path, all_files=True).findings} == {".env.local", "notes.txt"}


@pytest.mark.parametrize(
    "encode",
    [
        lambda s: s,
        lambda s: base64.b64encode(s.encode()).decode(),
        lambda s: base64.b64encode(f"user:{s}".encode()).decode(),
        lambda s: quote(s, safe=""),
    ],
    ids=["verbatim", "base64", "base64-basic-auth", "url-encoded"],
)
def test_managed_secret_found_in_any_encoding(encode):
    managed = ManagedSecrets({("acme", "billing"): MANAGED + "/+="})
    text = f"log line\nAuthorization: something {encode(MANAGED + '/+=')} end\n"
    [f] = scan_text(text, Path("/w/acme/app.log"), tenant="acme", managed=managed)
    assert (f.rule, f.severity, f.line) == ("managed-secret:acme/billing", "high", 2)


def test_managed_secret_in_another_tenants_workspace_is_critical():
    managed = ManagedSecrets({("acme", "github"): MANAGED, ("globex", "github"): "x" * 4})
    [f] = scan_text(f"x = '{MANAGED}'", Path("/w/globex/a.py"), tenant="globex", managed=managed)
    assert (f.rule, f.severity, f.tenant) == ("cross-tenant:acme/github", "critical", "globex")


def test_managed_match_wins_over_a_provider_rule_on_the_same_value():
    managed = ManagedSecrets({("acme", "github"): GH})
    [f] = scan_text(f"GITHUB_TOKEN={GH}\n", Path("/w/.env"), tenant="acme", managed=managed)
    assert f.rule == "managed-secret:acme/github"


def test_findings_and_managed_set_never_show_the_secret(tmp_path: Path):
    managed = ManagedSecrets({("acme", "github"): MANAGED})
    (tmp_path / ".env").write_text(f"GITHUB_TOKEN={GH}\nOTHER={MANAGED}\n")
    result = scan_file(tmp_path / ".env", tenant="acme", managed=managed)
    assert len(result.findings) == 2
    dump = repr(result) + repr(managed)
    assert GH not in dump and MANAGED not in dump


def test_fingerprint_is_sha256_of_the_value(tmp_path: Path):
    import hashlib

    (tmp_path / "a.py").write_text(f"TOKEN = '{GH}'\n")
    [f] = scan_tree(tmp_path).findings
    assert f.fingerprint == hashlib.sha256(GH.encode()).hexdigest()


def test_scan_in_forked_workers_reports_what_one_process_does(tmp_path: Path):
    # Enough files for two workers: keys at scattered places (a managed one, which the
    # workers know by inheritance), a binary and a file over the size cap among them.
    managed = ManagedSecrets({("acme", "billing"): MANAGED})
    for i in range(900):
        folder = tmp_path / f"pkg{i % 7}"
        folder.mkdir(exist_ok=True)
        body = f"def f{i}():\n    return {i}\n" * (i % 5 + 1)
        if i % 97 == 0:
            body += f"TOKEN = '{GH}'\n"
        if i % 211 == 0:
            body += f"billing = '{MANAGED}'\n"
        (folder / f"m{i}.py").write_text(body)
    (tmp_path / "blob.bin").write_bytes(b"\0" * 100)
    (tmp_path / "big.txt").write_text("x" * 5000)

    def report(processes: int) -> tuple[object, ...]:
        r = scan_tree(tmp_path, tenant="acme", managed=managed, max_bytes=4096, processes=processes)
        return r.findings, r.files_scanned, r.bytes_scanned, r.skipped, r.scanned_paths

    one, two = report(1), report(2)
    assert two == one
    rules = sorted({f.rule for f in one[0]})  # type: ignore[attr-defined]
    assert rules == ["github-ghp", "managed-secret:acme/billing"]
    assert one[3] == {"binary": 1, "too_large": 1}


def test_iter_files_on_a_single_file(tmp_path: Path):
    (tmp_path / "one.txt").write_text("x")
    assert list(iter_files(tmp_path / "one.txt")) == [tmp_path / "one.txt"]


# --- the command line ------------------------------------------------------------------


def _outloop(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUTLOOP_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "outloop_tui.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.fixture
def leaky(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / ".env").write_text(f"GITHUB_TOKEN={GH}\nDEBUG=1\n")
    (ws / "src" / "clean.py").write_text("print('hello')\n")
    return ws


def test_cli_scan_reports_and_exits_1_without_printing_secrets(leaky: Path, tmp_path: Path):
    human = _outloop("scan", str(leaky), home=tmp_path / "home")
    as_json = _outloop("scan", str(leaky), "--json", home=tmp_path / "home")
    assert human.returncode == 1 and as_json.returncode == 1
    assert "github-ghp" in human.stdout and f"{leaky / '.env'}:1" in human.stdout
    [alert] = json.loads(as_json.stdout)
    assert {k: alert[k] for k in ("path", "line", "rule", "severity", "status")} == {
        "path": str(leaky / ".env"),
        "line": 1,
        "rule": "github-ghp",
        "severity": "critical",
        "status": "open",
    }
    for out in (human.stdout, human.stderr, as_json.stdout, as_json.stderr):
        assert GH not in out and GH[4:-2] not in out


def test_cli_scan_clean_folder_exits_0(tmp_path: Path):
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "a.py").write_text("x = 1\n")
    result = _outloop("scan", str(tmp_path / "clean"), home=tmp_path / "home")
    assert result.returncode == 0 and "no leaks found" in result.stdout


def test_cli_scan_errors_are_one_sentence_and_exit_2(tmp_path: Path):
    missing = _outloop("scan", str(tmp_path / "nope"), home=tmp_path / "home")
    unmapped = _outloop("scan", home=tmp_path / "home")
    for r in (missing, unmapped):
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.startswith("outloop: ") and r.stderr.count("\n") == 1


def test_cli_all_files_widens_the_rules(tmp_path: Path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "settings.py").write_text('DB_PASSWORD = "Tr0ub4dor&3xQ!"\n')
    assert _outloop("scan", str(tmp_path / "w"), home=tmp_path / "h").returncode == 0
    assert _outloop("scan", str(tmp_path / "w"), "--all-files", home=tmp_path / "h").returncode == 1


def test_workspace_index_finds_the_longest_prefix(tmp_path: Path):
    from broker.leaks.scan import WorkspaceIndex

    spaces = [(f"t{i}", tmp_path / f"w{i}") for i in range(500)] + [("inner", tmp_path / "w7" / "sub")]
    index = WorkspaceIndex(spaces)
    assert index.owner_of(tmp_path / "w7" / "a.py") == ("t7", tmp_path / "w7")
    assert index.owner_of(tmp_path / "w7" / "sub" / "b" / "c.py") == ("inner", tmp_path / "w7" / "sub")
    assert index.owner_of(tmp_path / "w70x" / "a.py") is None
    assert index.owner_of(tmp_path / "w7") == ("t7", tmp_path / "w7")


def test_folder_ignore_reads_gitignore_and_extra_patterns(tmp_path: Path):
    from broker.leaks.scan import FolderIgnore, walk

    (tmp_path / ".gitignore").write_text("# build\n/out2/\nlogs\n*.egg-info\ndocs/_site\n!logs\n.env\n")
    for folder in ("out2", "src/out2", "logs", "a.egg-info", "docs/_site", "docs/api", "node_modules/x", "big/data"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / ".env").write_text("T=1\n")
    ignore = FolderIgnore.for_workspace(tmp_path, ["big"])
    files, folders = walk(tmp_path, ignore)
    rel = sorted(str(p.relative_to(tmp_path)) for p in folders)
    # logs is re-included by `!logs`; src/out2 is not the anchored /out2; .env files are always read.
    assert rel == [".", "docs", "docs/api", "logs", "src", "src/out2"]
    assert sum(1 for f in files if f.name == ".env") == 3  # docs/api, logs, src/out2
