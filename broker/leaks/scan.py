"""Scanning files and folders for leaked secrets.

Plain functions over plain data: a file path (or a folder), the tenant and
workspace it belongs to, and the managed secrets as a mapping
`{(tenant, credential): secret}`. The result is a list of `Finding`s that name
where a secret is and what it looks like from afar (a masked preview and a
SHA-256 fingerprint), never the secret itself.

What gets read: `.env`-like files (`.env`, `.env.*`, `*.env`, `.envrc`) get every
rule; other text files get the managed secrets and the high-confidence provider
rules (every rule with `all_files`). Binary files, files over the size cap and
dependency or build folders are skipped (which folders are entered: tree.py);
unreadable files and symlink loops are counted, never raised.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from broker.leaks.redact import encodings
from broker.leaks.rules import Severity, find_secrets
from broker.leaks.tree import SKIP_DIRS, FolderIgnore, is_skipped_dir, iter_files, walk

DEFAULT_MAX_BYTES = 2 * 1024 * 1024

MIN_MANAGED_LENGTH = 8  # shorter secrets would match ordinary text by chance
_BINARY_PROBE = 8192

SkipReason = Literal["binary", "too_large", "unreadable", "missing", "not_a_file"]


def is_env_like(path: Path | str) -> bool:
    """`.env`, `.env.*`, `*.env` and `.envrc`: the files every rule applies to."""
    name = os.path.basename(path)
    return name in (".env", ".envrc") or name.startswith(".env.") or name.endswith(".env")


def fingerprint(value: str) -> str:
    """Hex SHA-256 of the exact value (bytes as they were in the file)."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def mask(value: str) -> str:
    """A preview that shows at most the first 4 and last 2 characters."""
    flat = value.replace("\r", " ").replace("\n", " ")
    if len(flat) >= 16:
        return f"{flat[:4]}****{flat[-2:]}"
    if len(flat) >= 8:
        return f"{flat[:2]}****"
    return "****"


@dataclass(frozen=True, slots=True)
class Finding:
    """One leaked value in one file. Holds no part of the secret but the preview."""

    tenant: str | None
    workspace: Path | None
    path: Path
    line: int
    rule: str
    severity: Severity
    preview: str
    fingerprint: str


@dataclass(slots=True)
class FileScan:
    """The outcome for one file: `skipped` is None when the file was read."""

    path: Path
    findings: list[Finding] = field(default_factory=list)
    skipped: SkipReason | None = None
    size: int = 0


@dataclass(slots=True)
class ScanReport:
    """Totals and findings of a folder scan."""

    findings: list[Finding] = field(default_factory=list)
    files_scanned: int = 0
    bytes_scanned: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    scanned_paths: list[Path] = field(default_factory=list)

    def add(self, result: FileScan) -> None:
        if result.skipped is None:
            self.files_scanned += 1
            self.bytes_scanned += result.size
            self.scanned_paths.append(result.path)
            self.findings.extend(result.findings)
        else:
            self.skipped[result.skipped] = self.skipped.get(result.skipped, 0) + 1


class ManagedSecrets:
    """The broker's secrets, prepared for searching in every encoding.

    Built from `{(tenant, credential): secret}`; repr() never shows a value.
    """

    __slots__ = ("_forms", "_count")

    def __init__(self, secrets: Mapping[tuple[str, str], str]) -> None:
        forms: dict[str, tuple[str, str, str]] = {}
        for (tenant, credential), secret in secrets.items():
            if len(secret) < MIN_MANAGED_LENGTH:
                continue
            for form in encodings(secret):
                if len(form) >= MIN_MANAGED_LENGTH:
                    forms.setdefault(form, (tenant, credential, fingerprint(secret)))
        # Longest first, so that a value is claimed by its fullest form.
        self._forms = sorted(forms.items(), key=lambda kv: -len(kv[0]))
        self._count = len(secrets)

    def __repr__(self) -> str:
        return f"ManagedSecrets({self._count} secrets)"

    def __bool__(self) -> bool:
        return bool(self._forms)

    def find(self, text: str) -> Iterator[tuple[int, int, str, str, str]]:
        """(start, end, tenant, credential, fingerprint) for each occurrence."""
        for form, (tenant, credential, fp) in self._forms:
            at = text.find(form)
            while at >= 0:
                yield at, at + len(form), tenant, credential, fp
                at = text.find(form, at + len(form))


NO_SECRETS = ManagedSecrets({})


def _read_text(path: Path, max_bytes: int) -> tuple[str | None, SkipReason | None, int]:
    try:
        st = os.stat(path)  # follows a symlinked file; a dangling link is "missing"
    except FileNotFoundError:
        return None, "missing", 0
    except OSError:
        return None, "unreadable", 0
    if not stat.S_ISREG(st.st_mode):
        return None, "not_a_file", 0
    if st.st_size > max_bytes:
        return None, "too_large", st.st_size
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None, "missing", 0
    except OSError:
        return None, "unreadable", 0
    if len(data) > max_bytes:
        return None, "too_large", len(data)
    if b"\0" in data[:_BINARY_PROBE]:
        return None, "binary", len(data)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", "surrogateescape"), None, len(data)


def scan_text(
    text: str,
    path: Path,
    *,
    tenant: str | None = None,
    workspace: Path | None = None,
    managed: ManagedSecrets = NO_SECRETS,
    all_files: bool = False,
) -> list[Finding]:
    """Findings in `text`, as if read from `path` (which decides `.env`-likeness)."""
    spans: list[tuple[int, int, str, Severity, str]] = []
    for start, end, owner, credential, fp in managed.find(text):
        if tenant is not None and owner != tenant:
            spans.append((start, end, f"cross-tenant:{owner}/{credential}", "critical", fp))
        else:
            spans.append((start, end, f"managed-secret:{owner}/{credential}", "high", fp))
    env_like = is_env_like(path)
    for m in find_secrets(text, env_like=env_like, all_rules=all_files):
        value = m.value(text)
        spans.append((m.start, m.end, m.rule_id, m.severity, fingerprint(value)))
    findings: list[Finding] = []
    taken: list[tuple[int, int]] = []
    # Managed matches come first and win an overlap: they name the credential.
    for start, end, rule, severity, fp in spans:
        if any(start < e and s < end for s, e in taken):
            continue
        taken.append((start, end))
        line = text.count("\n", 0, start) + 1
        findings.append(Finding(tenant, workspace, path, line, rule, severity, mask(text[start:end]), fp))
    findings.sort(key=lambda f: f.line)
    return findings


def scan_file(
    path: Path,
    *,
    tenant: str | None = None,
    workspace: Path | None = None,
    managed: ManagedSecrets = NO_SECRETS,
    all_files: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> FileScan:
    """Scan one file. Never raises for a missing, unreadable, binary or huge file."""
    text, skipped, size = _read_text(path, max_bytes)
    if text is None:
        return FileScan(path, skipped=skipped, size=size)
    found = scan_text(text, path, tenant=tenant, workspace=workspace, managed=managed, all_files=all_files)
    return FileScan(path, found, None, size)


# What forked scan workers read: set before the pool forks, so the managed secrets
# and the list of files reach them by inheritance, never through a pipe.
_Item = tuple[Path, str | None, Path | None]
_WORKER_STATE: tuple[ManagedSecrets, bool, int, Sequence[_Item]] = (NO_SECRETS, False, DEFAULT_MAX_BYTES, ())
_MIN_FILES_PER_PROCESS = 200
_CHUNKS_PER_PROCESS = 8


def _scan_item(item: _Item) -> FileScan:
    managed, all_files, max_bytes, _items = _WORKER_STATE
    path, tenant, workspace = item
    return scan_file(
        path, tenant=tenant, workspace=workspace, managed=managed, all_files=all_files, max_bytes=max_bytes
    )


def _scan_range(bounds: tuple[int, int]) -> list[tuple[list[Finding], SkipReason | None, int]]:
    # A worker's share of the files, by index: what comes back through the pipe is
    # each file's findings (most often none), skip reason and size, not its path.
    items = _WORKER_STATE[3]
    out: list[tuple[list[Finding], SkipReason | None, int]] = []
    for i in range(*bounds):
        result = _scan_item(items[i])
        out.append((result.findings, result.skipped, result.size))
    return out


def scan_files(
    items: Sequence[_Item],
    *,
    managed: ManagedSecrets = NO_SECRETS,
    all_files: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    processes: int = 1,
) -> Iterator[FileScan]:
    """Scan (path, tenant, workspace) items in order, in up to `processes` forked
    worker processes when there are enough files to pay for them.

    For one-shot commands (`outloop scan`): forking a process that runs threads
    (the broker) is not safe, so the watcher scans in threads instead.
    """
    global _WORKER_STATE
    n = min(processes, len(items) // _MIN_FILES_PER_PROCESS)
    if n <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        _WORKER_STATE = (managed, all_files, max_bytes, ())
        yield from map(_scan_item, items)
        return
    _WORKER_STATE = (managed, all_files, max_bytes, items)
    size = -(-len(items) // (n * _CHUNKS_PER_PROCESS))
    ranges = [(start, min(start + size, len(items))) for start in range(0, len(items), size)]
    try:
        with multiprocessing.get_context("fork").Pool(n) as pool:
            for (start, _end), results in zip(ranges, pool.imap(_scan_range, ranges), strict=True):
                for offset, (findings, skipped, nbytes) in enumerate(results):
                    yield FileScan(items[start + offset][0], findings, skipped, nbytes)
    finally:
        _WORKER_STATE = (managed, all_files, max_bytes, ())


def scan_tree(
    root: Path,
    *,
    tenant: str | None = None,
    workspace: Path | None = None,
    managed: ManagedSecrets = NO_SECRETS,
    all_files: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    processes: int = 1,
) -> ScanReport:
    """Scan every file under `root` (a folder or a single file)."""
    report = ScanReport()

    def unreadable(_exc: OSError) -> None:
        report.skipped["unreadable"] = report.skipped.get("unreadable", 0) + 1

    items = [(path, tenant, workspace or root) for path in iter_files(root, unreadable)]
    for result in scan_files(items, managed=managed, all_files=all_files, max_bytes=max_bytes, processes=processes):
        report.add(result)
    return report


def owner_of(path: Path, workspaces: Iterable[tuple[str, Path]]) -> tuple[str, Path] | None:
    """The (tenant, workspace) whose folder holds `path`: the longest matching prefix.

    For many lookups build a WorkspaceIndex once: this compares with every workspace.
    """
    return WorkspaceIndex(workspaces).owner_of(path)


class WorkspaceIndex:
    """Finds the (tenant, workspace) holding a path with one dict lookup per level
    of the path, however many workspaces there are."""

    __slots__ = ("_by_path",)

    def __init__(self, workspaces: Iterable[tuple[str, Path]]) -> None:
        self._by_path: dict[str, tuple[str, Path]] = {}
        for tenant, ws in workspaces:
            self._by_path.setdefault(str(ws), (tenant, ws))

    def __len__(self) -> int:
        return len(self._by_path)

    def owner_of(self, path: Path | str) -> tuple[str, Path] | None:
        """The longest workspace prefix of `path` (absolute, normalised), or None."""
        text = str(path)
        while True:
            found = self._by_path.get(text)
            if found is not None:
                return found
            head, sep, _ = text.rpartition("/")
            if not sep or text == "/":
                return None
            text = head or "/"


def managed_from(secrets: Mapping[tuple[str, str], str] | ManagedSecrets) -> ManagedSecrets:
    """Accept either the plain mapping or an already prepared ManagedSecrets."""
    return secrets if isinstance(secrets, ManagedSecrets) else ManagedSecrets(secrets)


__all__: Sequence[str] = (
    "DEFAULT_MAX_BYTES",
    "SKIP_DIRS",
    "FileScan",
    "Finding",
    "FolderIgnore",
    "WorkspaceIndex",
    "ManagedSecrets",
    "ScanReport",
    "fingerprint",
    "is_env_like",
    "is_skipped_dir",
    "iter_files",
    "managed_from",
    "mask",
    "owner_of",
    "scan_file",
    "scan_files",
    "scan_text",
    "scan_tree",
    "walk",
)
