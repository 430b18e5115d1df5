"""`outloop:TENANT/CREDENTIAL` placeholders: what `outloop import` leaves where a key was.

`outloop run` reads them in two places and gives the command the session token
instead, wherever the credential's SDK is pointed at the broker (its base-URL
variable names the credential's proxy):

* its own environment (a variable already holding a placeholder);
* the `.env`-like files of the folder it starts in and of each folder above it up
  to the workspace's root, so that a program loading them itself finds the
  variable already set. python-dotenv's `load_dotenv()` and Node's `--env-file`
  (and npm's dotenv, Vite, Next.js) never override a variable that is already set,
  so the token wins; a loader told to override (`load_dotenv(override=True)`),
  or a shell that `source`s the file, gets the placeholder, and the call fails
  without a key.

Kept light (the standard library and the `.env` parser): `outloop run` imports it
on every agent launch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from broker.leaks.envfile import parse_env

PLACEHOLDER_PREFIX = "outloop:"
PLACEHOLDER_RE = re.compile(
    r"outloop:(?P<tenant>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})/(?P<credential>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
)
_MAX_BYTES = 1024 * 1024


def placeholder(tenant: str, credential: str) -> str:
    """The value a key is replaced with in its file."""
    return f"{PLACEHOLDER_PREFIX}{tenant}/{credential}"


def parse_placeholder(value: str) -> tuple[str, str] | None:
    """(tenant, credential) of an `outloop:TENANT/CREDENTIAL` value, else None."""
    m = PLACEHOLDER_RE.fullmatch(value.strip())
    return (m.group("tenant"), m.group("credential")) if m else None


def _env_like(name: str) -> bool:
    return name in (".env", ".envrc") or name.startswith(".env.") or name.endswith(".env")


def folders_up_to(start: Path, root: Path) -> list[Path]:
    """`start` and each folder above it, up to and including `root` (just `start` if outside it)."""
    out = [start]
    here = start
    while here != root and root in here.parents:
        here = here.parent
        out.append(here)
    return out


def file_placeholders(folders: Iterable[Path]) -> dict[str, str]:
    """Variable -> placeholder value, from the `.env`-like files of `folders` (nearest first wins)."""
    found: dict[str, str] = {}
    for folder in folders:
        try:
            names = sorted(n for n in os.listdir(folder) if _env_like(n))
        except OSError:
            continue
        for name in names:
            try:
                with open(folder / name, "rb") as f:
                    text = f.read(_MAX_BYTES).decode("utf-8", "replace")
            except OSError:
                continue
            for entry in parse_env(text):
                if parse_placeholder(entry.value) is not None:
                    found.setdefault(entry.key, entry.value.strip())
    return found


def redirected(credential: str, session_env: Mapping[str, str], listen: str | None) -> bool:
    """Whether a base-URL variable of the session points an SDK at this credential's proxy."""
    if not listen:
        return False
    root = f"{listen}/v1/proxy/{credential}"
    return any(v == root or v.startswith(root + "/") for v in session_env.values())


def resolve(
    environ: Mapping[str, str],
    from_files: Mapping[str, str],
    *,
    tenant: str,
    token: str,
    session_env: Mapping[str, str],
    listen: str | None,
) -> tuple[dict[str, str], list[str]]:
    """(variables to set, notes for stderr) for the placeholders of `environ` and `from_files`.

    A variable the environment already holds with a real value is left alone (a
    loader would not override it either). Notes name variables and credentials,
    never a value.
    """
    wanted: dict[str, str] = {k: v for k, v in from_files.items() if k not in environ}
    wanted.update({k: v for k, v in environ.items() if v.startswith(PLACEHOLDER_PREFIX)})
    updates: dict[str, str] = {}
    notes: list[str] = []
    for var, value in sorted(wanted.items()):
        parsed = parse_placeholder(value)
        if parsed is None:
            continue
        owner, credential = parsed
        if owner != tenant:
            notes.append(f"{var} names tenant {owner!r}'s credential, not {tenant!r}'s: left as it is")
        elif redirected(credential, session_env, listen):
            updates[var] = token
        else:
            notes.append(
                f"{var} stays a placeholder: no SDK base-URL variable points {credential!r} at the broker "
                f"(call it with `outloop call {credential} METHOD PATH`, or through the proxy)"
            )
    return updates, notes
