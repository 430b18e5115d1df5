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

It follows the output files of background `Bash` commands and `Monitor`s as
well, under `<tmp>/claude-<uid>/<project folder>/<session>/tasks/`
(broker/claude/tasks.py), read as they grow. Their tenant is the project
folder's, made exact by the `cwd` of the session's transcript beside it when
there is one (the folder name alone cannot tell `/a/b-c` from `/a/b/c`).
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
from broker.claude.tasks import GrowingFiles, claude_tmp_roots, trusted_root
from broker.leaks.alerts import AlertStore
from broker.leaks.scan import Finding, ManagedSecrets, managed_from, owner_of, scan_text

# A transcript line longer than this is scanned in pieces of this size (overlapping).
MAX_LINE_CHARS = 4 * 1024 * 1024
# A tool-result file larger than this is read only up to it.
MAX_RESULT_BYTES = 16 * 1024 * 1024

_NON_ALNUM = re.compile(r"[^A-Za-z0-9]")
_CWD = re.compile(r'"cwd"\s*:\s*"((?:[^"\\]|\\.)*)"')
# How much of a session's transcript is read to find the folder it started in.
SESSION_HEAD_BYTES = 65536

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
        tmpdir: str | None = None,
        task_roots: Iterable[Path] | None = None,
    ) -> None:
        """`task_roots` are the `claude-<uid>` folders to follow; by default every one
        Claude Code may use (`claude_tmp_roots`, with `tmpdir` from the config)."""
        self.root = projects_dir(environ)
        self.task_roots = list(task_roots) if task_roots is not None else claude_tmp_roots(environ, tmpdir)
        self._secrets = secrets
        self._managed: ManagedSecrets | None = None
        self._tails: dict[Path, _Tail] = {}
        self._results_seen: dict[Path, tuple[int, int]] = {}
        self._outputs = GrowingFiles()
        self._session_cwd: dict[tuple[str, str], Path] = {}
        self.workspaces: list[tuple[str, Path]] = []
        self.rearm(workspaces)

    def __repr__(self) -> str:
        return f"TranscriptScanner({self.root}, {len(self.task_roots)} task folders, {len(self.workspaces)} workspaces)"

    def rearm(self, workspaces: Iterable[tuple[str, Path]]) -> None:
        """New workspace list (after a config change); the secrets are read again."""
        self.workspaces = [(t, Path(ws)) for t, ws in workspaces]
        self._managed = None

    def roots(self) -> list[Path]:
        """The folders followed: the projects folder, then each task folder."""
        return [self.root, *self.task_roots]

    def followable(self, root: Path) -> bool:
        """Whether `root` can be followed now (a task folder must be this user's own)."""
        if root in self.task_roots:
            return trusted_root(root)
        return root.is_dir()

    def forget_secrets(self) -> None:
        self._managed = None

    def managed(self) -> ManagedSecrets:
        if self._managed is None:
            self._managed = managed_from(dict(self._secrets()))
        return self._managed

    def folders(self, root: Path | None = None) -> list[Path]:
        """Existing project folders that belong to a mapped workspace, under `root`
        (the projects folder or a task folder), or under every root."""
        found: list[Path] = []
        for top in self.roots() if root is None else [root]:
            if top in self.task_roots and not trusted_root(top):
                continue
            try:
                entries = list(os.scandir(top))
            except OSError:
                continue
            found.extend(
                Path(e.path)
                for e in entries
                if e.is_dir(follow_symlinks=False) and workspace_of_folder(e.name, self.workspaces) is not None
            )
        return sorted(found)

    def _root_of(self, path: Path) -> tuple[Path, tuple[str, ...]] | None:
        for root in self.roots():
            try:
                rel = path.relative_to(root)
            except ValueError:
                continue
            if rel.parts:
                return root, rel.parts
        return None

    def owner(self, path: Path) -> tuple[str, Path] | None:
        """The (tenant, workspace) a file under a followed folder belongs to."""
        found = self._root_of(path)
        if found is None:
            return None
        root, parts = found
        owner = workspace_of_folder(parts[0], self.workspaces)
        if owner is None or root == self.root or len(parts) < 3:
            return owner
        # A task output: the session's transcript says where the session started.
        cwd = self._started_in(parts[0], parts[1])
        if cwd is None:
            return owner
        return owner_of(cwd, self.workspaces)

    def _started_in(self, folder: str, session: str) -> Path | None:
        """The `cwd` of session `session`'s transcript in project folder `folder`, if it names one."""
        key = (folder, session)
        if key in self._session_cwd:
            return self._session_cwd[key]
        try:
            with open(self.root / folder / f"{session}.jsonl", "rb") as f:
                head = f.read(SESSION_HEAD_BYTES).decode("utf-8", "replace")
        except OSError:
            return None
        m = _CWD.search(head)
        if m is None:
            return None
        try:
            cwd = Path(json.loads(f'"{m.group(1)}"'))
        except ValueError:
            return None
        if not cwd.is_absolute() or project_folder_name(cwd) != folder:
            return None  # not the session this folder is named after
        self._session_cwd[key] = cwd
        return cwd

    def skip_existing(self) -> None:
        """Start every existing transcript and task output at its end (see the module docstring)."""
        for root in self.roots():
            for folder in self.folders(root):
                for path in _files_under(folder):
                    if root != self.root:
                        self._outputs.skip(path)
                        continue
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
        """Findings in what is new in `path` (a transcript, a tool-result file or a task output)."""
        owner = self.owner(path)
        if owner is None:
            return []
        if not path.is_relative_to(self.root):  # under a task folder (owner() found one)
            return self._scan_task_output(path, owner)
        if path.suffix == ".jsonl":
            return self._scan_appended(path, owner)
        return self._scan_result_file(path, owner)

    def forget(self, path: Path) -> None:
        """`path` is gone: a file of that name later is a new one."""
        self._outputs.forget(path)

    def _scan_task_output(self, path: Path, owner: tuple[str, Path]) -> list[Finding]:
        """What was appended to a task output since last time, read in bounded blocks."""
        tenant, workspace = owner
        found: list[Finding] = []
        for window in self._outputs.windows(path):
            for f in _scan_with_runs(window.text, path, tenant, workspace, self.managed()):
                if self._outputs.first_report(path, f.rule, f.fingerprint):
                    line = window.first_line + f.line - 1
                    found.append(
                        Finding(f.tenant, f.workspace, f.path, line, f.rule, f.severity, f.preview, f.fingerprint)
                    )
        return found

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
        m = _CWD.search(text[:65536])
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


def _scan_with_runs(text: str, path: Path, tenant: str, workspace: Path, managed: ManagedSecrets) -> list[Finding]:
    """Findings in `text`, and in its hex and base64 runs decoded (reported at the run's line)."""
    found = scan_text(text, path, tenant=tenant, workspace=workspace, managed=managed)
    known = {(f.rule, f.fingerprint) for f in found}
    for run in runs(text):
        line = text.count("\n", 0, run.start) + 1
        for g in scan_text(run.decoded, path, tenant=tenant, workspace=workspace, managed=managed):
            if (g.rule, g.fingerprint) not in known:
                known.add((g.rule, g.fingerprint))
                found.append(Finding(g.tenant, g.workspace, g.path, line, g.rule, g.severity, g.preview, g.fingerprint))
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
    """Watches Claude Code's projects folder and task folders with watchfiles and keeps
    `store` up to date.

        watcher = TranscriptWatcher(workspaces, engine.managed_secrets, alert_store)
        await watcher.start()
        ...
        await watcher.rearm(new_workspaces)
        await watcher.stop()

    Findings open alerts on the event loop (so the store's subscribers, the
    dashboard, are called there); a deleted transcript or task output resolves its
    alerts. Each folder is followed by a task of its own; one that does not exist
    yet (or, for a task folder, is not this user's own) is waited for by watching
    its nearest existing parent.
    """

    def __init__(
        self,
        workspaces: Iterable[tuple[str, Path]],
        secrets: SecretsSource,
        store: AlertStore,
        *,
        environ: Mapping[str, str] | None = None,
        tmpdir: str | None = None,
        task_roots: Iterable[Path] | None = None,
        debounce_ms: int = 50,
    ) -> None:
        self.scanner = TranscriptScanner(workspaces, secrets, environ=environ, tmpdir=tmpdir, task_roots=task_roots)
        self.store = store
        self._debounce = debounce_ms
        self._tasks: list[asyncio.Task[None]] = []
        self._armed: dict[Path, asyncio.Event] = {}
        self._stop: asyncio.Event | None = None
        self.events_seen = 0
        self.error: str | None = None

    def __repr__(self) -> str:
        return f"TranscriptWatcher({', '.join(str(r) for r in self.scanner.roots())})"

    async def start(self) -> None:
        """Skip what is already there, then follow each folder in a background task."""
        await asyncio.to_thread(self.scanner.skip_existing)
        self._stop = asyncio.Event()
        self._armed = {root: asyncio.Event() for root in self.scanner.roots()}
        self._tasks = [
            asyncio.create_task(self._run(root), name=f"outloop-transcripts:{root}") for root in self.scanner.roots()
        ]

    async def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: S110 - stopping anyway
                pass
        self._tasks = []

    async def rearm(self, workspaces: Iterable[tuple[str, Path]]) -> None:
        """Follow a new set of workspaces (same shape as LeakWatcher.rearm); the managed
        secrets are read again on the next scan."""
        self.scanner.rearm(workspaces)

    def health(self) -> dict[str, object]:
        return {
            "root": str(self.scanner.root),
            "task_roots": [str(r) for r in self.scanner.task_roots],
            "running": bool(self._tasks) and not any(t.done() for t in self._tasks),
            "watching": all(e.is_set() for e in self._armed.values()),
            "events": self.events_seen,
            "error": self.error,
        }

    def _watch_root(self, target: Path) -> Path:
        """`target` when it can be followed, else its nearest existing parent (to wait in)."""
        if self.scanner.followable(target):
            return target
        root = target.parent
        while not root.exists() and root.parent != root:
            root = root.parent
        return root

    async def ready(self) -> None:
        """Return once every folder's watch is in place (a write from then on is seen)."""
        await asyncio.gather(*(event.wait() for event in self._armed.values()))

    async def _run(self, target: Path) -> None:
        import watchfiles

        assert self._stop is not None
        armed = self._armed.setdefault(target, asyncio.Event())
        while not self._stop.is_set():
            root = self._watch_root(target)
            waiting = root != target
            first = True
            try:
                # A quiet second yields an empty set: the first yield says the watch is in place.
                async for changes in watchfiles.awatch(
                    root,
                    stop_event=self._stop,
                    debounce=self._debounce,
                    step=20,
                    rust_timeout=1000,
                    yield_on_timeout=True,
                    recursive=not waiting,
                    ignore_permission_denied=True,
                ):
                    self.events_seen += len(changes)
                    armed.set()
                    if waiting:
                        if self._watch_root(target) != root:
                            break  # a folder on the way appeared: watch closer
                        continue
                    if not self.scanner.followable(target):
                        break  # replaced by something not ours: wait again
                    if first:
                        # What was written before the watch was in place (the folder just
                        # appeared, or the broker is starting) is found here.
                        first = False
                        self._record(await asyncio.to_thread(self._scan_all, target))
                    if not changes:
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

    def _record(self, findings: list[Finding]) -> None:
        by_path: dict[Path, list[Finding]] = {}
        for f in findings:
            by_path.setdefault(f.path, []).append(f)
        for path, found in by_path.items():
            record_findings(self.store, path, found)

    def _scan(self, changed: list[str]) -> tuple[list[Path], list[Finding]]:
        """(deleted files of mapped workspaces, findings in what changed), in a thread."""
        paths = {Path(p) for p in changed}
        gone = sorted(p for p in paths if not os.path.lexists(p))
        for p in gone:
            self.scanner.forget(p)
        found: list[Finding] = []
        for p in sorted(paths - set(gone)):
            if p.is_dir() and not p.is_symlink():
                found.extend(self.scanner.scan_folder(p))
            else:
                found.extend(self.scanner.scan_changes(p))
        return [p for p in gone if self.scanner.owner(p) is not None], found

    def _scan_all(self, root: Path) -> list[Finding]:
        found: list[Finding] = []
        for folder in self.scanner.folders(root):
            found.extend(self.scanner.scan_folder(folder))
        return found
