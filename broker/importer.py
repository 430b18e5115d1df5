"""Importing a workspace's `.env` keys: keyring first, then the file, never half of either.

`plan_import` reads the `.env`-like files of a workspace (or one file), finds the
values that are keys (leak rules, the generic rule, secrets the keyring already
manages) and says, per key, which credential it becomes: its provider (from
broker/providers.py), base URL, auth and rules. Nothing is written.

`apply_import` carries a plan out one file at a time:

1. the file must still be byte for byte what the plan read, or the import stops;
2. each key of the file not yet managed goes to the keyring and config.toml
   (broker/manage.py: the keyring first, and a failed config save takes it back);
3. the file is rewritten atomically (a temporary file beside it, fsync, rename,
   the same mode) with each key's value replaced by `outloop:TENANT/CREDENTIAL`
   and every other byte as it was; a symlinked file is rewritten at its target.

If step 2 fails the file is untouched; if step 3 fails the credentials step 2
added are removed again. A crash between the steps leaves the old file (its
keys now managed: a second run finds them in the keyring and only rewrites the
file) or the new one, never a half file. No copy of the old file is kept, and
the temporary file holds the new content, never an imported key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from broker import manage
from broker.config import NAME_RE, Config, ConfigError, check_base_url, load_config
from broker.leaks.envfile import EnvEntry, env_dict, parse_env
from broker.leaks.rules import SecretMatch, find_secrets
from broker.leaks.scan import DEFAULT_MAX_BYTES, FolderIgnore, WorkspaceIndex, fingerprint, is_env_like, mask, walk
from broker.paths import Paths, fsync_dir
from broker.placeholders import parse_placeholder, placeholder
from broker.providers import Provider, fill, provider_for_key, template_fields
from broker.secrets import Secret, SecretStore

TEMP_PREFIX = ".outloop-import."  # never `.env`-like, so a scan does not read it
# Rules whose values the broker cannot put on the wire as an API key.
_NOT_API_KEYS = frozenset(
    {"private-key", "openssh-private-key", "pgp-private-key", "private-key-base64", "putty-private-key"}
)
# Test hook: "STEP:MARKER" makes the import write MARKER at STEP and wait until it is removed
# (the crash tests kill -9 the process there). Steps: after-keyring, before-rename.
PAUSE_ENV = "OUTLOOP_TEST_IMPORT_PAUSE"


class ImportProblem(ConfigError):
    """The import cannot go on; the message says what to do. Nothing half-done is left."""


class FileChanged(ImportProblem):
    """A file changed between the plan and its rewrite: the import stops there."""


@dataclass(frozen=True)
class Spot:
    """Where one key sits: the file (as found, and its real path) and the value's span in its text."""

    shown: Path
    real: Path
    variable: str
    line: int
    start: int
    end: int


@dataclass
class PlannedKey:
    """One distinct key value and the credential it becomes (or already is, when `managed`)."""

    secret: Secret
    credential: str
    provider: Provider | None
    variable: str
    rule: str
    preview: str
    fingerprint: str
    base_url: str = ""  # "" until known (an unknown provider: given by the user, or left in place)
    auth: str = "bearer"
    allow: tuple[str, ...] = ()
    ask: tuple[str, ...] = ()
    managed: bool = False
    needs: str = ""  # why the key cannot be imported yet (a base URL, a variable of the file)
    spots: list[Spot] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.needs

    def rules_text(self) -> str:
        if not (self.allow or self.ask):
            return "no rules: every call asks"
        parts = []
        if self.allow:
            parts.append("allow " + ", ".join(self.allow))
        if self.ask:
            parts.append("ask " + ", ".join(self.ask))
        return " · ".join(parts)


@dataclass(frozen=True)
class Note:
    """A value left in place, and why (or something a reader of the plan must know)."""

    shown: Path
    line: int
    variable: str
    message: str


@dataclass
class FileState:
    """A file as the plan read it: its bytes' digest and its mode."""

    shown: Path
    real: Path
    digest: str
    mode: int
    text: str = field(repr=False)


@dataclass
class ImportPlan:
    """What an import would do; `apply_import` does it."""

    tenant: str
    workspace: Path
    keys: list[PlannedKey] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    files: dict[Path, FileState] = field(default_factory=dict)  # by real path
    files_read: int = 0

    def ready(self) -> list[PlannedKey]:
        return [k for k in self.keys if k.ready]

    def pending(self) -> list[PlannedKey]:
        """Keys of an unknown provider (or missing a variable) that need a base URL first."""
        return [k for k in self.keys if not k.ready]

    def files_to_rewrite(self) -> list[FileState]:
        wanted = {s.real for k in self.ready() for s in k.spots}
        return [f for real, f in self.files.items() if real in wanted]

    def resolve(self, key: PlannedKey, base_url: str, auth: str = "bearer") -> None:
        """Give a pending key its base URL and auth (no rules: every call asks)."""
        problem = check_base_url(base_url)
        if problem:
            raise ImportProblem(f"{key.variable}: the base URL {problem}")
        try:
            manage._check_fields(None, auth, {})
        except manage.BadField as e:
            raise ImportProblem(f"{key.variable}: {e.problem}") from None
        key.base_url, key.auth, key.needs = base_url, auth, ""


@dataclass
class ImportResult:
    stored: list[str] = field(default_factory=list)  # credentials added to the keyring
    reused: list[str] = field(default_factory=list)  # already managed: only the file changed
    rewritten: list[Path] = field(default_factory=list)


# -- planning -----------------------------------------------------------------------


def tenant_of(config: Config, path: Path) -> tuple[str, Path] | None:
    """The tenant and workspace owning `path` (its folder's symlinks resolved, not its own)."""
    here = Path(os.path.realpath(path.parent)) / path.name if not path.is_dir() else path.resolve()
    index = WorkspaceIndex((t.id, ws) for t in config.tenants.values() for ws in t.workspaces)
    return index.owner_of(here)


def _env_files(target: Path, workspace: Path, ignore: Iterable[str]) -> list[Path]:
    if not target.is_dir():
        return [target]
    files, _ = walk(target, FolderIgnore.for_workspace(workspace, ignore))
    return sorted(p for p in files if is_env_like(p))


def _read(path: Path) -> tuple[bytes | None, str]:
    """The file's bytes, or None and why it cannot be imported from."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "does not exist (a dangling symlink?)"
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return None, "is not a regular file"
    if st.st_size > DEFAULT_MAX_BYTES:
        return None, f"is larger than {DEFAULT_MAX_BYTES} bytes"
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    if b"\0" in data[:8192]:
        return None, "is binary"
    return data, ""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _covering(entry: EnvEntry, matches: list[SecretMatch]) -> tuple[SecretMatch | None, SecretMatch | None]:
    """(a match spanning the entry's whole value, else a match inside it)."""
    inside = [m for m in matches if m.start >= entry.value_start and m.end <= entry.value_end]
    for m in inside:
        if m.start == entry.value_start and m.end == entry.value_end:
            return m, None
    return None, (inside[0] if inside else None)


_NAME_SUFFIXES = ("_API_KEY", "_ACCESS_TOKEN", "_AUTH_TOKEN", "_API_TOKEN", "_SECRET_KEY", "_TOKEN", "_KEY", "_SECRET")


def _name_from_variable(variable: str) -> str:
    name = variable.upper()
    for suffix in _NAME_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return name if name and NAME_RE.match(name) else "key"


def _unique(base: str, taken: set[str]) -> str:
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def plan_import(
    paths: Paths,
    target: Path,
    *,
    tenant: str | None = None,
    secrets: SecretStore | None = None,
    base_urls: Mapping[str, str] | None = None,
    auths: Mapping[str, str] | None = None,
    only_fingerprints: Iterable[str] | None = None,
) -> ImportPlan:
    """What importing `target` (a workspace folder or one file) would do; writes nothing.

    `base_urls` / `auths` give a base URL and auth, by variable name, for keys of a
    provider the catalog does not know. `only_fingerprints` keeps only those keys
    (an alert's). Raises ImportProblem when the target belongs to no tenant.
    """
    secrets = secrets or SecretStore()
    target = Path(os.path.abspath(target.expanduser()))
    if not (target.exists() or target.is_symlink()):
        raise ImportProblem(f"{target} does not exist; give a workspace folder or a .env file")
    config = load_config(paths)
    owner = tenant_of(config, target)
    if owner is None:
        hint = tenant or "TENANT"
        raise ImportProblem(
            f"{target} is in no tenant's workspace; map it first with `outloop workspace add {hint} PATH`"
        )
    owner_tenant, workspace = owner
    if tenant is not None and tenant != owner_tenant:
        raise ImportProblem(f"{target} belongs to tenant {owner_tenant!r}, not {tenant!r}; nothing was imported")
    the_tenant = config.tenants[owner_tenant]
    keys_by_owner = [(t.id, name) for t in config.tenants.values() for name in t.credentials]
    managed = {s.reveal(): key for key, s in secrets.managed(keys_by_owner).items()}
    index = WorkspaceIndex((t.id, ws) for t in config.tenants.values() for ws in t.workspaces)
    wanted = set(only_fingerprints) if only_fingerprints is not None else None
    base_urls, auths = dict(base_urls or {}), dict(auths or {})

    plan = ImportPlan(owner_tenant, workspace)
    taken = set(the_tenant.credentials)
    by_value: dict[str, PlannedKey] = {}
    for path in _env_files(target, workspace, the_tenant.scan_ignore):
        real = Path(os.path.realpath(path))
        if real != path:
            real_owner = index.owner_of(real)
            if real_owner is not None and real_owner[0] != owner_tenant:
                plan.notes.append(
                    Note(path, 0, "", f"is a symlink into tenant {real_owner[0]!r}'s workspace; not imported here")
                )
                continue
        if real in plan.files:  # two links to one file
            continue
        data, why = _read(path)
        if data is None:
            plan.notes.append(Note(path, 0, "", why))
            continue
        plan.files_read += 1
        text = data.decode("utf-8", "surrogateescape")
        found = _plan_file(plan, path, real, text, managed, by_value, taken, wanted, base_urls, auths)
        if not found:
            continue
        mode = stat.S_IMODE(os.stat(real).st_mode)
        # The mode, not only access(): a file made read-only says "leave me", even to root.
        read_only = not mode & stat.S_IWUSR or not os.access(real, os.W_OK)
        if read_only or not os.access(real.parent, os.W_OK | os.X_OK):
            for key, spot in found:
                key.spots.remove(spot)
            what = "the file is read-only" if read_only else f"its folder {real.parent} is read-only"
            plan.notes.append(
                Note(path, 0, "", f"holds {len(found)} key(s) but {what}; make it writable and run again")
            )
            continue
        plan.files[real] = FileState(path, real, _digest(data), mode, text)
    plan.keys = [k for k in by_value.values() if k.spots]
    return plan


def _plan_file(
    plan: ImportPlan,
    path: Path,
    real: Path,
    text: str,
    managed: Mapping[str, tuple[str, str]],
    by_value: dict[str, PlannedKey],
    taken: set[str],
    wanted: set[str] | None,
    base_urls: Mapping[str, str],
    auths: Mapping[str, str],
) -> list[tuple[PlannedKey, Spot]]:
    """Add the file's keys to the plan; returns the (key, spot) pairs added."""
    added: list[tuple[PlannedKey, Spot]] = []
    entries = parse_env(text)
    if not entries:
        return added
    variables = env_dict(text)
    matches = find_secrets(text, env_like=True)
    tenant = plan.tenant

    def note(entry: EnvEntry, message: str) -> None:
        plan.notes.append(Note(path, entry.line, entry.key, message))

    for entry in entries:
        value = entry.value
        raw = text[entry.value_start : entry.value_end]
        if not value.strip():
            continue
        if wanted is not None and fingerprint(raw) not in wanted and fingerprint(value) not in wanted:
            continue
        ph = parse_placeholder(value)
        if ph is not None:
            if ph[0] != tenant:
                note(entry, f"is a placeholder for tenant {ph[0]!r}'s credential, not {tenant!r}'s; left as it is")
            else:
                note(entry, f"is already a placeholder ({ph[0]}/{ph[1]}); nothing to do")
            continue
        owner = managed.get(value)
        rule = ""
        if owner is not None and owner[0] != tenant:
            note(entry, f"holds tenant {owner[0]!r}'s credential {owner[1]!r}: rotate that key; not imported here")
            continue
        if owner is None:
            whole, part = _covering(entry, matches)
            if whole is None:
                if part is not None and part.rule_id in _NOT_API_KEYS:
                    note(entry, "holds a private key, which the broker cannot send as an API key; left in place")
                elif part is not None:
                    note(
                        entry,
                        f"holds a key inside a longer value ({part.rule_id}); not imported: move it out by hand",
                    )
                continue
            rule = whole.rule_id
            if rule in _NOT_API_KEYS:
                note(entry, "holds a private key, which the broker cannot send as an API key; left in place")
                continue
        else:
            rule = f"managed-secret:{owner[0]}/{owner[1]}"
        if "\n" in value or "\r" in value:
            note(entry, "holds a line break, which no API key has; left in place")
            continue
        key = by_value.get(value)
        if key is None:
            key = _new_key(tenant, entry, value, raw, rule, owner, variables, taken, base_urls, auths)
            by_value[value] = key
        spot = Spot(path, real, entry.key, entry.line, entry.value_start, entry.value_end)
        key.spots.append(spot)
        added.append((key, spot))
    return added


def _new_key(
    tenant: str,
    entry: EnvEntry,
    value: str,
    raw: str,
    rule: str,
    owner: tuple[str, str] | None,
    variables: Mapping[str, str],
    taken: set[str],
    base_urls: Mapping[str, str],
    auths: Mapping[str, str],
) -> PlannedKey:
    def planned(name: str, provider: Provider | None = None, managed: bool = False) -> PlannedKey:
        return PlannedKey(
            secret=Secret(value),
            credential=name,
            provider=provider,
            variable=entry.key,
            rule=rule,
            preview=mask(raw),
            fingerprint=fingerprint(raw),
            allow=provider.allow if provider else (),
            ask=provider.ask if provider else (),
            managed=managed,
        )

    if owner is not None:
        return planned(owner[1], managed=True)
    provider = provider_for_key(entry.key, rule)
    if provider is None:
        key = planned(_unique(_name_from_variable(entry.key), taken))
        given = base_urls.get(entry.key)
        if given is None:
            key.needs = (
                "an unknown provider: give its base URL (--base-url "
                f"{entry.key}=URL, and --auth {entry.key}=header:Name unless it takes a bearer token)"
            )
        else:
            key.base_url, key.auth = given, auths.get(entry.key, "bearer")
        return key
    key = planned(_unique(provider.name, taken), provider)
    # The project's own base URL for the provider (a proxy, Azure, a test server) wins over the catalog's.
    from_file = next(
        (variables[v] for v in provider.base_url_env if variables.get(v, "").startswith(("https://", "http://"))),
        None,
    )
    base_url = base_urls.get(entry.key) or from_file or fill(provider.base_url, variables)
    auth = auths.get(entry.key) or fill(provider.auth, variables)
    if base_url is None or auth is None:
        missing = [
            v for v in template_fields(provider.base_url) + template_fields(provider.auth) if not variables.get(v)
        ]
        key.needs = (
            f"{provider.title} needs {', '.join(missing)} in the same file (or --base-url/--auth {entry.key}=...)"
        )
    else:
        key.base_url, key.auth = base_url, auth
    return key


# -- applying -----------------------------------------------------------------------


def _pause(step: str) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, marker = spec.partition(":")
    if name != step or not marker:
        return
    Path(marker).write_text(str(os.getpid()), encoding="utf-8")
    deadline = time.monotonic() + 120
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.01)


def rewritten(text: str, spots: Iterable[tuple[Spot, str]]) -> str:
    """`text` with each spot's value replaced by its placeholder; every other character kept."""
    out = text
    for spot, value in sorted(spots, key=lambda sv: sv[0].start, reverse=True):
        out = out[: spot.start] + value + out[spot.end :]
    return out


def _clear_stale_temps(folder: Path, name: str) -> None:
    """Temporary files a crashed import left beside `name` (they hold its new content only)."""
    with contextlib.suppress(OSError), os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(f"{TEMP_PREFIX}{name}.") and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _replace(state: FileState, data: bytes) -> None:
    """Write `data` beside the file, fsync, check the file is still as planned, rename over it."""
    real = state.real
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{real.name}.", dir=real.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, state.mode)
        _pause("before-rename")
        if _digest(real.read_bytes()) != state.digest:
            raise FileChanged(f"{state.shown} changed while it was being imported; run `outloop import` again")
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(real.parent)


def apply_import(
    plan: ImportPlan,
    paths: Paths,
    secrets: SecretStore | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> ImportResult:
    """Carry out the plan's ready keys, file by file (see the module docstring).

    Raises FileChanged when a file is no longer what the plan read (the files
    before it are done, it and those after it are untouched), or the error of a
    failed keyring or file write (that file's new credentials rolled back).
    """
    secrets = secrets or SecretStore()
    result = ImportResult()
    stored: set[str] = set()
    for state in plan.files_to_rewrite():
        keys = [k for k in plan.ready() if any(s.real == state.real for s in k.spots)]
        _clear_stale_temps(state.real.parent, state.real.name)
        try:
            data = state.real.read_bytes()
        except OSError as e:
            raise ImportProblem(f"{state.shown} can no longer be read ({e.strerror}); stopped") from None
        if _digest(data) != state.digest:
            raise FileChanged(
                f"{state.shown} changed since the plan; stopped before touching it "
                f"({len(result.rewritten)} file(s) done); run `outloop import` again"
            )
        added: list[PlannedKey] = []
        try:
            for key in keys:
                if key.managed or key.credential in stored:
                    continue
                new = manage.check_credential(
                    paths,
                    plan.tenant,
                    key.credential,
                    base_url=key.base_url,
                    auth=key.auth,
                    allow=list(key.allow),
                    ask=list(key.ask),
                )
                manage.add_credential(new, key.secret, secrets)
                added.append(key)
                stored.add(key.credential)
            _pause("after-keyring")
            spots = [(s, placeholder(plan.tenant, k.credential)) for k in keys for s in k.spots if s.real == state.real]
            _replace(state, rewritten(state.text, spots).encode("utf-8", "surrogateescape"))
        except BaseException:
            for key in added:  # the file still holds them: take the new credentials back out
                with contextlib.suppress(Exception):
                    manage.remove_credential(paths, plan.tenant, key.credential, secrets)
                stored.discard(key.credential)
            raise
        result.rewritten.append(state.shown)
        if progress is not None:
            progress(f"rewrote {state.shown}")
    for key in plan.ready():
        if key.credential in stored:
            result.stored.append(key.credential)
        elif key.managed:
            result.reused.append(key.credential)
    return result


def importable_alert(path: str, line: int, rule: str) -> str | None:
    """What the dashboard offers to move into the keyring for an alert: the provider's title, or None.

    Only a `.env`-like file's finding whose provider the catalog knows (by its rule
    or its variable), or a value the keyring already manages.
    """
    if not is_env_like(path):
        return None
    if rule.startswith("managed-secret:"):
        return "the keyring (already managed)"
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return None
    for entry in parse_env(text):
        if entry.line == line:
            provider = provider_for_key(entry.key, rule)
            if provider is not None:
                return provider.title
    return None
