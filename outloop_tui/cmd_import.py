"""`outloop import [PATH]`: move a workspace's `.env` keys into the keyring (broker/importer.py).

The operator's command, never an agent's: it refuses inside an `outloop run`
session (the session's variable, the broker's view of the caller's process tree,
and the recorded session roots among this process's ancestors). The plan shows
masked previews only; no key reaches the screen, argv or a log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from broker import importer
from broker.paths import Paths
from broker.secrets import SecretStore
from outloop_tui.cli import USAGE_EXIT, UserError

INSIDE = (
    "outloop import moves keys into the keyring, which only the operator does, from outside every session; "
    "this process runs inside an `outloop run` session"
)


def _ancestors() -> list[tuple[int, int | None]]:
    from broker.calls.identity import process_start

    chain: list[tuple[int, int | None]] = []
    pid = os.getpid()
    for _ in range(256):
        chain.append((pid, process_start(pid)))
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 1:
            break
    return chain


def refuse_inside_session(paths: Paths) -> None:
    """Raise UserError when this process belongs to an agent session."""
    if os.environ.get("OUTLOOP_SESSION"):
        raise UserError(INSIDE)
    from broker.client import BrokerUnreachable, request

    try:
        resp = request(paths.socket, "GET", "/v1/sessions", timeout=10)
    except (BrokerUnreachable, OSError):
        resp = None
    if resp is not None and resp.status != 200:
        try:
            code = resp.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = ""
        if code == "denied_by_policy":  # the broker found a session root among our ancestors
            raise UserError(INSIDE)
    try:  # no broker: the roots it recorded, in case one of them is still our ancestor
        rows = json.loads((paths.state_dir / "sessions.json").read_text(encoding="utf-8")).get("sessions", [])
        roots = {(int(r["root_pid"]), int(r["root_start"])) for r in rows}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        roots = set()
    if roots and any((pid, start) in roots for pid, start in _ancestors()):
        raise UserError(INSIDE)


def _pairs(given: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in given:
        var, sep, value = item.partition("=")
        if not sep or not var or not value:
            raise UserError(f"{flag} takes VARIABLE=VALUE (e.g. {flag} MY_API_KEY=...), not {item!r}", USAGE_EXIT)
        out[var] = value
    return out


def _where(plan: importer.ImportPlan, path: Path) -> str:
    try:
        return str(path.relative_to(plan.workspace))
    except ValueError:
        return str(path)


def print_plan(plan: importer.ImportPlan, out: list[str] | None = None) -> list[str]:
    """The plan in words: one block per key (masked), then what is left in place and why."""
    lines = out if out is not None else []
    ready, pending = plan.ready(), plan.pending()
    lines.append(f"Import plan for tenant {plan.tenant} ({plan.workspace}), {plan.files_read} .env file(s) read:")
    if not ready:
        lines.append("  no key to move")
    for key in ready:
        where = ", ".join(f"{_where(plan, s.shown)}:{s.line} {s.variable}" for s in key.spots)
        target = f"{plan.tenant}/{key.credential}"
        if key.managed:
            lines.append(f"  {where}  {key.preview}  -> {target} (already in the keyring: only the file changes)")
            continue
        provider = key.provider.title if key.provider else "unknown provider"
        lines.append(f"  {where}  {key.preview}  -> {target} ({provider}, {key.rule})")
        lines.append(f"      base URL {key.base_url} · auth {key.auth} · {key.rules_text()}")
    if pending or plan.notes:
        lines.append("Left in place:")
    for key in pending:
        where = ", ".join(f"{_where(plan, s.shown)}:{s.line} {s.variable}" for s in key.spots)
        lines.append(f"  {where}  {key.preview}: {key.needs}")
    for note in plan.notes:
        at = f":{note.line} {note.variable}" if note.line else ""
        lines.append(f"  {_where(plan, note.shown)}{at}: {note.message}")
    files = plan.files_to_rewrite()
    if files:
        shown = ", ".join(
            _where(plan, f.shown) + (f" (symlink to {f.real})" if f.real != f.shown else "") for f in files
        )
        lines.append(
            f"Files to rewrite: {shown}; each key's value becomes outloop:{plan.tenant}/NAME, every other byte stays."
        )
    return lines


def _ask_pending(plan: importer.ImportPlan) -> None:
    """At a terminal, offer a generic credential (bearer or header, every call asks) for unknown keys."""
    for key in plan.pending():
        if key.provider is not None:  # a known provider missing a variable of its file: not guessable
            continue
        print(
            f"{key.variable} ({key.preview}) is a key of a provider Outloop does not know. "
            "It can become a generic credential whose every call asks you."
        )
        url = input(f"  base URL of its API (empty: leave {key.variable} in place): ").strip()
        if not url:
            continue
        auth = input("  auth [bearer] (or header:Header-Name): ").strip() or "bearer"
        try:
            plan.resolve(key, url, auth)
        except importer.ImportProblem as e:
            print(f"  {e}; left in place")


def run_import(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
    refuse_inside_session(paths)
    target = Path(args.path or ".")
    secrets = SecretStore()
    plan = importer.plan_import(
        paths,
        target,
        tenant=args.tenant,
        secrets=secrets,
        base_urls=_pairs(args.base_url, "--base-url"),
        auths=_pairs(args.auth, "--auth"),
    )
    interactive = sys.stdin.isatty() and not args.yes and not args.dry_run
    if interactive and plan.pending():
        _ask_pending(plan)
    print("\n".join(print_plan(plan)))
    if not plan.ready():
        return 0
    if args.dry_run:
        print("dry run: nothing was changed")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError("nothing was changed: add --yes to import when not at a terminal")
        answer = input(f"Move {len(plan.ready())} key(s) into the keyring and rewrite the files? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise UserError("nothing was changed")
    result = importer.apply_import(plan, paths, secrets)
    if result.stored:
        names = ", ".join(f"{plan.tenant}/{n}" for n in result.stored)
        print(f"stored {len(result.stored)} key(s) in the keyring: {names}")
    if result.reused:
        print(f"already in the keyring: {', '.join(f'{plan.tenant}/{n}' for n in result.reused)}")
    print(f"rewrote {', '.join(_where(plan, p) for p in result.rewritten)}")
    print("run the project with `outloop run -- CMD`: its SDKs then reach these keys through the broker")
    return 0
