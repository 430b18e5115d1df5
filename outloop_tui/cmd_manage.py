"""Tenant, workspace and credential management, and `outloop doctor`."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import stat
import sys
from typing import Any

from broker import manage
from broker.config import ConfigError, load_config
from broker.paths import PathError, Paths
from broker.secrets import Secret, SecretStore, SecretStoreError, backend_info
from outloop_tui.cli import USAGE_EXIT, UserError


def _paths() -> Paths:
    return Paths.from_env()


def tenant_add(args: argparse.Namespace) -> int:
    manage.add_tenant(_paths(), args.tenant, args.display)
    print(f"added tenant {args.tenant}; map a folder with `outloop workspace add {args.tenant} PATH`")
    return 0


def _flag_error(e: manage.BadField) -> UserError:
    """A field's problem worded as the flag that gave it."""
    flag = "--" + e.field.replace("_", "-")
    if e.field == "base_url":
        return UserError(f"{flag} {e.problem}")
    return UserError(f"{flag}: {e.problem}")


def confirm(args: argparse.Namespace, question: str) -> None:
    """Ask before a destructive step; `--yes` answers for scripts, and no terminal without it refuses."""
    if getattr(args, "yes", False):
        return
    if not sys.stdin.isatty():
        raise UserError(f"{question} Nothing was changed: add --yes to confirm when not at a terminal.")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UserError("nothing was changed")


def tenant_rm(args: argparse.Namespace) -> int:
    config = load_config(_paths())
    tenant = config.tenants.get(args.tenant)
    if tenant is not None and tenant.credentials:
        names = ", ".join(sorted(tenant.credentials))
        confirm(args, f"Remove tenant {args.tenant} and delete the keyring secrets of {names}?")
    elif tenant is not None:
        confirm(args, f"Remove tenant {args.tenant}?")
    credentials = manage.remove_tenant(_paths(), args.tenant, SecretStore())
    print(f"removed tenant {args.tenant} and {len(credentials)} credential secret(s)")
    return 0


def tenant_list(args: argparse.Namespace) -> int:
    config = load_config(_paths())
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": t.id,
                        "name": t.name,
                        "workspaces": [str(w) for w in t.workspaces],
                        "credentials": sorted(t.credentials),
                    }
                    for t in config.tenants.values()
                ],
                indent=2,
            )
        )
        return 0
    if not config.tenants:
        print("no tenants yet; add one with `outloop tenant add NAME`")
    for t in config.tenants.values():
        print(f"{t.id}  {t.name}")
        for ws in t.workspaces:
            print(f"  workspace   {ws}")
        for c in t.credentials.values():
            print(f"  credential  {c.name}  {c.base_url}  ({c.rule_summary()})")
    return 0


def workspace_add(args: argparse.Namespace) -> int:
    path = manage.add_workspace(_paths(), args.tenant, args.path)
    note = "" if path.is_dir() else " (the folder does not exist yet)"
    print(f"mapped {path} to tenant {args.tenant}{note}")
    return 0


def workspace_rm(args: argparse.Namespace) -> int:
    tenant = manage.remove_workspace(_paths(), args.path)
    print(f"unmapped {args.path} from tenant {tenant}")
    return 0


def workspace_list(args: argparse.Namespace) -> int:
    config = load_config(_paths())
    rows = [
        {"tenant": t.id, "path": str(ws), "exists": ws.is_dir()} for t in config.tenants.values() for ws in t.workspaces
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no workspaces yet; map one with `outloop workspace add TENANT PATH`")
    for r in rows:
        print(f"{r['tenant']:<16} {r['path']}{'' if r['exists'] else '  (missing)'}")
    return 0


def read_secret(prompt: str) -> Secret:
    """The secret from a hidden prompt, or from stdin when stdin is not a terminal."""
    if sys.stdin.isatty():
        value = getpass.getpass(prompt)
    else:
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
    if not value.strip():
        raise UserError("no secret given: type it at the prompt or pipe it on standard input")
    if "\n" in value or "\r" in value:
        raise UserError("the secret holds a line break; give it on a single line")
    return Secret(value)


def _provider_fields(args: argparse.Namespace) -> tuple[str, str, list[str], list[str]]:
    """Base URL, auth, allow and ask: as given, else from `--provider`'s catalog entry."""
    from broker.providers import PROVIDERS, provider_named, template_fields

    base_url, auth, allow, ask = args.base_url, args.auth, list(args.allow), list(args.ask)
    if args.provider is None:
        if base_url is None:
            raise UserError("give --base-url URL, or --provider NAME for a known provider", USAGE_EXIT)
        return base_url, auth or "bearer", allow, ask
    provider = provider_named(args.provider)
    if provider is None:
        known = ", ".join(p.name for p in PROVIDERS)
        raise UserError(f"--provider {args.provider!r} is not in the catalog; known: {known}")
    if base_url is None:
        if template_fields(provider.base_url):
            raise UserError(f"{provider.title}'s API lives at your project's own URL: give --base-url URL")
        base_url = provider.base_url
    if auth is None:
        if template_fields(provider.auth):
            kind = provider.auth.partition(":")[0]
            raise UserError(f"{provider.title} authenticates as {kind}:<user>: give --auth {kind}:<user>")
        auth = provider.auth
    if not (allow or ask or args.deny):  # rules given replace the catalog's
        allow, ask = list(provider.allow), list(provider.ask)
    return base_url, auth, allow, ask


def credential_add(args: argparse.Namespace) -> int:
    base_url, auth, allow, ask = _provider_fields(args)
    try:
        new = manage.check_credential(
            _paths(),
            args.tenant,
            args.name,
            base_url=base_url,
            auth=auth,
            allow=allow,
            ask=ask,
            deny=args.deny,
        )
    except manage.BadField as e:
        raise _flag_error(e) from None
    secret = read_secret(f"Secret for {args.tenant}/{args.name} (input hidden): ")
    manage.add_credential(new, secret, SecretStore())
    print(f"added credential {args.name} to tenant {args.tenant}; its secret is in the keyring")
    return 0


def credential_rm(args: argparse.Namespace) -> int:
    tenant = load_config(_paths()).tenants.get(args.tenant)
    if tenant is not None and args.name in tenant.credentials:  # else the removal says what is missing
        confirm(args, f"Remove credential {args.tenant}/{args.name} and delete its secret from the keyring?")
    manage.remove_credential(_paths(), args.tenant, args.name, SecretStore())
    print(f"removed credential {args.name} of tenant {args.tenant} and its secret")
    return 0


def credential_set_secret(args: argparse.Namespace) -> int:
    paths = _paths()
    config = load_config(paths)
    tenant = config.tenants.get(args.tenant)
    if tenant is None or args.name not in tenant.credentials:
        raise UserError(f"tenant {args.tenant!r} has no credential {args.name!r}; add it with `outloop credential add`")
    secret = read_secret(f"New secret for {args.tenant}/{args.name} (input hidden): ")
    manage.set_secret(paths, args.tenant, args.name, secret, SecretStore())
    print(f"rotated the secret of {args.tenant}/{args.name}; its base URL, auth and rules are unchanged")
    return 0


def credential_edit(args: argparse.Namespace) -> int:
    if not (args.base_url or args.auth or args.allow or args.ask or args.deny or args.clear_rules):
        raise UserError("nothing to change: give --base-url, --auth, --allow, --ask, --deny or --clear-rules")
    try:
        manage.edit_credential(
            _paths(),
            args.tenant,
            args.name,
            base_url=args.base_url,
            auth=args.auth,
            allow=args.allow or None,
            ask=args.ask or None,
            deny=args.deny or None,
            clear_rules=args.clear_rules,
        )
    except manage.BadField as e:
        raise _flag_error(e) from None
    print(f"updated credential {args.tenant}/{args.name}; its secret is unchanged")
    return 0


def credential_list(args: argparse.Namespace) -> int:
    config = load_config(_paths())
    store = SecretStore()
    rows: list[dict[str, Any]] = []
    for c in config.credentials():
        try:
            present = store.get(c.tenant, c.name) is not None
        except SecretStoreError:
            present = False
        rows.append(
            {
                "tenant": c.tenant,
                "name": c.name,
                "base_url": c.base_url,
                "auth": str(c.auth),
                "allow": list(c.allow),
                "ask": list(c.ask),
                "deny": list(c.deny),
                "secret_in_keyring": present,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no credentials yet; add one with `outloop credential add TENANT NAME --base-url URL`")
    for r in rows:
        missing = "" if r["secret_in_keyring"] else "  [no secret in keyring]"
        print(f"{r['tenant']}/{r['name']}  {r['base_url']}  auth={r['auth']}{missing}")
        for kind in ("deny", "allow", "ask"):
            for rule in r[kind]:
                print(f"    {kind:<5} {rule}")
        if not (r["allow"] or r["ask"] or r["deny"]):
            print("    (no rules: every call asks the operator)")
    return 0


def doctor(args: argparse.Namespace) -> int:
    """Check keyring, config, paths, socket and broker, and say what to fix in plain words."""
    checks: list[tuple[bool | None, str]] = []

    def line(ok: bool | None, what: str) -> None:
        checks.append((ok, what))

    paths = _paths()
    watcher_json: dict[str, Any] | None = None
    info = backend_info()
    line(info.usable, f"keyring backend: {info.name}" + ("" if info.usable else f" — {info.advice}"))
    from broker.sandbox import probe

    sandboxed, why = probe()  # optional: a note, not a failure, when `outloop run --sandbox` cannot work here
    line(True if sandboxed else None, f"sandbox (outloop run --sandbox): {why}")

    config = None
    if not paths.config_file.exists():
        line(None, f"config: {paths.config_file} does not exist yet (`outloop tenant add NAME`)")
    else:
        try:
            config = load_config(paths)
            n_ws = sum(len(t.workspaces) for t in config.tenants.values())
            n_cred = sum(len(t.credentials) for t in config.tenants.values())
            line(
                True,
                f"config: {paths.config_file} — {len(config.tenants)} tenant(s), "
                f"{n_ws} workspace(s), {n_cred} credential(s)",
            )
        except ConfigError as e:
            line(False, f"config: {e}")
        mode = stat.S_IMODE(paths.config_file.stat().st_mode)
        if mode & 0o077:
            line(False, f"config: {paths.config_file} is mode {mode:o}; run `chmod 600` on it")

    if config is not None:
        for t in config.tenants.values():
            for ws in t.workspaces:
                if not ws.is_dir():
                    line(None, f"workspace {ws} of {t.id} does not exist")
        if info.usable:
            store = SecretStore()
            for c in config.credentials():
                try:
                    if store.get(c.tenant, c.name) is None:
                        line(
                            False,
                            f"credential {c.tenant}/{c.name} has no secret in the keyring; "
                            f"add it again with `outloop credential add`",
                        )
                except SecretStoreError as e:
                    line(False, str(e))
                    break

    if paths.state_dir.exists():
        mode = stat.S_IMODE(paths.state_dir.stat().st_mode)
        line(not mode & 0o077, f"state: {paths.state_dir} (mode {mode:o})")
    else:
        line(None, f"state: {paths.state_dir} will be created on first start")

    try:
        paths.check_socket_path()
    except PathError as e:
        line(False, str(e))
    else:
        from broker.client import BrokerUnreachable, health

        try:
            h = health(paths.socket)
        except BrokerUnreachable:
            line(None, f"socket: {paths.socket} — no broker running (start `outloop` or `outloop broker`)")
        else:
            line(
                True,
                f"socket: {paths.socket} — broker {h.get('version', '?')} answering"
                f"{' (locked)' if h.get('locked') else ''}",
            )
            if isinstance(h.get("watcher"), dict):
                from broker.leaks.watcher import WatcherHealth

                watcher_json = h["watcher"]
                w = WatcherHealth.from_dict(watcher_json)
                detail = w.last_error or f"{w.files_scanned:,} files scanned"
                detail += f"; {w.watched_folders:,} folders watched"
                if w.polled_folders:
                    detail += f", {w.polled_folders:,} polled"
                if w.missing:
                    detail += f"; missing folders: {', '.join(w.missing)}"
                line(w.running and not w.last_error, f"watcher: {'running' if w.running else 'stopped'} — {detail}")
                if w.scanning:  # "0 alerts" means little until the files have all been read
                    line(None, f"watcher: {w.progress()}")
                for problem in w.problems():
                    line(False, f"watcher: {problem}")
    if os.environ.get("OUTLOOP_HOME"):
        line(None, f"OUTLOOP_HOME={paths.home}")
    problems = sum(result is False for result, _ in checks)
    marks = {True: "ok", False: "fail", None: "note"}
    if getattr(args, "json", False):
        rows = [{"status": marks[result], "what": what} for result, what in checks]
        out: dict[str, Any] = {"ok": not problems, "checks": rows}
        if watcher_json is not None:  # the broker's figures, for scripts: progress, folders, problems
            out["watcher"] = watcher_json
        print(json.dumps(out, indent=2))
        return 1 if problems else 0
    shown = {True: "ok  ", False: "FAIL", None: "note"}
    for result, what in checks:
        print(f"[{shown[result]}] {what}")
    print("all good" if not problems else f"{problems} problem(s) found")
    return 1 if problems else 0
