"""`outloop config accept | reject`: the operator's answer to a config change that waits.

A change to config.toml made outside Outloop that widens access is staged by
the broker (broker/config_gate.py). With a broker running, these commands ask
it over the operator channel (state/operator.sock, which a sandboxed session
cannot see; the broker also refuses a caller inside a session). With none
running, they compare config.toml with the approved copy themselves, and an
accept or reject is recorded in the audit chain all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tomllib
from typing import Any

from broker import config_approval
from broker.config import ConfigError, validate
from broker.config_review import review
from broker.paths import Paths, atomic_write


class _Refused(Exception):
    """One sentence for the operator; exit 1."""


def _ask(paths: Paths, op: str, **fields: Any) -> Any:
    """One request on the operator socket; the broker's answer (`ok`)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(paths.operator_socket))
        sock.sendall(json.dumps({"seq": 1, "op": op, **fields}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)["ok"]


def _broker_running(paths: Paths) -> bool:
    from broker.operator.client import operator_socket_live

    return operator_socket_live(paths.operator_socket)


def _offline_staged(paths: Paths) -> tuple[str, list[str], bytes, dict[str, Any]] | None:
    """(digest, widening changes, file bytes, approved document) when config.toml is not the approved one."""
    try:
        data = paths.config_file.read_bytes()
    except FileNotFoundError:
        data = b""
    approved = config_approval.read_approved(paths)
    if approved.digest is None or config_approval.digest(data) == approved.digest:
        return None
    baseline = tomllib.loads(approved.copy.decode("utf-8")) if approved.copy is not None else {}
    try:
        raw = tomllib.loads(data.decode("utf-8"))
        validate(raw, paths.config_file)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{paths.config_file}: {e}") from None
    changes = [c.text for c in review(baseline, raw).changes]
    return config_approval.digest(data), changes, data, baseline


def _audit_offline(paths: Paths, fields: dict[str, Any]) -> None:
    """Write one record into the chain with no broker running (it holds the log's lock otherwise)."""
    from broker.audit import AuditLog
    from broker.audit import keys as audit_keys

    async def write() -> None:
        log = AuditLog(paths.audit_dir)
        log.use_key(audit_keys.load_or_create_key(), audit_keys.read_head())
        async with log:
            await log.record(fields)
        if log.last is not None:
            audit_keys.write_head(log.last)

    asyncio.run(write())


def _decide(args: argparse.Namespace, accept: bool) -> int:
    paths = Paths.from_env()
    verb = "accept" if accept else "reject"
    if os.environ.get("OUTLOOP_SESSION"):
        raise _Refused(f"config changes are {verb}ed by the operator, from a terminal outside every agent session")
    as_json = bool(getattr(args, "json", False))
    if _broker_running(paths):
        staged = _ask(paths, "config_staged")
        if not staged:
            return _nothing(as_json)
        result = _ask(paths, f"config_{verb}", digest=staged["digest"])
        if result is not True:
            raise _Refused(str(result.get("error") if isinstance(result, dict) else result))
        changes = list(staged["changes"])
    else:
        found = _offline_staged(paths)
        if found is None:
            return _nothing(as_json)
        digest, changes, data, baseline = found
        approver = f"operator (pid {os.getpid()}, no broker running)"
        if accept:
            config_approval.approve(paths, data)
        else:
            import tomli_w

            restored = tomli_w.dumps(baseline).encode("utf-8")
            config_approval.approve(paths, restored)
            atomic_write(paths.config_file, restored)
        _audit_offline(paths, {"event": f"config_{verb}ed", "digest": digest, "changes": changes, "approver": approver})
    if as_json:
        print(json.dumps({"outcome": f"{verb}ed", "changes": changes}, indent=2))
    else:
        print(f"{verb}ed {len(changes)} change(s) to config.toml:")
        for line in changes:
            print(f"  {line}")
    return 0


def _nothing(as_json: bool) -> int:
    if as_json:
        print(json.dumps({"outcome": None, "changes": []}))
    else:
        print("no config change waits for the operator")
    return 0


def run_accept(args: argparse.Namespace) -> int:
    """Enforce the config change that waits (it widens access)."""
    try:
        return _decide(args, True)
    except _Refused as e:
        print(f"outloop: {e}", file=sys.stderr)
        return 1


def run_reject(args: argparse.Namespace) -> int:
    """Discard the config change that waits: config.toml goes back to the enforced config."""
    try:
        return _decide(args, False)
    except _Refused as e:
        print(f"outloop: {e}", file=sys.stderr)
        return 1
