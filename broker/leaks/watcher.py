"""The leak watcher: native watches on every folder the scanner reads, and no other.

Order of work: walk the workspaces (off the event loop) for their files and the
folders the scanner enters, arm a native watcher on those folders, then scan
every file (so a write during the initial scan is seen by one or the other),
then rescan each file that changes.

Why not one recursive watch per workspace: a recursive watch places an inotify
watch on every folder below it, node_modules, `.venv` and `.git` included
(99.8% of the watches of a JS app), and can run past the per-user limit, after
which writes in the folders left over are missed without a word. Here each
folder that is scanned is watched on its own, non-recursively (watchfiles'
`recursive=False` over a list of folders, as watchman's `ignore_dirs` and VS
Code's `files.watcherExclude` do), so skipped trees cost nothing. A new folder
is reported by its parent's watch; it is walked, scanned, and added to the
watch set by arming a new native watcher with it before the old one is closed.

When the folders outnumber what `/proc/sys/fs/inotify/max_user_watches` leaves
free, the ones past the budget are polled instead (a second watcher with
`force_polling`), and health says so with the command that raises the limit.
A folder that cannot be listed or watched is named in health too: nothing in
it is scanned, and saying nothing would look like a clean workspace.

Which folders are entered is tree.py's business (SKIP_DIRS, the `.gitignore`
files at every level, scan_ignore); when a `.gitignore` changes, its workspace
is walked again with the new rules, and the watch set follows.

While a scan runs (the first one, a rescan, a workspace added, a big new
folder), health says which tenants it reads and how far it has got;
subscribers get a `WatcherStatus` event when a scan starts, about four times a
second while it runs, when it ends, and when the watch set's health changes.

Scanning runs in worker threads; the alert store is updated on the event loop,
so subscribers (the dashboard) are called there.

Two gaps of native watchers are covered:
* a folder created a moment ago (`mkdir -p a/b && echo KEY=... > a/b/.env`) may
  have files the watcher never reported: a new folder is walked when it appears,
  and once more shortly after;
* a save by rename reports the old name deleted and the new one added: a
  "deleted" path that exists again is rescanned, not resolved.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchfiles import Change
from watchfiles._rust_notify import RustNotify

from broker.events import WatcherStatus
from broker.leaks.alerts import AlertStore
from broker.leaks.scan import (
    DEFAULT_MAX_BYTES,
    FileScan,
    ManagedSecrets,
    WorkspaceIndex,
    scan_file,
)
from broker.leaks.tree import GITIGNORE, FolderIgnore, walk

log = logging.getLogger(__name__)

SecretsSource = Callable[[], Mapping[tuple[str, str], str]]
IgnoreSource = Mapping[str, Sequence[str]] | Callable[[], Mapping[str, Sequence[str]]]

# Files per worker-thread batch during a full scan: big enough to amortise the
# thread hop, small enough that alerts appear while a large workspace is read.
_BATCH = 256
# A new folder is walked again after this long, in case files landed in it
# before the native watcher had it.
_SETTLE_SECONDS = 0.3
MAX_USER_WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")
# Watches left for every other program of the user (editors, dev servers).
_WATCH_HEADROOM = 0.1
RAISE_LIMIT_HINT = "sudo sysctl fs.inotify.max_user_watches=524288"
_POLL_MS = 500
# Scan progress goes to subscribers at most this often (start and end always).
_STATUS_SECONDS = 0.25
_UNREADABLE_SHOWN = 10  # folders named in health; the count says how many in all
# A new folder with more files than this (a clone, an unpacked archive) shows its scan's progress.
_BIG_FOLDER = 1000


def inotify_budget() -> int | None:
    """Watches this process may still add: the per-user limit, less the watches the
    user's other readable processes hold, less some headroom. None off Linux."""
    try:
        limit = int(MAX_USER_WATCHES.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, int(limit * (1 - _WATCH_HEADROOM)) - inotify_watches_in_use())


def inotify_watches_in_use() -> int:
    """inotify watches held by processes whose /proc entries this user can read."""
    used = 0
    with contextlib.suppress(OSError):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            fd_dir = f"/proc/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:inotify":
                        continue
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        used += sum(1 for line in f if line.startswith("inotify wd:"))
                except OSError:
                    continue
    return used


def _classify(
    changes: Iterable[tuple[int, str]], skipped: Callable[[str], bool]
) -> tuple[set[Path], set[Path], set[Path]]:
    """Split a batch into files to scan, new folders to walk and paths that are gone.

    A few lstat calls on local paths: cheaper inline than a hop to a thread.
    """
    files: set[Path] = set()
    folders: set[Path] = set()
    gone: set[Path] = set()
    for change, raw in changes:
        path = Path(raw)
        if change == Change.deleted and not os.path.lexists(path):
            gone.add(path)  # deleted, or renamed away
        elif path.is_dir() and not path.is_symlink():
            if change != Change.modified and not skipped(raw):  # a folder's mtime changes with its files
                folders.add(path)
        else:
            files.add(path)  # written, appended, or renamed into place
    return files, folders, gone


@dataclass(frozen=True, slots=True)
class WatcherHealth:
    """What `outloop doctor` and the dashboard show about the watcher."""

    running: bool
    initial_scan_done: bool
    workspaces: tuple[str, ...]
    missing: tuple[str, ...]
    files_scanned: int
    last_error: str | None
    files_to_scan: int = 0  # files found by the initial walk (progress: files_scanned of these)
    watched_folders: int = 0  # folders with a native (inotify) watch
    polled_folders: int = 0  # folders past the inotify budget, polled instead
    watch_budget: int | None = None  # inotify watches free for this process at arming
    warning: str | None = None  # a degraded state worth telling the user, with the fix
    # The scan running now, if any: the tenants it reads, what it is, files done of all it
    # found (scan_total is 0 while it is still listing them).
    scanning: tuple[str, ...] = ()
    scan_kind: str = ""  # "first scan" | "rescan" | "workspace added" | ".gitignore changed" | "new folder"
    scan_done: int = 0
    scan_total: int = 0
    scan_listing: bool = False  # still walking the folders: scan_total is not known yet
    # Folders that could not be listed or watched, so nothing in them is scanned or seen.
    unreadable: tuple[str, ...] = ()  # the first few, with why
    unreadable_count: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WatcherHealth:
        """Back from its JSON form (`/v1/health`, the operator channel): lists become tuples
        again, keys this version does not know are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**fields)

    def progress(self) -> str:
        """One line for a scan that runs ("" when none does): 'scanning acme: 1,234 of 5,000 files'."""
        if not self.scanning:
            return ""
        who = ", ".join(self.scanning[:3]) + (f" and {len(self.scanning) - 3} more" if len(self.scanning) > 3 else "")
        what = "" if self.scan_kind in ("", "first scan") else f" ({self.scan_kind})"
        if self.scan_listing:
            return f"scanning {who}{what}: listing files"
        return f"scanning {who}{what}: {self.scan_done:,} of {self.scan_total:,} files"

    def brief(self) -> str:
        """progress() in a few characters, for a status line: 'scanning 3%' ("" when no scan runs)."""
        if not self.scanning:
            return ""
        if self.scan_listing or not self.scan_total:
            return "scanning…"
        return f"scanning {min(99, self.scan_done * 100 // self.scan_total)}%"

    def problems(self) -> list[str]:
        """What the operator should know is not watched, each with what to do."""
        out = [self.warning] if self.warning else []
        if self.unreadable_count:
            shown = "; ".join(self.unreadable[:3])
            more = f" (and {self.unreadable_count - 3} more)" if self.unreadable_count > 3 else ""
            out.append(
                f"{self.unreadable_count} folder(s) could not be read, so they are neither scanned nor watched: "
                f"{shown}{more}; fix their permissions or add them to the tenant's scan_ignore"
            )
        return out


@dataclass(slots=True)
class _Pass:
    """One scan under way, for health: what it is, whose files, how far."""

    kind: str
    tenants: tuple[str, ...]
    total: int | None = None  # None while the folders are being walked
    done: int = 0


class _Native:
    """One watchfiles RustNotify over a fixed list of folders, not recursive."""

    def __init__(self, folders: Sequence[Path], polling: bool) -> None:
        self.folders = list(folders)
        self.polling = polling
        self.closed = False  # stopping: a running `watch` returns at once
        self.retired = False  # replaced: drained one last time, then released
        self.failures = 0  # `watch` calls in a row that raised: the next one waits longer
        self.notify = RustNotify([str(p) for p in self.folders], False, polling, _POLL_MS, False, True)

    def is_set(self) -> bool:  # RustNotify's stop event
        return self.closed

    def close(self) -> None:
        """Ask a running `watch` to return; `release` once it has."""
        self.closed = True

    def release(self) -> None:
        """Give the native watches back (only when no `watch` call is running)."""
        self.closed = True
        with contextlib.suppress(RuntimeError):  # still borrowed by a `watch` cut short at shutdown
            self.notify.close()


def _arm(folders: Sequence[Path], polling: bool) -> tuple[_Native, list[tuple[Path, str]]]:
    """Arm a watcher on the folders that still exist (a folder may vanish meanwhile) and
    can be watched; returns it, and the folders left out for being unwatchable (and why)."""
    present = list(folders)
    refused: list[tuple[Path, str]] = []
    for _ in range(5):
        try:
            return _Native(present, polling), refused
        except FileNotFoundError:
            present = [p for p in present if p.is_dir()]
        except PermissionError:
            denied = [p for p in present if not os.access(p, os.R_OK | os.X_OK)]
            if not denied:
                raise
            refused += [(p, "permission denied") for p in denied]
            present = [p for p in present if p not in set(denied)]
    return _Native([p for p in present if p.is_dir()], polling), refused


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno).lower() if exc.errno else type(exc).__name__


class LeakWatcher:
    """Watches `workspaces` ((tenant, folder) pairs) and keeps `store` up to date.

    `scan_ignore` maps a tenant to extra folder patterns (gitignore-style) that
    its workspaces never scan nor watch, on top of SKIP_DIRS and each workspace's
    `.gitignore`; it may be a function returning that mapping, read again at
    each (re)arm (the engine passes one over its current config).
    """

    def __init__(
        self,
        workspaces: Sequence[tuple[str, Path]],
        secrets: SecretsSource,
        store: AlertStore,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        debounce_ms: int = 200,
        step_ms: int = 20,
        scan_ignore: IgnoreSource | None = None,
        watch_budget: Callable[[], int | None] | None = None,
    ) -> None:
        self._workspaces = [(t, Path(p)) for t, p in workspaces]
        self._index = WorkspaceIndex(self._workspaces)
        self._ignore_source = scan_ignore
        self._ignores: dict[Path, FolderIgnore] = {}
        self._secrets = secrets
        self._store = store
        self._max_bytes = max_bytes
        self._debounce = debounce_ms
        self._step = step_ms
        self._budget_source = watch_budget  # None: inotify_budget, looked up when arming
        self._task: asyncio.Task[None] | None = None
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._ready = asyncio.Event()
        self._scan_tasks: set[asyncio.Task[None]] = set()
        self._managed_key: int | None = None
        self._managed = ManagedSecrets({})
        # When the scan behind each path's current alerts started: a slower, older
        # scan of a path must not overwrite what a newer one found.
        self._scanned_at: dict[Path, float] = {}
        self._files_scanned = 0
        self._files_to_scan = 0
        # The workspaces health names: a new set once its folders are watched.
        self._shown_workspaces = tuple(str(p) for _, p in self._workspaces)
        self._last_error: str | None = None
        self._missing: tuple[str, ...] = ()
        self._scan_ignore: dict[str, tuple[str, ...]] = {}
        self._scan_ignore = self._read_ignore_source()
        # The watch set: every folder the scanner enters, per workspace.
        self._folders: dict[Path, set[Path]] = {}
        self._native: _Native | None = None
        self._polled: _Native | None = None
        self._budget: int | None = None
        self._warning: str | None = None
        self._rebuild_needed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._watching: set[_Native] = set()  # instances with a `watch` call in a thread
        self._passes: list[_Pass] = []  # scans under way
        self._unreadable: dict[Path, dict[str, str]] = {}  # per workspace: folder -> why
        self._refused: dict[str, str] = {}  # folders the last arming could not watch -> why
        self._subscribers: list[Callable[[WatcherStatus], None]] = []
        self._status_sent = 0.0

    def __repr__(self) -> str:
        return f"LeakWatcher({len(self._workspaces)} workspaces)"

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start watching in the background; returns once the native watcher is armed
        (the initial full scan goes on in the background: see `wait_ready`)."""
        if self._task is not None:
            return
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._ready = asyncio.Event()
        armed = asyncio.Event()
        self._task = asyncio.create_task(self._run(armed), name="outloop-leak-watcher")
        waiter = asyncio.create_task(armed.wait())
        await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()

    async def wait_ready(self) -> None:
        """Wait until the initial full scan has been applied (wrap in asyncio.timeout)."""
        await self._ready.wait()

    async def stop(self) -> None:
        """Stop watching and scanning; safe to call twice."""
        self._stopping = True
        self._stop_event.set()
        for t in list(self._scan_tasks):
            t.cancel()
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for w in (self._native, self._polled):
            if w is not None and w not in self._watching:
                w.release()
        self._native = self._polled = None

    def _read_ignore_source(self) -> dict[str, tuple[str, ...]]:
        source = self._ignore_source
        try:
            mapping = source() if callable(source) else (source or {})
        except Exception as exc:  # a config in flux must not stop the watcher
            self._last_error = f"scan_ignore unavailable: {type(exc).__name__}"
            return getattr(self, "_scan_ignore", {})
        return {t: tuple(p) for t, p in mapping.items()}

    async def rearm(self, workspaces: Sequence[tuple[str, Path]], scan_ignore: IgnoreSource | None = None) -> None:
        """Watch a new set of workspaces (one was added or removed).

        Only what changed is walked and scanned: an added workspace (or one whose
        ignore patterns changed) in full; a removed one stops being watched. The
        others keep their watches, so no change of theirs goes unseen meanwhile.
        """
        old = {ws: (t, self._ignores.get(ws)) for t, ws in self._workspaces}
        self._workspaces = [(t, Path(p)) for t, p in workspaces]
        self._index = WorkspaceIndex(self._workspaces)
        if scan_ignore is not None:
            self._ignore_source = scan_ignore
        if self._task is None:
            self._shown_workspaces = tuple(str(p) for _, p in self._workspaces)
            return

        def what_changed() -> list[tuple[str, Path]]:
            changed: list[tuple[str, Path]] = []
            for tenant, ws in self._workspaces:
                before = old.get(ws)
                if before is None or before[0] != tenant or before[1] != self._ignore_for(tenant, ws, fresh=True):
                    changed.append((tenant, ws))
            return changed

        changed = await asyncio.to_thread(what_changed)
        current = {ws for _, ws in self._workspaces}
        async with self._lock:
            for ws in list(self._folders):
                if ws not in current:
                    del self._folders[ws]
                    self._ignores.pop(ws, None)
                    self._unreadable.pop(ws, None)
        self._missing = tuple(str(p) for _, p in self._workspaces if not p.is_dir())
        await self._full_scan(changed, arm=True, kind="workspace added")

    async def rescan(self) -> None:
        """Scan every workspace again (the dashboard's "rescan")."""
        await self._full_scan(list(self._workspaces), arm=False, kind="rescan")

    def subscribe(self, callback: Callable[[WatcherStatus], None]) -> Callable[[], None]:
        """Call `callback` (on the event loop) with each WatcherStatus; returns the unsubscriber."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def _send_status(self, *, now: bool = True) -> None:
        """Tell subscribers the health changed; with `now` False, at most every _STATUS_SECONDS."""
        if not self._subscribers:
            return
        clock = time.monotonic()
        if not now and clock - self._status_sent < _STATUS_SECONDS:
            return
        self._status_sent = clock
        status = WatcherStatus(self.health())
        for callback in list(self._subscribers):
            try:
                callback(status)
            except Exception:  # a subscriber's bug must not stop the watcher
                log.exception("leak watcher: a status subscriber failed")

    def _begin(self, kind: str, workspaces: Sequence[tuple[str, Path]]) -> _Pass:
        scan = _Pass(kind, tuple(dict.fromkeys(t for t, _ in workspaces)))
        self._passes.append(scan)
        self._send_status()
        return scan

    def _end(self, scan: _Pass) -> None:
        if scan in self._passes:
            self._passes.remove(scan)
        self._send_status()

    def health(self) -> WatcherHealth:
        """Running state, counters, the watch set, the scan under way and the last error, in plain data."""
        native = self._native
        polled = self._polled
        passes = list(self._passes)
        unreadable = {f: why for per_ws in self._unreadable.values() for f, why in per_ws.items()}
        unreadable.update(self._refused)
        return WatcherHealth(
            running=self._task is not None and not self._task.done(),
            initial_scan_done=self._ready.is_set(),
            workspaces=self._shown_workspaces,
            missing=self._missing,
            files_scanned=self._files_scanned,
            last_error=self._last_error,
            files_to_scan=self._files_to_scan,
            watched_folders=len(native.folders) if native else 0,
            polled_folders=len(polled.folders) if polled else 0,
            watch_budget=self._budget,
            warning=self._warning,
            scanning=tuple(dict.fromkeys(t for p in passes for t in p.tenants)),
            scan_kind=passes[0].kind if passes else "",
            scan_done=sum(p.done for p in passes),
            scan_total=sum(p.total or 0 for p in passes),
            scan_listing=any(p.total is None for p in passes),
            unreadable=tuple(f"{f} ({why})" for f, why in sorted(unreadable.items())[:_UNREADABLE_SHOWN]),
            unreadable_count=len(unreadable),
        )

    # --- the watch set -----------------------------------------------------------------

    def _ignore_for(self, tenant: str, ws: Path, fresh: bool = False) -> FolderIgnore:
        if fresh or ws not in self._ignores:
            ignore = FolderIgnore.for_workspace(ws, self._scan_ignore.get(tenant, ()))
            if fresh:
                return ignore
            self._ignores[ws] = ignore
        return self._ignores[ws]

    def _skipped(self, raw: str) -> bool:
        owner = self._index.owner_of(raw)
        if owner is None:
            return True
        ignore = self._ignores.get(owner[1])
        return ignore is not None and ignore.skips(raw, os.path.basename(raw))

    async def _rearm_native(self) -> None:
        """Arm watchers on the current watch set, then close the ones they replace."""
        async with self._lock:
            folders = sorted({f for fs in self._folders.values() for f in fs}, key=lambda p: (len(p.parts), p))
            # The watcher being replaced holds its watches until the new one is armed:
            # the budget counts them, so the two never need more than the limit.
            budget = await asyncio.to_thread(self._budget_source or inotify_budget)
            self._budget = budget
            native_part, polled_part = folders, []
            if budget is not None and len(folders) > budget:
                native_part, polled_part = folders[:budget], folders[budget:]
                self._warning = (
                    f"inotify watch limit too low: {len(polled_part):,} of {len(folders):,} folders are polled "
                    f"(changes there are seen within about {_POLL_MS} ms, at some CPU cost); raise it with "
                    f"`{RAISE_LIMIT_HINT}`"
                )
                log.warning("leak watcher: %s", self._warning)
            else:
                self._warning = None
            refused: list[tuple[Path, str]] = []
            try:
                native, refused = await asyncio.to_thread(_arm, native_part, False)
            except OSError as exc:  # the limit was reached after all: poll everything
                self._warning = (
                    f"inotify watches could not be placed ({exc}); every folder is polled; "
                    f"raise the limit with `{RAISE_LIMIT_HINT}`"
                )
                log.warning("leak watcher: %s", self._warning)
                native, _ = await asyncio.to_thread(_arm, [], False)
                polled_part = [f for f in folders if f not in {p for p, _ in refused}]
            polled = None
            if polled_part:
                polled, more = await asyncio.to_thread(_arm, polled_part, True)
                refused += more
            self._refused = {str(p): why for p, why in refused}
            if refused:
                log.warning("leak watcher: %d folder(s) cannot be watched, e.g. %s", len(refused), refused[0][0])
            old = (self._native, self._polled)
            self._native, self._polled = native, polled
            # The replaced watchers may hold changes made before the new ones were
            # armed: they are drained once more, then released.
            for w in old:
                if w is not None:
                    w.retired = True
                    if w not in self._watching:
                        self._spawn(self._drain(w))
        self._send_status()

    # --- the loop ----------------------------------------------------------------------

    async def _run(self, armed: asyncio.Event) -> None:
        try:
            self._missing = tuple(str(p) for _, p in self._workspaces if not p.is_dir())
            if self._missing:
                self._last_error = "workspace folder not found: " + ", ".join(self._missing)
            first = self._begin("first scan", self._workspaces)
            try:
                listing = await self._arm_and_list(list(self._workspaces), first)
            except BaseException:
                self._end(first)
                raise
            armed.set()
            self._spawn(self._initial_scan(listing, first))
            await self._watch_loop()
        except Exception as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.exception("leak watcher stopped")
        finally:
            armed.set()

    async def _watch_loop(self) -> None:
        pending: dict[asyncio.Future[Any], _Native] = {}
        while not self._stop_event.is_set():
            for w in (self._native, self._polled):
                if w is not None and not (w.closed or w.retired) and w not in self._watching:
                    call: asyncio.Future[Any] = asyncio.ensure_future(self._watch_once(w))
                    pending[call] = w
                    self._watching.add(w)
            stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop_event.wait())
            done, _ = await asyncio.wait([*pending, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            for fut in done:
                if fut is stop:
                    continue
                w = pending.pop(fut)
                self._watching.discard(w)
                try:
                    result = fut.result()
                    w.failures = 0
                except Exception as exc:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("leak watcher: watching failed")
                    result = None
                    w.failures += 1
                if w.closed:
                    w.release()
                    continue
                if isinstance(result, set) and result:
                    await self._handle_safely(result)
                if w.retired:
                    self._spawn(self._drain(w))
        for w in pending.values():
            w.close()
        if pending:
            await asyncio.wait(list(pending), timeout=5)
        for fut, w in pending.items():
            self._watching.discard(w)
            if fut.done():
                w.release()

    async def _watch_once(self, w: _Native) -> Any:
        """One `watch` call in a thread; after failures, only once a pause has passed (a
        poller that fails on every pass, say on an entry whose path is too long, must not spin)."""
        if w.failures:
            with contextlib.suppress(TimeoutError):  # a stop ends the pause
                await asyncio.wait_for(self._stop_event.wait(), min(30.0, 0.5 * 2**w.failures))
            if w.closed or w.retired or self._stop_event.is_set():
                return None
        return await asyncio.to_thread(w.notify.watch, self._debounce, self._step, 1000, w)

    async def _handle_safely(self, changes: set[tuple[int, str]]) -> None:
        try:
            await self._handle(changes)
        except Exception as exc:  # keep watching whatever one batch did
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.exception("leak watcher: handling changes failed")

    async def _drain(self, w: _Native) -> None:
        try:
            result = await asyncio.to_thread(w.notify.watch, self._debounce, self._step, 50, w)
            if isinstance(result, set) and result and not self._stopping:
                await self._handle_safely(result)
        finally:
            w.release()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._scan_tasks.add(task)
        task.add_done_callback(self._scan_tasks.discard)

    async def _initial_scan(self, listing: dict[Path, list[Path]], first: _Pass) -> None:
        try:
            await self._scan_listing(listing, first)
        finally:
            self._ready.set()
            self._end(first)

    # --- scanning ------------------------------------------------------------------------

    def _current_managed(self) -> ManagedSecrets:
        try:
            mapping = dict(self._secrets())
        except Exception as exc:  # a locked keyring must not stop leak rules
            self._last_error = f"managed secrets unavailable: {type(exc).__name__}"
            return self._managed
        key = hash(frozenset(mapping.items()))
        if key != self._managed_key:
            self._managed, self._managed_key = ManagedSecrets(mapping), key
        return self._managed

    def _scan_paths(self, paths: Iterable[Path], managed: ManagedSecrets, index: WorkspaceIndex) -> list[FileScan]:
        results: list[FileScan] = []
        for path in paths:
            owner = index.owner_of(path)
            if owner is None:
                continue
            tenant, ws = owner
            results.append(scan_file(path, tenant=tenant, workspace=ws, managed=managed, max_bytes=self._max_bytes))
        return results

    def _apply(self, results: Iterable[FileScan], started: float) -> None:
        for result in results:
            if self._scanned_at.get(result.path, 0.0) > started:
                continue  # a newer scan of this file was applied already
            if result.skipped is None:
                self._files_scanned += 1
                self._scanned_at[result.path] = started
                self._store.reconcile_file(result.path, result.findings)
            elif result.skipped == "missing":
                self._scanned_at[result.path] = started
                self._store.resolve_path(result.path)
            # binary, too large, unreadable: leave any alert as it is

    async def _scan_and_apply(self, paths: Sequence[Path], progress: _Pass | None = None) -> None:
        started = time.monotonic()
        index = self._index
        managed = self._current_managed()
        for i in range(0, len(paths), _BATCH):
            chunk = paths[i : i + _BATCH]
            results = await asyncio.to_thread(self._scan_paths, chunk, managed, index)
            self._apply(results, started)
            if progress is not None:
                progress.done += len(chunk)
                self._send_status(now=False)

    def _walk_workspaces(
        self, workspaces: Sequence[tuple[str, Path]]
    ) -> dict[Path, tuple[FolderIgnore, list[Path], list[Path], dict[str, str]]]:
        out: dict[Path, tuple[FolderIgnore, list[Path], list[Path], dict[str, str]]] = {}
        for tenant, root in workspaces:
            if root.is_dir():
                ignore = self._ignore_for(tenant, root, fresh=True)
                errors: dict[str, str] = {}
                files, folders = walk(root, ignore, _noting(errors))
                out[root] = (ignore, files, folders, errors)
        return out

    async def _walk_all(self, workspaces: Sequence[tuple[str, Path]]) -> tuple[dict[Path, list[Path]], bool]:
        """Walk `workspaces` in a thread; record their folders in the watch set.
        Returns their files, and whether the watch set gained a folder."""
        walked = await asyncio.to_thread(self._walk_workspaces, workspaces)
        grew = False
        async with self._lock:
            for root, (ignore, _files, folders, errors) in walked.items():
                self._ignores[root] = ignore
                found = set(folders)
                grew = grew or not found.issubset(self._folders.get(root, ()))
                self._folders[root] = found
                self._unreadable[root] = errors
            for _, root in workspaces:
                if root not in walked:
                    self._unreadable.pop(root, None)
        return {root: files for root, (_i, files, _f, _e) in walked.items()}, grew

    async def _arm_and_list(
        self, workspaces: Sequence[tuple[str, Path]], progress: _Pass | None = None
    ) -> dict[Path, list[Path]]:
        """Walk, arm, walk again: whatever was made before the watches were in place
        is in the second walk, whatever comes after is reported by the watches."""
        await self._walk_all(workspaces)
        await self._rearm_native()
        listing, grew = await self._walk_all(workspaces)
        if grew:
            await self._rearm_native()
        found = sum(len(f) for f in listing.values())
        self._files_to_scan += found
        self._shown_workspaces = tuple(str(p) for _, p in self._workspaces)
        if progress is not None:
            progress.total = found
            self._send_status()
        return listing

    async def _scan_listing(self, listing: dict[Path, list[Path]], progress: _Pass | None = None) -> None:
        for root, paths in listing.items():
            await self._scan_and_apply(paths, progress)
            self._store.resolve_absent(root, paths)

    async def _full_scan(self, workspaces: Sequence[tuple[str, Path]], *, arm: bool, kind: str) -> None:
        # A removal alone scans nothing, but the watch set still loses its folders.
        scan = self._begin(kind, workspaces) if workspaces else None
        try:
            if arm:
                listing = await self._arm_and_list(workspaces, scan)
            else:
                listing = (await self._walk_all(workspaces))[0]
                if scan is not None:
                    scan.total = sum(len(f) for f in listing.values())
                    self._send_status()
            await self._scan_listing(listing, scan)
        finally:
            if scan is not None:
                self._end(scan)

    async def _rules_changed(self, roots: set[Path]) -> None:
        """A `.gitignore` in these workspaces changed: walk them again with the new rules.
        Folders now ignored stop being watched (an open alert there stays open, as after a
        restart: the file still holds the value); folders now entered are watched, then scanned."""
        pairs = [(t, ws) for t, ws in self._workspaces if ws in roots]
        before = {ws: set(self._folders.get(ws, ())) for _, ws in pairs}
        scan = self._begin(".gitignore changed", pairs)
        try:
            listing = await self._arm_and_list(pairs)
            fresh = [f for root, files in listing.items() for f in files if f.parent not in before[root]]
            scan.total = len(fresh)
            await self._scan_and_apply(fresh, scan)
        finally:
            self._end(scan)

    async def _walk_and_scan(self, folder: Path) -> int:
        owner = self._index.owner_of(folder)
        if owner is None:
            return 0
        errors: dict[str, str] = {}
        files, folders = await asyncio.to_thread(walk, folder, self._ignores.get(owner[1]), _noting(errors))
        known = self._folders.setdefault(owner[1], set())
        if not known.issuperset(folders):
            known.update(folders)
            self._rebuild_needed.set()
        if errors:
            self._unreadable.setdefault(owner[1], {}).update(errors)
            self._send_status()
        if len(files) > _BIG_FOLDER:
            scan = self._begin("new folder", [owner])
            scan.total = len(files)
            try:
                await self._scan_and_apply(files, scan)
            finally:
                self._end(scan)
        else:
            await self._scan_and_apply(files)
        return len(files)

    async def _settle_folder(self, folder: Path) -> None:
        await asyncio.sleep(_SETTLE_SECONDS)
        await self._walk_and_scan(folder)  # a folder gone by now walks as empty
        await self._rebuild_if_needed()

    async def _rebuild_if_needed(self) -> None:
        if self._rebuild_needed.is_set() and not self._stopping:
            self._rebuild_needed.clear()
            await self._rearm_native()

    def _in_watch_set(self, path: Path) -> bool:
        owner = self._index.owner_of(path)
        return owner is not None and path.parent in self._folders.get(owner[1], ())

    async def _handle(self, changes: set[tuple[int, str]]) -> None:
        files, folders, gone = _classify(changes, self._skipped)
        # A watcher being replaced may still report a folder just left out (a .gitignore now ignores it).
        files = {f for f in files if self._in_watch_set(f)}
        for path in gone:
            self._scanned_at[path] = time.monotonic()
            self._store.resolve_path(path)
            for known in self._folders.values():
                known.discard(path)
            for per_ws in self._unreadable.values():
                per_ws.pop(str(path), None)
        if files:
            await self._scan_and_apply(sorted(files))
        for folder in folders:
            count = await self._walk_and_scan(folder)
            if count < _BIG_FOLDER:  # a big new tree (a clone) is not walked twice
                self._spawn(self._settle_folder(folder))
        rules = {
            owner[1]
            for path in (*files, *gone)
            if path.name == GITIGNORE and (owner := self._index.owner_of(path)) is not None
        }
        if rules:
            await self._rules_changed(rules)
        await self._rebuild_if_needed()


def _noting(errors: dict[str, str]) -> Callable[[OSError], None]:
    """A walk's on_error that notes each folder it could not list (one gone meanwhile is not news)."""

    def note(exc: OSError) -> None:
        if exc.errno != errno.ENOENT and exc.filename:
            errors[str(exc.filename)] = _why(exc)

    return note
