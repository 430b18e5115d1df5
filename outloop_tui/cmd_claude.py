"""`outloop claude install|uninstall [--scope user|project] [--dry-run]`.

Registers Outloop's stdio MCP server and its guard hooks with Claude Code by
editing Claude Code's own JSON files, the way `claude mcp add` and the `/hooks`
menu would:

    scope    MCP server (mcpServers.outloop)          hooks, permissions
    user     ~/.claude.json                           ~/.claude/settings.json
    project  ./.mcp.json                              ./.claude/settings.json

`CLAUDE_CONFIG_DIR` moves the user files (`$CLAUDE_CONFIG_DIR/.claude.json`,
`$CLAUDE_CONFIG_DIR/settings.json`).

Every edit merges into what is there: other servers, hooks, permissions and
unknown keys are kept as they were. A file that changes is first copied to
`<file>.outloop-backup-<time>`, then replaced atomically. Running install twice
changes nothing the second time. Uninstall removes only what install adds: the
`outloop` server entry, hook entries whose command is `... outloop hook pre|post`,
and the two Outloop tool permissions. `--dry-run` prints what would be written
(only Outloop's own entries, never the rest of a file, which may hold the user's
own keys) and touches nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.paths import replace_file
from outloop_tui.cli import UserError

SERVER = "outloop"
TOOLS = (f"mcp__{SERVER}__outloop_request", f"mcp__{SERVER}__outloop_credentials")
# Built-in tools that read or edit files or run commands, and every MCP tool (a
# third-party filesystem server can read .env just as well). The tools of Claude Code
# 2.1.332 (its `init` event lists them); it has no Grep, Glob, LS or MultiEdit.
PRE_MATCHER = "Bash|Monitor|Read|Edit|Write|NotebookEdit|mcp__.*"
# Any tool's output can carry a key.
POST_MATCHER = "*"
HOOK_TIMEOUT = 30  # seconds; the post hook reads the keyring once per credential
OUR_HOOK = re.compile(r"(?:^|[\s/'\"])(?:outloop|outloop_tui(?:\.cli)?)['\"]?\s+hook\s+(pre|post)\s*$")
# Where the broker is: baked into the user-scope entries, so that a Claude Code started
# without them still finds the broker, its config (tenants, protected folders) and its
# alert store. Paths only, never a secret.
BROKER_ENV = ("OUTLOOP_HOME", "OUTLOOP_SOCKET")
BACKUP = ".outloop-backup-"


@dataclass
class Plan:
    """One file's change: the document before and after, and what changed, in words."""

    path: Path
    before: dict[str, Any] | None  # None: the file does not exist
    after: dict[str, Any]
    changes: list[str] = field(default_factory=list)
    fragments: list[tuple[str, Any]] = field(default_factory=list)  # (where, what) ours only

    @property
    def changed(self) -> bool:
        return self.before != self.after and not (self.before is None and not self.after)


# -- where Claude Code keeps things -------------------------------------------------------


def claude_dir() -> Path:
    override = os.environ.get("CLAUDE_CONFIG_DIR")
    return Path(override).expanduser() if override else Path.home() / ".claude"


def targets(scope: str, project: Path) -> tuple[Path, Path]:
    """(file holding mcpServers, settings.json holding hooks) for a scope."""
    if scope == "project":
        return project / ".mcp.json", project / ".claude" / "settings.json"
    override = os.environ.get("CLAUDE_CONFIG_DIR")
    global_file = Path(override).expanduser() / ".claude.json" if override else Path.home() / ".claude.json"
    return global_file, claude_dir() / "settings.json"


def outloop_command(scope: str) -> list[str]:
    """How Claude Code should start `outloop`: the console script found for this install."""
    argv0 = Path(sys.argv[0])
    candidates = []
    if argv0.name == "outloop":
        candidates.append(argv0)
    found = shutil.which("outloop")
    if found:
        candidates.append(Path(found))
    candidates.append(Path(sys.executable).parent / "outloop")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            exe = c.absolute()
            # A project file is shared: name the command, if this is what PATH finds anyway.
            if scope == "project" and found and Path(found).absolute() == exe:
                return ["outloop"]
            return [str(exe)]
    return [sys.executable, "-m", "outloop_tui.cli"]


def broker_env() -> dict[str, str]:
    """OUTLOOP_HOME / OUTLOOP_SOCKET as this install sees them (absolute), when set."""
    return {k: str(Path(os.environ[k]).expanduser().absolute()) for k in BROKER_ENV if os.environ.get(k)}


def server_entry(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "stdio", "command": command[0], "args": [*command[1:], "mcp"]}
    if env:
        entry["env"] = env
    return entry


def hook_command(command: list[str], phase: str, env: dict[str, str] | None = None) -> str:
    """The shell command of a hook: `[OUTLOOP_HOME=... ]outloop hook pre` (Claude Code runs it with sh)."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join([*prefix, shlex.join([*command, "hook", phase])])


# -- reading and writing JSON files -----------------------------------------------------


def load(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None when the file does not exist; UserError otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    if not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}); fix it "
            "or move it away, then run this again; nothing was changed"
        ) from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} does not hold a JSON object; nothing was changed")
    return doc


def _container(doc: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = doc.get(key)
    if value is None:
        value = kind()
        doc[key] = value
    if not isinstance(value, kind):
        raise UserError(
            f"{path}: {key!r} is not a JSON {'object' if kind is dict else 'array'}; "
            "fix it by hand, then run this again; nothing was changed"
        )
    return value


def write(plan: Plan, stamp: str) -> Path | None:
    """Back up the old file (if any) and write the new document; the backup path."""
    backup = None
    mode = 0o600
    if plan.path.exists():
        mode = plan.path.stat().st_mode & 0o777
        backup = plan.path.with_name(f"{plan.path.name}.outloop-backup-{stamp}")
        n = 1
        while backup.exists():
            n += 1
            backup = plan.path.with_name(f"{plan.path.name}.outloop-backup-{stamp}-{n}")
        shutil.copy2(plan.path, backup)
        os.chmod(backup, 0o600)  # it may hold the user's own keys
    data = (json.dumps(plan.after, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    replace_file(plan.path, data, mode)
    return backup


# -- the merges (plain functions over plain data) -----------------------------------------


def is_our_hook(hook: Any) -> bool:
    return (
        isinstance(hook, dict)
        and isinstance(hook.get("command"), str)
        and bool(OUR_HOOK.search(hook["command"].strip()))
    )


def is_our_server(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    argv = [str(entry.get("command", "")), *map(str, entry.get("args") or [])]
    return bool(argv) and argv[-1] == "mcp" and any("outloop" in a for a in argv[:-1])


def strip_hooks(doc: dict[str, Any]) -> int:
    """Remove Outloop's hook entries; containers that only they filled go too. The count."""
    hooks = doc.get("hooks")
    if not isinstance(hooks, dict):
        return 0
    removed = 0
    for event in list(hooks):
        groups = hooks[event]
        if not isinstance(groups, list):
            continue
        kept_groups = []
        removed_here = 0
        for group in groups:
            inner = group.get("hooks") if isinstance(group, dict) else None
            if not isinstance(inner, list):
                kept_groups.append(group)
                continue
            kept = [h for h in inner if not is_our_hook(h)]
            removed_here += len(inner) - len(kept)
            if kept or not inner:
                kept_groups.append({**group, "hooks": kept} if len(kept) != len(inner) else group)
        removed += removed_here
        if removed_here:
            if kept_groups:
                hooks[event] = kept_groups
            else:
                del hooks[event]
    if removed and not hooks:
        del doc["hooks"]
    return removed


def merge_settings(
    doc: dict[str, Any], command: list[str], path: Path, env: dict[str, str] | None = None
) -> list[tuple[str, Any]]:
    """Add Outloop's hooks and tool permissions to a settings.json document (in place)."""
    strip_hooks(doc)
    hooks = _container(doc, "hooks", dict, path)
    added: list[tuple[str, Any]] = []
    for event, matcher, phase in (("PreToolUse", PRE_MATCHER, "pre"), ("PostToolUse", POST_MATCHER, "post")):
        groups = hooks.get(event)
        if groups is None:
            groups = hooks[event] = []
        if not isinstance(groups, list):
            raise UserError(
                f"{path}: hooks.{event} is not a JSON array; fix it by hand, then run this again; nothing was changed"
            )
        group = {
            "matcher": matcher,
            "hooks": [{"type": "command", "command": hook_command(command, phase, env), "timeout": HOOK_TIMEOUT}],
        }
        groups.append(group)
        added.append((f"hooks.{event}[]", group))
    permissions = _container(doc, "permissions", dict, path)
    allow = permissions.get("allow")
    if allow is None:
        allow = permissions["allow"] = []
    if not isinstance(allow, list):
        raise UserError(f"{path}: permissions.allow is not a JSON array; nothing was changed")
    for tool in TOOLS:
        if tool not in allow:
            allow.append(tool)
    added.append(("permissions.allow[]", list(TOOLS)))
    return added


def unmerge_settings(doc: dict[str, Any]) -> list[str]:
    """Remove Outloop's hooks and tool permissions (in place); what was removed."""
    removed: list[str] = []
    n = strip_hooks(doc)
    if n:
        removed.append(f"{n} Outloop hook entr{'y' if n == 1 else 'ies'}")
    permissions = doc.get("permissions")
    if isinstance(permissions, dict) and isinstance(permissions.get("allow"), list):
        allow = permissions["allow"]
        kept = [a for a in allow if a not in TOOLS]
        if len(kept) != len(allow):
            removed.append("the Outloop tool permissions")
            if kept:
                permissions["allow"] = kept
            else:
                del permissions["allow"]
                if not permissions:
                    del doc["permissions"]
    return removed


def merge_servers(doc: dict[str, Any], entry: dict[str, Any], path: Path) -> list[tuple[str, Any]]:
    servers = _container(doc, "mcpServers", dict, path)
    servers[SERVER] = entry
    return [(f"mcpServers.{SERVER}", entry)]


def unmerge_servers(doc: dict[str, Any]) -> list[str]:
    servers = doc.get("mcpServers")
    if isinstance(servers, dict) and is_our_server(servers.get(SERVER)):
        del servers[SERVER]
        if not servers:
            del doc["mcpServers"]
        return [f"the {SERVER!r} MCP server"]
    return []


# -- the command ----------------------------------------------------------------------------


def local_settings(project: Path) -> Path:
    """The project's own, uncommitted settings: where machine-specific values go."""
    return project / ".claude" / "settings.local.json"


def merge_env(doc: dict[str, Any], env: dict[str, str], path: Path) -> list[tuple[str, Any]]:
    block = _container(doc, "env", dict, path)
    block.update(env)
    return [(f"env.{k}", v) for k, v in env.items()]


def unmerge_env(doc: dict[str, Any]) -> list[str]:
    block = doc.get("env")
    if not isinstance(block, dict):
        return []
    gone = [k for k in BROKER_ENV if k in block]
    for k in gone:
        del block[k]
    if gone and not block:
        del doc["env"]
    return [f"env.{k}" for k in gone]


Merge = Callable[[dict[str, Any], Path], list[tuple[str, Any]]]


def plan_install(scope: str, project: Path) -> list[Plan]:
    server_file, settings_file = targets(scope, project)
    env = broker_env()
    steps: list[tuple[Path, Merge]]
    if scope == "project":
        # .mcp.json and .claude/settings.json are meant to be committed: no path of this
        # machine in them. The broker's location goes to the uncommitted settings.local.json,
        # whose `env` Claude Code gives the session, its hooks and its MCP servers.
        command = ["outloop"]
        steps = [
            (server_file, lambda doc, path: merge_servers(doc, server_entry(command, {}), path)),
            (settings_file, lambda doc, path: merge_settings(doc, command, path)),
        ]
        if env:
            steps.append((local_settings(project), lambda doc, path: merge_env(doc, env, path)))
    else:
        command = outloop_command(scope)
        steps = [
            (server_file, lambda doc, path: merge_servers(doc, server_entry(command, env), path)),
            (settings_file, lambda doc, path: merge_settings(doc, command, path, env)),
        ]
    plans = []
    for path, merge in steps:
        before = load(path)
        after = copy.deepcopy(before) if before is not None else {}
        fragments = merge(after, path)
        plans.append(Plan(path, before, after, fragments=fragments))
    return plans


def _strip_ours(doc: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    unmerge_servers(out)
    unmerge_settings(out)
    unmerge_env(out)
    return out


def _norm(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` without Outloop's entries and without empty containers of the kinds install fills."""
    out = _strip_ours(doc)
    for key in ("hooks", "permissions"):
        inner = out.get(key)
        if isinstance(inner, dict):
            out[key] = {k: v for k, v in inner.items() if v not in ({}, [])}
    return {k: v for k, v in out.items() if not (k in ("hooks", "permissions", "mcpServers", "env") and v == {})}


def plan_uninstall(scope: str, project: Path) -> list[Plan]:
    server_file, settings_file = targets(scope, project)
    files = [server_file, settings_file] + ([local_settings(project)] if scope == "project" else [])
    plans = []
    for path in files:
        before = load(path)
        if before is None:
            continue
        after = _strip_ours(before)
        changes = [*unmerge_servers(copy.deepcopy(before)), *unmerge_settings(copy.deepcopy(before))]
        changes += unmerge_env(copy.deepcopy(before))
        plans.append(Plan(path, before, after, changes=changes))
    return plans


def backups_of(path: Path) -> list[Path]:
    """Outloop's backups of `path`, newest first."""
    return sorted(path.parent.glob(path.name + BACKUP + "*"), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def restore(plan: Plan) -> str:
    """Take `plan.path` back to what it was before install; what was done, in words.

    The file as it was is the newest backup whose content, without Outloop's entries,
    is what the file now holds without them: its bytes go back exactly and the backups
    that agree go. No backup at all and nothing left: install created the file, so it
    goes (and the `.claude` folder install created with it, if it is empty). Anything
    else (the user changed the file since): Outloop's entries are taken out, the rest
    and the backups stay.
    """
    found = backups_of(plan.path)
    for backup in found:
        try:
            data = backup.read_bytes()
            doc = json.loads(data) if data.strip() else {}
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and _strip_ours(doc) == doc and _norm(doc) == _norm(plan.after):
            mode = plan.path.stat().st_mode & 0o777
            replace_file(plan.path, data, mode)
            for other in found:
                other.unlink(missing_ok=True)
            return f"restored {plan.path} as it was"
    if not found and not plan.after:
        plan.path.unlink()
        folder = plan.path.parent
        if folder.name == ".claude" and not any(folder.iterdir()):
            folder.rmdir()
        return f"removed {plan.path} (install created it)"
    data = (json.dumps(plan.after, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    replace_file(plan.path, data, plan.path.stat().st_mode & 0o777)
    kept = f"; backups kept: {', '.join(b.name for b in found)}" if found else ""
    return f"updated {plan.path}{kept}"


PROJECT_NEXT = (
    "Next, in this folder: start `claude`, accept the folder trust dialog, and approve the "
    "'outloop' server from .mcp.json when asked (`claude mcp list` shows 'Pending approval' "
    "until then). In a folder Claude Code has not trusted, it ignores the project's "
    "permissions and refuses the MCP server's tools."
)


def run_claude(args: argparse.Namespace) -> int:
    project = Path.cwd()
    install = args.action == "install"
    plans = plan_install(args.scope, project) if install else plan_uninstall(args.scope, project)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    changed = [p for p in plans if p.changed]
    if not changed:
        what = "already installed" if install else "not installed"
        print(f"Outloop is {what} for Claude Code ({args.scope} scope); nothing to change.")
        return 0
    for plan in changed:
        if args.dry_run:
            verb = "create" if plan.before is None else "update"
            if not install:
                verb = "restore" if backups_of(plan.path) else ("remove" if not plan.after else "update")
            print(f"would {verb} {plan.path}:")
        elif install:
            backup = write(plan, stamp)
            print(f"updated {plan.path}" + (f" (backup: {backup.name})" if backup else " (new file)"))
        else:
            print(restore(plan))
        for where, what in plan.fragments:
            print(f"  + {where} = {json.dumps(what)}")
        for what in plan.changes:
            print(f"  - {what}")
    if args.dry_run:
        print("(dry run: nothing was written)")
    elif install and args.scope == "project":
        if not shutil.which("outloop"):
            print("Note: `outloop` is not on PATH here; the project files name it without a path.")
        print(PROJECT_NEXT)
    elif install:
        print(
            "Restart Claude Code in a mapped workspace; `/mcp` lists the outloop server and `/hooks` the guard hooks."
        )
    return 0


# -- `outloop claude [ARGS...]`: Claude Code in a session ---------------------------------


def installed(project: Path) -> bool:
    """Whether `outloop claude install` (either scope) has registered Outloop for this folder."""
    for scope in ("user", "project"):
        try:
            if not any(p.changed for p in plan_install(scope, project)[:2]):
                return True
        except UserError:
            continue
    return False


def session_flags(project: Path) -> list[str]:
    """Claude Code flags that bring the MCP server and hooks when install has not: `--mcp-config`
    and `--settings` as inline JSON, for this run only (nothing is written)."""
    if installed(project):
        return []
    command = outloop_command("user")
    settings: dict[str, Any] = {}
    merge_settings(settings, command, project)
    servers = {"mcpServers": {SERVER: server_entry(command, {})}}
    return ["--mcp-config", json.dumps(servers), "--settings", json.dumps(settings)]


def run_claude_code(claude_args: list[str]) -> int:
    """`outloop claude [ARGS...]`: Claude Code in a session of this folder's tenant.

    The same as `outloop run --label claude -- claude ARGS...`: the MCP server and the
    hooks Claude Code starts are in the session's process tree (and carry
    OUTLOOP_SESSION and OUTLOOP_SOCKET), so they are identified by the session. When
    `outloop claude install` has not registered them, they come for this run only
    through `--mcp-config` and `--settings`. `OUTLOOP_CLAUDE` names the binary (default:
    `claude` on PATH).
    """
    from outloop_tui.cli import build_parser
    from outloop_tui.cmd_run import run_session

    exe = os.environ.get("OUTLOOP_CLAUDE") or shutil.which("claude")
    if not exe:
        raise UserError(
            "Claude Code (`claude`) is not on PATH; install it (npm install -g @anthropic-ai/claude-code) "
            "or set OUTLOOP_CLAUDE to its path",
            127,
        )
    args = build_parser().parse_args(["run", "--label", "claude", "--", exe, *session_flags(Path.cwd()), *claude_args])
    return run_session(args)
