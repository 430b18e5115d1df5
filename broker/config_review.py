"""What a change to config.toml does to access: which parts widen it, which narrow it (issue 14).

A change made outside Outloop's own commands and dashboard is split here. What
narrows access (a tenant, workspace or credential removed, an allow or ask rule
dropped, a deny rule added, `require_session` turned on, syslog turned on)
applies at once; what widens it (a new tenant or workspace, a folder moved
between tenants, a new allow or ask rule, a deny rule dropped, a changed
base_url, auth or host, a new scan_ignore pattern, `require_session` or
`[audit] syslog` turned off, another `listen` address or `ca_bundle`) waits for the operator.

:func:`review` returns both: the list of changes, each marked, and the document
the broker enforces meanwhile (the approved one with only the narrowing applied).
Pure: plain dicts in, plain dicts out; nothing here reads a file or a keyring.
Summaries name tenants, credentials, folders, rules and hosts, never a secret
(config.toml holds none).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from broker.config import resolve_workspace

# Every method, every path: a credential with no rules asks for this; one whose
# approved and new rules share nothing is held at a deny of this meanwhile.
ALL = "* /**"


@dataclass(frozen=True)
class Change:
    """One change, in words for the operator, and whether it widens access."""

    text: str
    widens: bool


@dataclass
class Review:
    """The changes from the approved document to the new one, and what applies now."""

    changes: list[Change] = field(default_factory=list)
    applied: dict[str, Any] = field(default_factory=dict)  # approved + the narrowing changes

    @property
    def widening(self) -> list[str]:
        return [c.text for c in self.changes if c.widens]

    @property
    def narrowing(self) -> list[str]:
        return [c.text for c in self.changes if not c.widens]


def _table(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def _list(table: dict[str, Any], key: str) -> list[Any]:
    value = table.get(key)
    return list(value) if isinstance(value, list) else []


def _folder(text: str) -> str:
    try:
        return str(resolve_workspace(text))
    except (OSError, RuntimeError):
        return text


def _host(url: Any) -> str:
    return urlsplit(url).netloc if isinstance(url, str) else "?"


def review(approved: dict[str, Any], new: dict[str, Any]) -> Review:
    """Compare two config documents (as tomllib reads them); both already validated."""
    out = Review(applied=copy.deepcopy(approved))
    say = out.changes.append
    applied = out.applied

    old_tenants, new_tenants = _table(approved, "tenants"), _table(new, "tenants")
    owner_of = {_folder(w): tid for tid, t in old_tenants.items() for w in _list(t, "workspaces")}
    applied_tenants: dict[str, Any] = applied.setdefault("tenants", {})
    for tid in old_tenants.keys() - new_tenants.keys():
        say(Change(f"tenant {tid} removed", False))
        applied_tenants.pop(tid, None)
    for tid in sorted(new_tenants.keys() - old_tenants.keys()):
        t = new_tenants[tid]
        folders = ", ".join(_list(t, "workspaces")) or "no folders"
        creds = ", ".join(sorted(_table(t, "credentials"))) or "no credentials"
        say(Change(f"new tenant {tid} ({folders}; {creds})", True))
    for tid in sorted(old_tenants.keys() & new_tenants.keys()):
        _tenant(tid, old_tenants[tid], new_tenants[tid], applied_tenants[tid], owner_of, say)

    _broker(_table(approved, "broker"), _table(new, "broker"), applied, say)
    old_audit, new_audit = _table(approved, "audit"), _table(new, "audit")
    was, now = bool(old_audit.get("syslog", False)), bool(new_audit.get("syslog", False))
    if was and not now:
        say(Change("[audit] syslog turned off", True))
    elif now and not was:
        say(Change("[audit] syslog turned on", False))
        applied.setdefault("audit", {})["syslog"] = True
    for key in sorted((approved.keys() | new.keys()) - {"tenants", "broker", "audit"}):
        if approved.get(key) != new.get(key):
            # Tables Outloop's broker does not enforce ([sandbox] is read by `outloop run`):
            # whoever widens them widens access, so every change waits.
            say(Change(f"[{key}] changed", True))
    return out


def _tenant(
    tid: str,
    old: dict[str, Any],
    new: dict[str, Any],
    applied: dict[str, Any],
    owner_of: dict[str, str],
    say: Any,
) -> None:
    if old.get("name") != new.get("name") and "name" in new:
        say(Change(f"tenant {tid} renamed {new.get('name')!r}", False))
        applied["name"] = new["name"]
    old_ws = {_folder(w): w for w in _list(old, "workspaces")}
    new_ws = {_folder(w): w for w in _list(new, "workspaces")}
    for folder in sorted(old_ws.keys() - new_ws.keys()):
        say(Change(f"folder {old_ws[folder]} unmapped from {tid}", False))
    for folder in sorted(new_ws.keys() - old_ws.keys()):
        other = owner_of.get(folder)
        if other is not None and other != tid:
            say(Change(f"folder {new_ws[folder]} moved from tenant {other} to {tid}", True))
        else:
            say(Change(f"folder {new_ws[folder]} mapped to {tid}", True))
    applied["workspaces"] = [w for f, w in old_ws.items() if f in new_ws]

    old_ignore, new_ignore = _list(old, "scan_ignore"), _list(new, "scan_ignore")
    for pattern in [p for p in new_ignore if p not in old_ignore]:
        say(Change(f"{tid}: the leak watcher stops looking in {pattern!r}", True))
    for pattern in [p for p in old_ignore if p not in new_ignore]:
        say(Change(f"{tid}: the leak watcher looks in {pattern!r} again", False))
    if old_ignore or new_ignore:
        applied["scan_ignore"] = [p for p in old_ignore if p in new_ignore]

    old_creds, new_creds = _table(old, "credentials"), _table(new, "credentials")
    applied_creds: dict[str, Any] = applied.setdefault("credentials", {})
    for name in sorted(old_creds.keys() - new_creds.keys()):
        say(Change(f"credential {tid}/{name} removed", False))
        applied_creds.pop(name, None)
    for name in sorted(new_creds.keys() - old_creds.keys()):
        c = new_creds[name]
        say(Change(f"new credential {tid}/{name} for {_host(c.get('base_url'))} ({_rules_text(c)})", True))
    for name in sorted(old_creds.keys() & new_creds.keys()):
        _credential(f"{tid}/{name}", old_creds[name], new_creds[name], applied_creds[name], say)
    for key in sorted((old.keys() | new.keys()) - {"name", "workspaces", "scan_ignore", "credentials"}):
        if old.get(key) != new.get(key):
            say(Change(f"tenant {tid}: {key} changed", True))


def _rules_text(c: dict[str, Any]) -> str:
    parts = [f"{kind} {', '.join(_list(c, kind))}" for kind in ("allow", "ask", "deny") if _list(c, kind)]
    return "; ".join(parts) or "ask for everything"


def _credential(who: str, old: dict[str, Any], new: dict[str, Any], applied: dict[str, Any], say: Any) -> None:
    for key in ("base_url", "auth"):
        before, after = old.get(key), new.get(key)
        if key == "auth":
            before, after = before or "bearer", after or "bearer"
        if before != after:
            if key == "base_url" and _host(before) != _host(after):
                say(Change(f"{who}: base_url host {_host(before)} -> {_host(after)} ({after})", True))
            else:
                say(Change(f"{who}: {key} {before} -> {after}", True))
    old_allow, old_ask, old_deny = _effective(old)
    new_allow, new_ask, new_deny = _effective(new)
    for kind, before, after in (("allow", old_allow, new_allow), ("ask", old_ask, new_ask)):
        for rule in after:
            if rule not in before:
                say(Change(f"{who}: new {kind} rule {rule!r}", True))
        for rule in before:
            if rule not in after:
                say(Change(f"{who}: {kind} rule {rule!r} removed", False))
    for rule in old_deny:
        if rule not in new_deny:
            say(Change(f"{who}: deny rule {rule!r} removed", True))
    for rule in new_deny:
        if rule not in old_deny:
            say(Change(f"{who}: new deny rule {rule!r}", False))
    # What applies now: the rules both sides let through, and every deny rule of either.
    allow = [r for r in old_allow if r in new_allow]
    ask = [r for r in old_ask if r in new_ask]
    deny = old_deny + [r for r in new_deny if r not in old_deny]
    if not (allow or ask or deny):
        deny = [ALL]  # no rules at all would mean "ask for everything": wider than either side
    for kind, rules in (("allow", allow), ("ask", ask), ("deny", deny)):
        if rules:
            applied[kind] = rules
        else:
            applied.pop(kind, None)


def _effective(c: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(allow, ask, deny) as the broker enforces them: no rules at all asks for everything."""
    allow, ask, deny = (_list(c, kind) for kind in ("allow", "ask", "deny"))
    if not (allow or ask or deny):
        ask = [ALL]
    return allow, ask, deny


def _broker(old: dict[str, Any], new: dict[str, Any], applied: dict[str, Any], say: Any) -> None:
    table: dict[str, Any] = applied.setdefault("broker", {})
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if key == "require_session":
            if after:
                say(Change("[broker] require_session turned on", False))
                table[key] = True
            else:
                say(Change("[broker] require_session turned off", True))
        elif key == "listen":
            say(Change(f"[broker] listen {before or 'off'} -> {after or 'off'}", True))
        elif key == "ca_bundle":  # whose certificates the key is sent to
            say(Change(f"[broker] ca_bundle {before or 'the default'} -> {after or 'the default'}", True))
        else:
            # Timeouts, size caps, worker counts: they change how, not who.
            say(Change(f"[broker] {key} {before} -> {after}", False))
            if key in new:
                table[key] = after
            else:
                table.pop(key, None)
    if not table:
        applied.pop("broker", None)
