"""`outloop scan` and `outloop alerts`.

`scan` is a one-shot check, like a linter: it prints what it finds and exits 1
when anything is found (2 for a usage or configuration error). It does not
write to the alert store; that is the watcher's job, so that a scan of some
folder outside every workspace never leaves alerts behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from broker.config import Config, ConfigError, load_config
from broker.leaks.alerts import Alert, AlertStore
from broker.leaks.scan import (
    DEFAULT_MAX_BYTES,
    FolderIgnore,
    ManagedSecrets,
    ScanReport,
    WorkspaceIndex,
    iter_files,
    scan_files,
)
from broker.paths import Paths
from outloop_tui.cli import UserError

EXIT_FOUND = 1
EXIT_ERROR = 2


def _load(paths: Paths) -> Config | None:
    if not paths.config_file.exists():
        return None
    try:
        return load_config(paths)
    except ConfigError as e:
        raise UserError(str(e), code=EXIT_ERROR) from None


def _managed(config: Config | None) -> tuple[ManagedSecrets, str | None]:
    """The keyring's secrets for every configured credential, or a note saying why not."""
    if config is None:
        return ManagedSecrets({}), None
    keys = [(t.id, name) for t in config.tenants.values() for name in t.credentials]
    if not keys:
        return ManagedSecrets({}), None
    try:
        from broker.secrets import SecretStore

        found = SecretStore().managed(keys)
    except Exception as e:  # the leak rules still run without the keyring
        return ManagedSecrets(
            {}
        ), f"the keyring could not be read ({type(e).__name__}); managed secrets were not checked"
    return ManagedSecrets({k: s.reveal() for k, s in found.items()}), None


def _targets(args: argparse.Namespace, config: Config | None) -> list[Path]:
    if args.paths:
        targets = []
        for raw in args.paths:
            path = Path(raw).expanduser()
            if not path.exists():
                raise UserError(f"{raw} does not exist; pass a file or folder to scan", code=EXIT_ERROR)
            targets.append(path.resolve())
        return targets
    workspaces = [ws for t in (config.tenants.values() if config else []) for ws in t.workspaces]
    if not workspaces:
        raise UserError(
            "no workspaces are mapped; pass a PATH, or map a folder with `outloop workspace add TENANT PATH`",
            code=EXIT_ERROR,
        )
    return [ws for ws in workspaces if ws.exists()]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def run_scan(args: argparse.Namespace) -> int:
    """Scan the given paths (default: every mapped workspace); exit 1 if anything leaks."""
    paths = Paths.from_env()
    config = _load(paths)
    targets = _targets(args, config)
    managed, note = _managed(config)
    if note:
        print(f"outloop: note: {note}", file=sys.stderr)
    workspaces = [(t.id, ws) for t in config.tenants.values() for ws in t.workspaces] if config else []
    index = WorkspaceIndex(workspaces)
    max_bytes = config.broker.scan_max_file_bytes if config else DEFAULT_MAX_BYTES
    report = ScanReport()
    seen: set[Path] = set()
    items: list[tuple[Path, str | None, Path | None]] = []

    def unreadable(_exc: OSError) -> None:
        report.skipped["unreadable"] = report.skipped.get("unreadable", 0) + 1

    for target in targets:
        owner_of_target = index.owner_of(target)
        tenant_of_target, root = owner_of_target if owner_of_target else (None, target)
        extra = config.tenants[tenant_of_target].scan_ignore if config and tenant_of_target else ()
        ignore = FolderIgnore.for_workspace(root, extra)
        for path in iter_files(target, unreadable, ignore):
            if path in seen:  # overlapping PATH arguments
                continue
            seen.add(path)
            owner = index.owner_of(path)
            tenant, ws = owner if owner else (None, None)
            items.append((path, tenant, ws))
    # One process per core: the scan is pure CPU once the files are in the page cache.
    for result in scan_files(
        items, managed=managed, all_files=args.all_files, max_bytes=max_bytes, processes=os.cpu_count() or 1
    ):
        report.add(result)
    alerts = [Alert.from_finding(f) for f in report.findings]
    if args.json:
        print(json.dumps([a.to_json() for a in alerts], indent=2))
    else:
        _print_human(alerts, report)
    return EXIT_FOUND if alerts else 0


def _print_human(alerts: list[Alert], report: ScanReport) -> None:
    for a in alerts:
        owner = f"  ({a.tenant})" if a.tenant else ""
        print(f"{a.severity.upper():8}  {a.path}:{a.line}  {a.rule}  {a.preview}{owner}")
    files = len({a.path for a in alerts})
    skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in sorted(report.skipped.items()))
    detail = f"{_plural(report.files_scanned, 'file')} scanned, {report.bytes_scanned / 1e6:.1f} MB" + (
        f"; skipped {skipped}" if skipped else ""
    )
    if alerts:
        print(f"{_plural(len(alerts), 'leak')} in {_plural(files, 'file')} ({detail})")
    else:
        print(f"no leaks found ({detail})")


def run_alerts(args: argparse.Namespace) -> int:
    """List the current (open and ignored) leak alerts recorded by the watcher."""
    store = AlertStore(Paths.from_env().alerts_file)
    alerts = store.alerts()
    if args.json:
        out: list[dict[str, Any]] = [a.to_json() for a in alerts]
        print(json.dumps(out, indent=2))
        return 0
    if not alerts:
        print("no leak alerts")
        return 0
    for a in alerts:
        owner = f"  ({a.tenant})" if a.tenant else ""
        state = "" if a.status == "open" else f"  [ignored: {a.reason or 'no reason'}]"
        print(f"{a.severity.upper():8}  {a.path}:{a.line}  {a.rule}  {a.preview}  {a.fingerprint[:12]}{owner}{state}")
    return 0
