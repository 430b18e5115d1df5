"""config.toml: tenants, their workspace folders and credentials, and broker settings.

The file is read with tomllib and written with tomli-w. Edits go through the raw
document so keys Outloop does not know survive a rewrite; every edit is validated
before it is written, and a file that does not parse is never overwritten.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import importlib.util
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from broker import config_approval
from broker.paths import Paths, atomic_write
from broker.policy import RuleError, parse_rule

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
AUTH_KINDS = ("bearer", "basic:<user>", "header:<Header-Name>", "query:<param>")

DEFAULTS: dict[str, float | int] = {
    "approval_timeout": 120.0,
    "always_ttl": 3600.0,
    "upstream_timeout": 30.0,
    "max_request_bytes": 10 * 1024 * 1024,
    "max_response_bytes": 10 * 1024 * 1024,
    "scan_max_file_bytes": 2 * 1024 * 1024,
    "max_sessions": 1024,
    "session_ttl": 12 * 3600.0,
    "idle_timeout": 60.0,
    "stream_idle_timeout": 300.0,
}


def default_forward_workers() -> int:
    """One forwarding worker per core beyond the broker's own, at most 2; none on one core."""
    return max(0, min(2, (os.cpu_count() or 1) - 1))


class ConfigError(Exception):
    """config.toml is malformed or an edit would make it so. The message names file and key."""


@dataclass(frozen=True)
class Auth:
    """How a credential goes on the wire: bearer, basic:<user>, header:<Name> or query:<param>."""

    kind: str  # "bearer" | "basic" | "header" | "query"
    arg: str = ""

    @classmethod
    def parse(cls, text: str) -> Auth:
        kind, _, arg = text.partition(":")
        if kind == "bearer" and not arg:
            return cls("bearer")
        if kind == "basic" and arg and ":" not in arg:
            return cls("basic", arg)
        if kind == "header" and HEADER_NAME_RE.match(arg):
            return cls("header", arg)
        if kind == "query" and arg and re.fullmatch(r"[A-Za-z0-9_.~-]+", arg):
            return cls("query", arg)
        raise ValueError(f"auth must be one of {', '.join(AUTH_KINDS)}, not {text!r}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


@dataclass(frozen=True)
class Credential:
    """One upstream API credential of a tenant. The secret itself lives in the keyring."""

    tenant: str
    name: str
    base_url: str
    auth: Auth
    allow: tuple[str, ...] = ()
    ask: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    # Paths with an encoded "/" inside a segment (%2F), or ";" parameters, are refused
    # unless the credential's API needs them (broker/policy.py says why).
    allow_encoded_slash: bool = False
    allow_path_params: bool = False

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc

    @property
    def has_rules(self) -> bool:
        return bool(self.allow or self.ask or self.deny)

    def rule_summary(self) -> str:
        if not self.has_rules:
            return "ask for everything"
        parts = [f"{k} {len(v)}" for k, v in (("allow", self.allow), ("ask", self.ask), ("deny", self.deny)) if v]
        return ", ".join(parts)


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    workspaces: tuple[Path, ...]
    credentials: dict[str, Credential] = field(default_factory=dict)
    # Folder patterns (gitignore-style) the leak scanner and watcher never enter in
    # this tenant's workspaces, on top of dependency folders and each .gitignore.
    scan_ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class BrokerSettings:
    approval_timeout: float = 120.0
    always_ttl: float = 3600.0
    upstream_timeout: float = 30.0
    max_request_bytes: int = 10 * 1024 * 1024
    max_response_bytes: int = 10 * 1024 * 1024
    scan_max_file_bytes: int = 2 * 1024 * 1024
    # Processes that forward and redact calls while several are in flight (broker/workers.py).
    forward_workers: int = 0
    max_sessions: int = 1024  # live sessions at once (broker/calls/sessions.py)
    session_ttl: float = 12 * 3600.0  # seconds a session lasts unless `outloop run --ttl` says less
    idle_timeout: float = 60.0  # seconds a connection (Unix socket or loopback TCP) may sit idle between requests
    stream_idle_timeout: float = 300.0  # seconds an upstream may go quiet in the middle of its answer
    ca_bundle: str | None = None  # PEM file of the CAs upstream certificates are checked against
    http2: bool = False  # offer HTTP/2 to HTTPS upstreams (needs the `http2` extra: h2)
    require_session: bool = False  # refuse every call made outside a session (no_session)
    listen: tuple[str, int] | None = None  # loopback TCP address (read at start)
    # The CLAUDE_CODE_TMPDIR Claude Code runs with, when the broker's environment does not say
    # (its task outputs are watched there too; read at start). broker/claude/tasks.py
    claude_code_tmpdir: str | None = None

    @property
    def listen_url(self) -> str | None:
        """`http://host:port` of the loopback listener as configured (port 0: chosen at start)."""
        if self.listen is None:
            return None
        host, port = self.listen
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True)
class SandboxSettings:
    """`[sandbox]`: what `outloop run --sandbox` adds to its defaults (broker/sandbox.py)."""

    read_write: tuple[Path, ...] = ()  # folders the agent may also write
    hide: tuple[Path, ...] = ()  # paths the agent must not see (on top of keyring, config, state, other tenants)


@dataclass(frozen=True)
class AuditSettings:
    syslog: bool = False  # also send every audit record to the local syslog / journald


@dataclass(frozen=True)
class Config:
    """A validated config. `raw` is the document as read, unknown keys included."""

    tenants: dict[str, Tenant]
    broker: BrokerSettings
    raw: dict[str, Any]
    audit: AuditSettings = AuditSettings()
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)

    def workspace_for(self, path: Path | str) -> tuple[Tenant, Path] | None:
        """The tenant and workspace folder holding `path` (already resolved), longest prefix.

        Runs on every call, for the caller and its ancestors: one dict lookup per
        level of `path`, however many workspaces are mapped.
        """
        index = self._workspace_index
        text = str(path)
        while True:
            found = index.get(text)
            if found is not None:
                return found
            head, sep, _ = text.rpartition("/")
            if not sep or text == "/":
                return None
            text = head or "/"

    @functools.cached_property
    def _workspace_index(self) -> dict[str, tuple[Tenant, Path]]:
        index: dict[str, tuple[Tenant, Path]] = {}
        for tenant in self.tenants.values():
            for ws in tenant.workspaces:
                index.setdefault(str(ws), (tenant, ws))
        return index

    def credential_owners(self, name: str) -> list[str]:
        """Ids of every tenant that has a credential called `name`."""
        return [t.id for t in self.tenants.values() if name in t.credentials]

    def credentials(self) -> Iterable[Credential]:
        for tenant in self.tenants.values():
            yield from tenant.credentials.values()


def resolve_workspace(text: str) -> Path:
    """Expand ~ and resolve symlinks, so one folder has one spelling."""
    return Path(text).expanduser().resolve()


def display_workspace(path: Path) -> str:
    """How a workspace is written in config.toml: under the home folder as ~/..."""
    home = Path.home()
    try:
        return "~/" + str(path.relative_to(home)) if path != home else "~"
    except ValueError:
        return str(path)


# -- reading -----------------------------------------------------------------


def read_raw(path: Path) -> dict[str, Any]:
    """Parse config.toml into a plain dict; a missing file is an empty config."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(paths: Paths) -> Config:
    """Read and validate config.toml; raise ConfigError naming file, key and line."""
    raw = read_raw(paths.config_file)
    return validate(raw, paths.config_file)


def validate(raw: dict[str, Any], source: Path) -> Config:
    """Check a raw document and build the Config from it."""
    where = _Locator(source)
    _check_keys(raw, where)
    broker_raw = raw.get("broker", {})
    if not isinstance(broker_raw, dict):
        raise where.error("broker", "must be a table")
    settings: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        value = broker_raw.get(key, default)
        # Seconds may be fractional (never truncated: 0.5 must not become 0); byte
        # counts are whole numbers.
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise where.error(f"broker.{key}", "must be a positive whole number")
            settings[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise where.error(f"broker.{key}", "must be a positive number")
            settings[key] = float(value)
    workers = broker_raw.get("forward_workers", default_forward_workers())
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 16:
        raise where.error("broker.forward_workers", "must be a whole number from 0 to 16")
    settings["forward_workers"] = workers
    require = broker_raw.get("require_session", False)
    if not isinstance(require, bool):
        raise where.error("broker.require_session", "must be true or false")
    settings["require_session"] = require
    ca_bundle = broker_raw.get("ca_bundle")
    if ca_bundle is not None:
        if not isinstance(ca_bundle, str) or not ca_bundle:
            raise where.error("broker.ca_bundle", "must be the path of a PEM file of CA certificates")
        bundle = Path(ca_bundle).expanduser()
        if not bundle.is_file():
            raise where.error("broker.ca_bundle", f"{bundle} is not a file")
        settings["ca_bundle"] = str(bundle)
    http2 = broker_raw.get("http2", False)
    if not isinstance(http2, bool):
        raise where.error("broker.http2", "must be true or false")
    if http2 and importlib.util.find_spec("h2") is None:
        raise where.error("broker.http2", "needs the h2 package: pip install 'outloop[http2]'")
    settings["http2"] = http2
    listen = broker_raw.get("listen")
    if listen is not None:
        if not isinstance(listen, str):
            raise where.error("broker.listen", 'must be a string like "127.0.0.1:7878"')
        try:
            settings["listen"] = parse_listen(listen)
        except ValueError as e:
            raise where.error("broker.listen", str(e)) from None
    tmpdir = broker_raw.get("claude_code_tmpdir")
    if tmpdir is not None:
        if not isinstance(tmpdir, str) or not tmpdir.startswith(("/", "~")):
            raise where.error("broker.claude_code_tmpdir", 'must be an absolute folder path, like "/var/tmp"')
        settings["claude_code_tmpdir"] = str(Path(tmpdir).expanduser())
    broker = BrokerSettings(**settings)

    tenants_raw = raw.get("tenants", {})
    if not isinstance(tenants_raw, dict):
        raise where.error("tenants", "must be a table of [tenants.<id>]")
    tenants: dict[str, Tenant] = {}
    owner_of: dict[Path, str] = {}
    for tid, traw in tenants_raw.items():
        key = f"tenants.{tid}"
        if not NAME_RE.match(tid):
            raise where.error(key, "tenant ids use letters, digits, '-', '_' and '.'")
        if not isinstance(traw, dict):
            raise where.error(key, "must be a table")
        name = traw.get("name", tid)
        if not isinstance(name, str):
            raise where.error(f"{key}.name", "must be a string")
        ws_raw = traw.get("workspaces", [])
        if not isinstance(ws_raw, list) or not all(isinstance(w, str) and w for w in ws_raw):
            raise where.error(f"{key}.workspaces", "must be a list of folder paths")
        workspaces = tuple(dict.fromkeys(resolve_workspace(w) for w in ws_raw))
        for ws in workspaces:
            clash = _overlap(ws, tid, owner_of)
            if clash:
                raise where.error(f"{key}.workspaces", clash)
            owner_of[ws] = tid
        creds_raw = traw.get("credentials", {})
        if not isinstance(creds_raw, dict):
            raise where.error(f"{key}.credentials", "must be a table")
        creds = {
            cname: _credential(tid, cname, craw, f"{key}.credentials.{cname}", where)
            for cname, craw in creds_raw.items()
        }
        ignore_raw = traw.get("scan_ignore", [])
        if not isinstance(ignore_raw, list) or not all(isinstance(p, str) and p.strip() for p in ignore_raw):
            raise where.error(f"{key}.scan_ignore", 'must be a list of folder patterns, like ["data/", "*.cache"]')
        tenants[tid] = Tenant(tid, name, workspaces, creds, tuple(p.strip() for p in ignore_raw))
    return Config(
        tenants, broker, raw, audit=_audit(raw.get("audit", {}), where), sandbox=_sandbox(raw.get("sandbox", {}), where)
    )


def _audit(raw: Any, where: _Locator) -> AuditSettings:
    if not isinstance(raw, dict):
        raise where.error("audit", "must be a table")
    to_syslog = raw.get("syslog", False)
    if not isinstance(to_syslog, bool):
        raise where.error("audit.syslog", "must be true or false")
    return AuditSettings(syslog=to_syslog)


def _sandbox(raw: Any, where: _Locator) -> SandboxSettings:
    if not isinstance(raw, dict):
        raise where.error("sandbox", "must be a table")
    lists: dict[str, tuple[Path, ...]] = {}
    for key in ("read_write", "hide"):
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(p, str) and p.startswith(("/", "~")) for p in value):
            raise where.error(f"sandbox.{key}", 'must be a list of absolute paths, like ["~/.cache/pip"]')
        lists[key] = tuple(dict.fromkeys(resolve_workspace(p) for p in value))
    return SandboxSettings(**lists)


def _check_keys(raw: dict[str, Any], where: _Locator) -> None:
    """Refuse keys Outloop does not know (a typo such as `alow` would silently drop rules).

    What is known comes from the settings' own dataclasses, so a new setting is known
    the moment it exists. Keys and tables starting `x-` are the user's own notes.
    """
    tables = {f.name: _table_fields(f) for f in dataclasses.fields(Config) if f.name not in ("raw", "tenants")}
    _unknown(raw, {"tenants", *tables}, "", where)
    for name, known in tables.items():
        if isinstance(raw.get(name), dict) and known is not None:
            _unknown(raw[name], known, name, where)
    tenant_keys = {f.name for f in dataclasses.fields(Tenant)} - {"id"}
    credential_keys = {f.name for f in dataclasses.fields(Credential)} - {"tenant", "name"}
    tenants = raw.get("tenants")
    if not isinstance(tenants, dict):
        return
    seen: dict[str, str] = {}
    for tid, traw in tenants.items():
        if (other := seen.setdefault(tid.lower(), tid)) != tid:
            raise where.error(f"tenants.{tid}", f"differs from tenant {other!r} only in case; give them distinct ids")
        if not isinstance(traw, dict):
            continue
        _unknown(traw, tenant_keys, f"tenants.{tid}", where)
        credentials = traw.get("credentials")
        for cname, craw in credentials.items() if isinstance(credentials, dict) else ():
            if isinstance(craw, dict):
                _unknown(craw, credential_keys, f"tenants.{tid}.credentials.{cname}", where)


def _table_fields(f: dataclasses.Field[Any]) -> set[str] | None:
    """The keys of a settings table: the fields of the dataclass its Config field holds."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is None and f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    if default is None and f.name == "broker":
        default = BrokerSettings()
    return {g.name for g in dataclasses.fields(default)} if dataclasses.is_dataclass(default) else None


def _unknown(table: dict[str, Any], known: set[str], dotted: str, where: _Locator) -> None:
    for key in table:
        if key in known or key.startswith("x-"):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise where.error(
            f"{dotted}.{key}" if dotted else key,
            f"is not a setting Outloop knows{hint} (notes of your own go in keys or tables named x-…)",
        )


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of a loopback address "127.0.0.1:7878", "[::1]:7878" or "localhost:7878".

    Anything that is not loopback is refused: the broker's API must not be reachable
    from another machine. Port 0 lets the OS choose one at start.
    """
    import ipaddress

    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f'must be a loopback address and port, like "127.0.0.1:7878", not {text!r}')
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"must name a loopback IP address (127.0.0.1 or ::1), not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"{host} is not a loopback address; the broker listens on 127.0.0.1 or ::1 only")
    return str(address), int(port_text)


def _credential(tid: str, name: str, raw: Any, key: str, where: _Locator) -> Credential:
    if not NAME_RE.match(name):
        raise where.error(key, "credential names use letters, digits, '-', '_' and '.'")
    if not isinstance(raw, dict):
        raise where.error(key, "must be a table")
    base_url = raw.get("base_url")
    if not isinstance(base_url, str):
        raise where.error(f"{key}.base_url", "is required (the API's base URL)")
    problem = check_base_url(base_url)
    if problem:
        raise where.error(f"{key}.base_url", problem)
    auth_text = raw.get("auth", "bearer")
    if not isinstance(auth_text, str):
        raise where.error(f"{key}.auth", "must be a string")
    try:
        auth = Auth.parse(auth_text)
    except ValueError as e:
        raise where.error(f"{key}.auth", str(e)) from None
    rules: dict[str, tuple[str, ...]] = {}
    for kind in ("allow", "ask", "deny"):
        value = raw.get(kind, [])
        if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
            raise where.error(f"{key}.{kind}", 'must be a list of rules like "GET /repos/**"')
        for rule in value:
            try:
                parse_rule(rule)
            except RuleError as e:
                raise where.error(f"{key}.{kind}", str(e)) from None
        rules[kind] = tuple(value)
    opt_ins: list[bool] = []
    for opt in ("allow_encoded_slash", "allow_path_params"):
        flag = raw.get(opt, False)
        if not isinstance(flag, bool):
            raise where.error(f"{key}.{opt}", "must be true or false")
        opt_ins.append(flag)
    return Credential(
        tid,
        name,
        base_url.rstrip("/"),
        auth,
        rules["allow"],
        rules["ask"],
        rules["deny"],
        allow_encoded_slash=opt_ins[0],
        allow_path_params=opt_ins[1],
    )


def check_base_url(url: str) -> str | None:
    """Why `url` cannot be a credential's base URL, or None if it can."""
    # urlsplit silently drops tabs and newlines, so look at the text itself first.
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "must not contain spaces or control characters"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if "?" in url or "#" in url or "@" in parts.netloc:
        return "must not carry a query, fragment or user info"
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "has an invalid port"
    return None


def _overlap(ws: Path, tid: str, owner_of: dict[Path, str]) -> str | None:
    # Compares path parts as tuples: `x in path.parents` builds Path objects, which made
    # 500 workspaces take seconds to validate.
    mine = ws.parts
    for other, other_tid in owner_of.items():
        if other_tid == tid:
            continue
        theirs = other.parts
        if theirs == mine:
            return f"{ws} already belongs to tenant {other_tid!r}"
        shorter = min(len(theirs), len(mine))
        if theirs[:shorter] == mine[:shorter]:
            return f"{ws} overlaps {other} of tenant {other_tid!r}"
    return None


class _Locator:
    """Finds the line of a dotted key in the source text, for error messages."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def error(self, dotted: str, problem: str) -> ConfigError:
        line = self._line_of(dotted)
        at = f", line {line}" if line else ""
        return ConfigError(f"{self.source}{at}: {dotted} {problem}")

    def _line_of(self, dotted: str) -> int | None:
        try:
            lines = self.source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        parts = dotted.split(".")

        def key(part: str) -> str:  # a key as written: bare, "quoted" or 'quoted'
            e = re.escape(part)
            return rf"(?:{e}|\"{e}\"|'{e}')"

        def leaf_line(start: int, leaf: str) -> int | None:
            for j in range(start, len(lines)):
                if lines[j].lstrip().startswith("["):
                    break
                if re.match(rf"^\s*{key(leaf)}\s*=", lines[j]):
                    return j + 1
            return None

        # Look for the deepest table header that prefixes the key, then the leaf key after it.
        for depth in range(len(parts), 0, -1):
            header = r"\s*\.\s*".join(key(p) for p in parts[:depth])
            for i, text in enumerate(lines):
                if re.match(rf"^\s*\[\s*{header}\s*\]", text):
                    if depth == len(parts):
                        return i + 1
                    return leaf_line(i + 1, parts[depth]) or i + 1
        # A top-level key, before any table header.
        return leaf_line(0, parts[0])


# -- writing -----------------------------------------------------------------


class ConfigEditor:
    """Load, change and atomically save config.toml, keeping keys we do not know."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.raw = copy.deepcopy(read_raw(paths.config_file))
        validate(self.raw, paths.config_file)  # never build on a file we could not validate
        _check_approved(paths)

    def _tenants(self) -> dict[str, Any]:
        tenants: dict[str, Any] = self.raw.setdefault("tenants", {})
        return tenants

    def tenant(self, tid: str) -> dict[str, Any]:
        t = self._tenants().get(tid)
        if t is None:
            raise ConfigError(f"no tenant {tid!r}; `outloop tenant list` shows the tenants")
        assert isinstance(t, dict)
        return t

    def add_tenant(self, tid: str, name: str | None) -> None:
        if tid in self._tenants():
            raise ConfigError(f"tenant {tid!r} already exists")
        self._tenants()[tid] = {"name": name or tid, "workspaces": []}

    def remove_tenant(self, tid: str) -> list[str]:
        """Remove a tenant; returns the names of its credentials (to delete their secrets)."""
        t = self.tenant(tid)
        del self._tenants()[tid]
        return list(t.get("credentials", {}))

    def add_workspace(self, tid: str, folder: str) -> Path:
        path = resolve_workspace(folder)
        t = self.tenant(tid)
        workspaces = t.setdefault("workspaces", [])
        if any(resolve_workspace(w) == path for w in workspaces):
            raise ConfigError(f"{path} is already a workspace of {tid!r}")
        workspaces.append(display_workspace(path))
        return path

    def remove_workspace(self, folder: str) -> str:
        """Unmap a workspace folder; returns the tenant it belonged to."""
        path = resolve_workspace(folder)
        for tid, t in self._tenants().items():
            ws = t.get("workspaces", [])
            kept = [w for w in ws if resolve_workspace(w) != path]
            if len(kept) != len(ws):
                t["workspaces"] = kept
                return str(tid)
        raise ConfigError(f"{path} is not a mapped workspace")

    def add_credential(self, tid: str, name: str, table: dict[str, Any]) -> None:
        creds = self.tenant(tid).setdefault("credentials", {})
        if name in creds:
            raise ConfigError(f"tenant {tid!r} already has a credential {name!r}")
        creds[name] = table

    def remove_credential(self, tid: str, name: str) -> None:
        creds = self.tenant(tid).get("credentials", {})
        if name not in creds:
            raise ConfigError(f"tenant {tid!r} has no credential {name!r}")
        del creds[name]

    def save(self) -> Config:
        """Validate the edited document and write it atomically; returns the new Config."""
        config = validate(self.raw, self.paths.config_file)
        data = tomli_w.dumps(self.raw).encode("utf-8")
        try:
            before: bytes | None = self.paths.config_file.read_bytes()
        except OSError:
            before = None
        # Approved before it is written: the broker finds the new file already approved.
        config_approval.approve(self.paths, data)
        try:
            atomic_write(self.paths.config_file, data)
        except BaseException:
            if before is not None:  # the old file stays: so does its approval
                with contextlib.suppress(OSError):
                    config_approval.approve(self.paths, before)
            raise
        return config


def _check_approved(paths: Paths) -> None:
    """Refuse to build on a config.toml whose changes wait for the operator (they would pass unseen)."""
    known = config_approval.approved_digest()
    if known is None:
        return  # nothing approved yet on this machine: the first write approves
    try:
        data = paths.config_file.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError:
        return  # read_raw has already said what is wrong
    if config_approval.digest(data) != known:
        raise ConfigError(
            f"{paths.config_file} was changed outside Outloop and its changes wait for the operator: "
            "`outloop config accept` or `outloop config reject` first"
        )
