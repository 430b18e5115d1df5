"""Claude Code's transcripts: where they live, and watching them for leaked keys.

Claude Code keeps each session as JSON lines in

    <config>/projects/<project path, every non-alphanumeric character -> '-'>/<session>.jsonl

with large tool outputs in `tool-results/` files beside them. `<config>` is
`CLAUDE_CONFIG_DIR`, or `~/.claude`. Tool output is stored verbatim, so a key
that an agent printed (or that a tool returned) stays on disk in plain text.

For every mapped workspace, the transcript watcher follows the project folders
of that workspace and of any folder inside it (Claude Code may be started in a
subfolder), reads each line as it is appended, and each new tool-result file,
and reports managed secrets and high-confidence provider keys found there. The
tenant is the workspace's; a line's own `cwd` field, when present, decides the
workspace. Files that exist when watching starts are read from their end:
transcripts are large, and what was written while nobody watched is for
`outloop scan <folder>`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.claude.encoded import runs
from broker.leaks.alerts import AlertStore
from broker.leaks.scan import Finding, ManagedSecrets, managed_from, owner_of, scan_text

# A transcript line longer than this is scanned in pieces of this size (overlapping).
MAX_LINE_CHARS = 4 * 1024 * 1024
# A tool-result file larger than this is read only up to it.
MAX_RESULT_BYTES = 16 * 1024 * 1024

_NON_ALNUM = re.compile(r"[^A-Za-z0-9]")

SecretsSource = Callable[[], Mapping[tuple[str, str], str]]


def claude_config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Claude Code's folder: `CLAUDE_CONFIG_DIR`, or `~/.claude`."""
    env = os.environ if environ is None else environ
    override = env.get("CLAUDE_CONFIG_DIR")
    return Path(override).expanduser() if override else Path.home() / ".claude"


def project_folder_name(path: Path | str) -> str:
    """The folder name Claude Code gives a project: its absolute path with every
    non-alphanumeric character replaced by '-' (`/home/a/my.app` -> `-home-a-my-app`)."""
    return _NON_ALNUM.sub("-", str(path))


def projects_dir(environ: Mapping[str, str] | None = None) -> Path:
    return claude_config_dir(environ) / "projects"


def transcript_dir(workspace: Path, environ: Mapping[str, str] | None = None) -> Path:
    """The folder holding the transcripts of Claude Code sessions started in `workspace`."""
    return projects_dir(environ) / project_folder_name(workspace)


def record_findings(store: AlertStore, path: Path, findings: Sequence[Finding]) -> None:
    """Open alerts for what was found in the new part of an append-only file.

    `AlertStore.reconcile_file` takes a whole file's findings and resolves the
    rest; a transcript is only ever appended to, so what was found there before
    is still there: it is passed along with the new findings.
    """
    if not findings:
        return
    key = str(path)
    held = [
        Finding(
            a.tenant,
            Path(a.workspace) if a.workspace else None,
            path,
            a.line,
            a.rule,
            a.severity,
            a.preview,
            a.fingerprint,
        )
        for a in store.alerts(("open",))
        if a.path == key
    ]
    store.reconcile_file(path, [*held, *findings])


def workspace_of_folder(name: str, workspaces: Sequence[tuple[str, Path]]) -> tuple[str, Path] | None:
    """The (tenant, workspace) whose project folder is `name`, or a folder inside it.

    The name is lossy ('/a/b-c' and '/a/b/c' look alike), so the longest workspace
    wins, and a line's own `cwd` is preferred where there is one.
    """
    best: tuple[str, Path] | None = None
    for tenant, ws in workspaces:
        prefix = project_folder_name(ws)
        if name == prefix or name.startswith(prefix + "-"):
            if best is None or len(project_folder_name(best[1])) < len(prefix):
                best = (tenant, ws)
    return best


@dataclass
class _Tail:
    """How far a .jsonl file has been read: inode, byte offset, complete lines so far."""

    inode: int
    offset: int
    lines: int


class TranscriptScanner:
    """Reads what was appended to transcripts since last time and scans it.

    Plain I/O over files, no watching: `TranscriptWatcher` (or a test) tells it which
    files changed. Not thread-safe; one caller at a time.
    """

    def __init__(
        self,
        workspaces: Iterable[tuple[str, Path]],
        secrets: SecretsSource,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.root = projects_dir(environ)
        self._secrets = secrets
        self._managed: ManagedSecrets | None = None
        self._tails: dict[Path, _Tail] = {}
        self._results_seen: dict[Path, tuple[int, int]] = {}
        self.workspaces: list[tuple[str, Path]] = []
        self.rearm(workspaces)

    def __repr__(self) -> str:
        return f"TranscriptScanner({self.root}, {len(self.workspaces)} workspaces)"

    def rearm(self, workspaces: Iterable[tuple[str, Path]]) -> None:
        """New workspace list (after a config change); the secrets are read again."""
        self.workspaces = [(t, Path(ws)) for t, ws in workspaces]
        self._managed = None

    def forget_secrets(self) -> None:
        self._managed = None

    def managed(self) -> ManagedSecrets:
        if self._managed is None:
            self._managed = managed_from(dict(self._secrets()))
        return self._managed

    def folders(self) -> list[Path]:
        """Existing project folders that belong to a mapped workspace."""
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        return sorted(
            Path(e.path)
            for e in entries
            if e.is_dir(follow_symlinks=False) and workspace_of_folder(e.name, self.workspaces) is not None
        )

    def owner(self, path: Path) -> tuple[str, Path] | None:
        """The (tenant, workspace) a file under the projects folder belongs to."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        if not rel.parts:
            return None
        return workspace_of_folder(rel.parts[0], self.workspaces)

    def skip_existing(self) -> None:
        """Start every existing transcript at its end (see the module docstring)."""
        for folder in self.folders():
            for path in _files_under(folder):
                try:
                    st = path.stat()
                except OSError:
                    continue
                if path.suffix == ".jsonl":
                    self._tails[path] = _Tail(st.st_ino, st.st_size, _count_lines(path))
                else:
                    self._results_seen[path] = (st.st_ino, st.st_size)

    def scan_folder(self, folder: Path) -> list[Finding]:
        """Everything new in one project folder (used when it appears)."""
        found: list[Finding] = []
        for path in _files_under(folder):
            found.extend(self.scan_changes(path))
        return found

    def scan_changes(self, path: Path) -> list[Finding]:
        """Findings in what is new in `path` (a transcript or a tool-result file)."""
        owner = self.owner(path)
        if owner is None:
            return []
        if path.suffix == ".jsonl":
            return self._scan_appended(path, owner)
        return self._scan_result_file(path, owner)

    def _scan_appended(self, path: Path, owner: tuple[str, Path]) -> list[Finding]:
        try:
            st = path.stat()
        except OSError:
            self._tails.pop(path, None)
            return []
        tail = self._tails.get(path)
        if tail is None or tail.inode != st.st_ino or st.st_size < tail.offset:
            tail = _Tail(st.st_ino, 0, 0)  # new, replaced or truncated: read from the start
            self._tails[path] = tail
        if st.st_size == tail.offset:
            return []
        try:
            with open(path, "rb") as f:
                f.seek(tail.offset)
                data = f.read(st.st_size - tail.offset)
        except OSError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []  # no complete line yet: Claude Code is still writing it
        chunk = data[: end + 1]
        found: list[Finding] = []
        line_no = tail.lines
        for raw in chunk.split(b"\n")[:-1]:
            line_no += 1
            found.extend(self._scan_line(raw.decode("utf-8", "surrogateescape"), path, line_no, owner))
        tail.offset += len(chunk)
        tail.lines = line_no
        return found

    def _scan_line(self, text: str, path: Path, line_no: int, owner: tuple[str, Path]) -> list[Finding]:
        tenant, workspace = self._line_owner(text, owner)
        found: list[Finding] = []
        step = MAX_LINE_CHARS - 4096  # the overlap catches a key cut at a piece boundary
        seen: set[tuple[str, str]] = set()
        for start in range(0, max(len(text), 1), step):
            piece = text[start : start + MAX_LINE_CHARS]
            for f in scan_text(piece, path, tenant=tenant, workspace=workspace, managed=self.managed()):
                if (f.rule, f.fingerprint) in seen:
                    continue
                seen.add((f.rule, f.fingerprint))
                found.append(
                    Finding(f.tenant, f.workspace, f.path, line_no, f.rule, f.severity, f.preview, f.fingerprint)
                )
        # Keys printed hex- or base64-encoded (`cat .env | base64`): the line's strings, decoded.
        if len(text) <= MAX_LINE_CHARS:
            try:
                strings = _json_strings(json.loads(text))
            except ValueError:
                strings = [text]
            for value in strings:
                for run in runs(value):
                    for f in scan_text(run.decoded, path, tenant=tenant, workspace=workspace, managed=self.managed()):
                        if (f.rule, f.fingerprint) not in seen:
                            seen.add((f.rule, f.fingerprint))
                            found.append(
                                Finding(
                                    f.tenant, f.workspace, f.path, line_no, f.rule, f.severity, f.preview, f.fingerprint
                                )
                            )
        return found

    def _line_owner(self, text: str, owner: tuple[str, Path]) -> tuple[str, Path]:
        m = re.search(r'"cwd"\s*:\s*"((?:[^"\\]|\\.)*)"', text[:65536])
        if m:
            try:
                cwd = Path(json.loads(f'"{m.group(1)}"'))
            except ValueError:
                return owner
            better = owner_of(cwd, self.workspaces)
            if better is not None:
                return better
        return owner

    def _scan_result_file(self, path: Path, owner: tuple[str, Path]) -> list[Finding]:
        try:
            st = path.stat()
        except OSError:
            self._results_seen.pop(path, None)
            return []
        stamp = (st.st_ino, st.st_size)
        if self._results_seen.get(path) == stamp or not path.is_file():
            return []
        self._results_seen[path] = stamp
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_RESULT_BYTES)
        except OSError:
            return []
        if b"\0" in data[:8192]:
            return []
        tenant, workspace = owner
        text = data.decode("utf-8", "surrogateescape")
        found = scan_text(text, path, tenant=tenant, workspace=workspace, managed=self.managed())
        known = {(f.rule, f.fingerprint) for f in found}
        for run in runs(text):
            line = text.count("\n", 0, run.start) + 1
            for g in scan_text(run.decoded, path, tenant=tenant, workspace=workspace, managed=self.managed()):
                if (g.rule, g.fingerprint) not in known:
                    known.add((g.rule, g.fingerprint))
                    found.append(
                        Finding(g.tenant, g.workspace, g.path, line, g.rule, g.severity, g.preview, g.fingerprint)
                    )
        return found


def _json_strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _json_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _json_strings(v)]
    return []


def _files_under(folder: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        out.extend(Path(dirpath, name) for name in filenames)
    return sorted(out)


def _count_lines(path: Path) -> int:
    n = 0
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                n += block.count(b"\n")
    except OSError:
        return 0
    return n


class TranscriptWatcher:
    """Watches Claude Code's projects folder with watchfiles and keeps `store` up to date.

        watcher = TranscriptWatcher(workspaces, engine.managed_secrets, alert_store)
        await watcher.start()
        ...
        await watcher.rearm(new_workspaces)
        await watcher.stop()

    Findings open alerts on the event loop (so the store's subscribers, the
    dashboard, are called there); a deleted transcript resolves its alerts. When
    the projects folder does not exist yet, its nearest existing parent is
    watched until it appears.
    """

    def __init__(
        self,
        workspaces: Iterable[tuple[str, Path]],
        secrets: SecretsSource,
        store: AlertStore,
        *,
        environ: Mapping[str, str] | None = None,
        debounce_ms: int = 50,
    ) -> None:
        self.scanner = TranscriptScanner(workspaces, secrets, environ=environ)
        self.store = store
        self._debounce = debounce_ms
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self.events_seen = 0
        self.error: str | None = None

    def __repr__(self) -> str:
        return f"TranscriptWatcher({self.scanner.root})"

    async def start(self) -> None:
        """Skip what is already there, then watch in a background task."""
        await asyncio.to_thread(self.scanner.skip_existing)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="outloop-transcripts")

    async def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: S110 - stopping anyway
                pass
            self._task = None

    async def rearm(self, workspaces: Iterable[tuple[str, Path]]) -> None:
        """Follow a new set of workspaces (same shape as LeakWatcher.rearm); the managed
        secrets are read again on the next scan."""
        self.scanner.rearm(workspaces)

    def health(self) -> dict[str, object]:
        return {
            "root": str(self.scanner.root),
            "running": self._task is not None and not self._task.done(),
            "events": self.events_seen,
            "error": self.error,
        }

    def _watch_root(self) -> Path:
        root = self.scanner.root
        while not root.exists() and root.parent != root:
            root = root.parent
        return root

    async def _run(self) -> None:
        import watchfiles

        assert self._stop is not None
        while not self._stop.is_set():
            root = self._watch_root()
            waiting = root != self.scanner.root
            try:
                async for changes in watchfiles.awatch(
                    root,
                    stop_event=self._stop,
                    debounce=self._debounce,
                    step=20,
                    recursive=not waiting,
                    ignore_permission_denied=True,
                ):
                    self.events_seen += len(changes)
                    if waiting:
                        if self._watch_root() != root:
                            break  # a folder on the way appeared: watch closer
                        continue
                    gone, findings = await asyncio.to_thread(self._scan, [p for _kind, p in changes])
                    for path in gone:
                        self.store.resolve_path(path)
                    self._record(findings)
            except Exception as e:  # the folder vanished, or the OS refused: retry soon
                self.error = f"{type(e).__name__}: {e}"
                try:
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                except TimeoutError:
                    pass
                continue
            if waiting and self.scanner.root.exists():
                # Everything already inside the new projects folder is new.
                self._record(await asyncio.to_thread(self._scan_all))

    def _record(self, findings: list[Finding]) -> None:
        by_path: dict[Path, list[Finding]] = {}
        for f in findings:
            by_path.setdefault(f.path, []).append(f)
        for path, found in by_path.items():
            record_findings(self.store, path, found)

    def _scan(self, changed: list[str]) -> tuple[list[Path], list[Finding]]:
        """(deleted files of mapped workspaces, findings in what changed), in a thread."""
        paths = {Path(p) for p in changed}
        gone = sorted(p for p in paths if not p.exists())
        found: list[Finding] = []
        for p in sorted(paths - set(gone)):
            if p.is_dir():
                found.extend(self.scanner.scan_folder(p))
            else:
                found.extend(self.scanner.scan_changes(p))
        return [p for p in gone if self.scanner.owner(p) is not None], found

    def _scan_all(self) -> list[Finding]:
        found: list[Finding] = []
        for folder in self.scanner.folders():
            found.extend(self.scanner.scan_folder(folder))
        return found
