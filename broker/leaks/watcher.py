"""The leak watcher: one watchfiles watcher over every workspace.

Order of work: arm the native watcher, then scan every workspace in full (so a
write during the initial scan is seen by one or the other), then rescan each
file that changes. Scanning runs in worker threads; the alert store is updated
on the event loop, so subscribers (the dashboard) are called there.

Two gaps of native watchers are covered here:
* a folder created a moment ago (`mkdir -p a/b && echo KEY=... > a/b/.env`) may
  have files the watcher never reported: a new folder is walked when it appears,
  and once more shortly after;
* a save by rename reports the old name deleted and the new one added: a
  "deleted" path that exists again is rescanned, not resolved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchfiles import Change, DefaultFilter, awatch

from broker.leaks.alerts import AlertStore
from broker.leaks.scan import (
    DEFAULT_MAX_BYTES,
    SKIP_DIRS,
    FileScan,
    ManagedSecrets,
    iter_files,
    owner_of,
    scan_file,
)

log = logging.getLogger(__name__)

SecretsSource = Callable[[], Mapping[tuple[str, str], str]]

# Files per worker-thread batch during a full scan: big enough to amortise the
# thread hop, small enough that alerts appear while a large workspace is read.
_BATCH = 256
# A new folder is walked again after this long, in case files landed in it
# before the native watcher had it.
_SETTLE_SECONDS = 0.3


def _list_files(root: Path) -> list[Path]:
    return list(iter_files(root))


def _classify(changes: set[tuple[Change, str]]) -> tuple[set[Path], set[Path], set[Path]]:
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
            if change != Change.modified:  # a folder's mtime changes with its files
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


class LeakWatcher:
    """Watches `workspaces` ((tenant, folder) pairs) and keeps `store` up to date."""

    def __init__(
        self,
        workspaces: Sequence[tuple[str, Path]],
        secrets: SecretsSource,
        store: AlertStore,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        debounce_ms: int = 200,
        step_ms: int = 20,
    ) -> None:
        self._workspaces = [(t, Path(p)) for t, p in workspaces]
        self._secrets = secrets
        self._store = store
        self._max_bytes = max_bytes
        self._debounce = debounce_ms
        self._step = step_ms
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
        self._last_error: str | None = None
        self._missing: tuple[str, ...] = ()

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

    async def rearm(self, workspaces: Sequence[tuple[str, Path]]) -> None:
        """Watch a new set of workspaces (one was added or removed).

        Every workspace is scanned again once the new watcher is armed, since
        changes made while re-arming would otherwise go unseen.
        """
        self._workspaces = [(t, Path(p)) for t, p in workspaces]
        if self._task is None:
            return
        await self.stop()
        await self.start()

    async def rescan(self) -> None:
        """Scan every workspace again (the dashboard's "rescan")."""
        await self._full_scan(list(self._workspaces))

    def health(self) -> WatcherHealth:
        """Running state, counters and the last error, in plain data."""
        return WatcherHealth(
            running=self._task is not None and not self._task.done(),
            initial_scan_done=self._ready.is_set(),
            workspaces=tuple(str(p) for _, p in self._workspaces),
            missing=self._missing,
            files_scanned=self._files_scanned,
            last_error=self._last_error,
        )

    # --- the loop ----------------------------------------------------------------------

    async def _run(self, armed: asyncio.Event) -> None:
        roots = [p for _, p in self._workspaces if p.is_dir()]
        self._missing = tuple(str(p) for _, p in self._workspaces if not p.is_dir())
        if self._missing:
            self._last_error = "workspace folder not found: " + ", ".join(self._missing)
        if not roots:
            armed.set()
            self._ready.set()
            await self._stop_event.wait()
            return
        changes_iter = awatch(
            *roots,
            watch_filter=DefaultFilter(ignore_dirs=sorted(SKIP_DIRS)),
            debounce=self._debounce,
            step=self._step,
            stop_event=self._stop_event,
            rust_timeout=1000,
            ignore_permission_denied=True,
        )
        pending: asyncio.Future[set[tuple[Change, str]]] = asyncio.ensure_future(anext(changes_iter))
        try:
            # awatch creates the native watcher before its first await: once the
            # pending call has run that far, writes are being recorded.
            for _ in range(3):
                await asyncio.sleep(0)
            armed.set()
            self._spawn(self._initial_scan())
            while True:
                try:
                    changes = await pending
                except StopAsyncIteration:
                    break
                try:
                    await self._handle(changes)
                except Exception as exc:  # keep watching whatever one batch did
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("leak watcher: handling changes failed")
                pending = asyncio.ensure_future(anext(changes_iter))
        except Exception as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.exception("leak watcher stopped")
        finally:
            armed.set()
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
            with contextlib.suppress(Exception):
                await changes_iter.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._scan_tasks.add(task)
        task.add_done_callback(self._scan_tasks.discard)

    async def _initial_scan(self) -> None:
        await self._full_scan(list(self._workspaces))
        self._ready.set()

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

    def _scan_paths(
        self, paths: Iterable[Path], managed: ManagedSecrets, workspaces: Sequence[tuple[str, Path]]
    ) -> list[FileScan]:
        results: list[FileScan] = []
        for path in paths:
            owner = owner_of(path, workspaces)
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

    async def _scan_and_apply(self, paths: Sequence[Path]) -> None:
        started = time.monotonic()
        workspaces = list(self._workspaces)
        managed = self._current_managed()
        for i in range(0, len(paths), _BATCH):
            chunk = paths[i : i + _BATCH]
            results = await asyncio.to_thread(self._scan_paths, chunk, managed, workspaces)
            self._apply(results, started)

    async def _walk_and_scan(self, folder: Path) -> int:
        paths = await asyncio.to_thread(_list_files, folder)
        await self._scan_and_apply(paths)
        return len(paths)

    async def _full_scan(self, workspaces: Sequence[tuple[str, Path]]) -> None:
        for _, root in workspaces:
            if not root.is_dir():
                continue
            paths = await asyncio.to_thread(_list_files, root)
            await self._scan_and_apply(paths)
            self._store.resolve_absent(root, paths)

    async def _settle_folder(self, folder: Path) -> None:
        await asyncio.sleep(_SETTLE_SECONDS)
        await self._walk_and_scan(folder)  # a folder gone by now walks as empty

    async def _handle(self, changes: set[tuple[Change, str]]) -> None:
        files, folders, gone = _classify(changes)
        for path in gone:
            self._scanned_at[path] = time.monotonic()
            self._store.resolve_path(path)
        if files:
            await self._scan_and_apply(sorted(files))
        for folder in folders:
            count = await self._walk_and_scan(folder)
            if count < 1000:  # a big new tree (a clone) is not walked twice
                self._spawn(self._settle_folder(folder))
