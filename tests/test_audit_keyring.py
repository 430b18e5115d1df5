"""The audit chain sealed with the keyring's HMAC key: rewrites, cuts and wrong keys (issue 14).

Real broker, real keyring (the test session's), real files, `outloop audit verify` as a process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import keyring
import pytest
from support.fixtures import BrokerThread, World

from broker.audit import GENESIS, AuditError, AuditKey, AuditLog, canonical_json, verify
from broker.audit import keys as audit_keys
from broker.engine import Engine
from broker.secrets import SERVICE


def req(cred: str, method: str, path: str) -> dict[str, Any]:
    return {"payload": {"credential": cred, "method": method, "path": path}}


def run_broker_once(world: World, calls: int = 2) -> None:
    thread = BrokerThread(world.paths).start()
    try:
        world.agent(world.acme, [req("api", "GET", f"/echo/{n}") for n in range(calls)])
    finally:
        thread.stop()


def day_file(world: World) -> Path:
    (path,) = sorted(world.paths.audit_dir.glob("audit-*.jsonl"))
    return path


def verify_cli(world: World) -> tuple[int, dict[str, Any], str]:
    ran = world.outloop("audit", "verify", "--json", cwd=world.unmapped)
    return ran.returncode, json.loads(ran.stdout), ran.stderr


def test_the_broker_seals_its_records_and_marks_start_and_stop(world: World) -> None:
    run_broker_once(world)
    records = world.audit()
    events = [r["event"] for r in records]
    assert events[0] == "audit_hmac_started" and events[1] == "broker_started"
    assert events[-1] == "broker_stopped"
    assert all(r["chain"] == "hmac-sha256" for r in records)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    key = audit_keys.read_key()
    assert key is not None and records[1]["key_id"] == key.key_id
    assert key.to_text() not in world.audit_bytes().decode()
    code, out, _ = verify_cli(world)
    assert code == 0 and out["ok"] and out["hmac_records"] == len(records) and out["plain_records"] == 0
    # The head kept in the keyring names the last record, broker_stopped.
    head = audit_keys.read_head()
    assert head is not None and (head.hash, head.seq) == (records[-1]["hash"], records[-1]["seq"])


def _rechain_plain(lines: list[dict[str, Any]]) -> list[bytes]:
    """What an agent without the key can do: rewrite the records and recompute a SHA-256 chain."""
    prev, out = GENESIS, []
    for rec in lines:
        rec = {k: v for k, v in rec.items() if k not in ("hash", "chain")}
        rec["prev"] = prev
        rec["hash"] = hashlib.sha256(prev.encode() + canonical_json(rec)).hexdigest()
        prev = rec["hash"]
        out.append(json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
    return out


def test_an_offline_rewrite_fails_verify(world: World) -> None:
    run_broker_once(world)
    records = world.audit()
    for rec in records:
        if rec.get("decision") == "allow":
            rec["decision"] = "denied_by_policy"  # hide that the call was made
    path = day_file(world)
    # 1. Keep the HMAC marker and recompute plain hashes: the HMAC no longer matches.
    kept = []
    prev = GENESIS
    for rec in records:
        rec = dict(rec, prev=prev)
        rec["hash"] = hashlib.sha256(prev.encode() + canonical_json(rec)).hexdigest()
        prev = rec["hash"]
        kept.append(json.dumps(rec, separators=(",", ":")).encode() + b"\n")
    path.write_bytes(b"".join(kept))
    (world.paths.audit_dir / "audit.head").unlink()  # and the head file too
    code, out, _ = verify_cli(world)
    assert code == 1 and out["kind"] in ("edited", "key_mismatch")
    # 2. Drop the HMAC marker, a whole plain SHA-256 chain: the keyring knows better.
    path.write_bytes(b"".join(_rechain_plain(records)))
    code, out, _ = verify_cli(world)
    assert code == 1 and not out["ok"] and out["kind"] in ("cut", "forged")
    # 3. The text output says BROKEN, never OK.
    ran = world.outloop("audit", "verify", cwd=world.unmapped)
    assert ran.returncode == 1 and "BROKEN" in ran.stderr and "OK" not in ran.stdout


def test_a_cut_end_is_counted_by_the_keyring_head(world: World) -> None:
    run_broker_once(world, calls=3)
    path = day_file(world)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-3]))
    (world.paths.audit_dir / "audit.head").unlink()  # what an unsandboxed agent could do
    code, out, _ = verify_cli(world)
    assert code == 1 and out["kind"] == "cut" and out["cut"] == 3
    assert "3 records were removed from the end" in out["bad"]["reason"]
    # A restart keeps the gap visible and countable.
    run_broker_once(world, calls=1)
    code, out, _ = verify_cli(world)
    assert code == 1 and out["kind"] == "removed" and out["cut"] == 3


def test_a_cut_from_the_middle_is_counted(world: World) -> None:
    run_broker_once(world, calls=3)
    path = day_file(world)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + lines[4:]))
    code, out, _ = verify_cli(world)
    assert code == 1 and out["kind"] == "removed" and out["cut"] == 2 and out["bad"]["line"] == 3


def test_a_wrong_or_missing_key_is_a_clear_error(world: World) -> None:
    run_broker_once(world)
    keyring.set_password(SERVICE, audit_keys.KEY_USERNAME, AuditKey.generate().to_text())
    code, out, _ = verify_cli(world)
    assert code == 1 and not out["ok"] and out["kind"] == "key_mismatch"
    ran = world.outloop("audit", "verify", cwd=world.unmapped)
    assert ran.returncode == 1 and "not the key this log was sealed with" in ran.stderr
    # The broker will not go on sealing under another key.
    engine = Engine(world.paths)
    with pytest.raises(AuditError, match="not the key this audit log was sealed with"):
        asyncio.run(engine.start(serve=False, watch=False))
    keyring.delete_password(SERVICE, audit_keys.KEY_USERNAME)
    code, out, _ = verify_cli(world)
    assert code == 2 and out["error"]["code"] == "key_missing"
    ran = world.outloop("audit", "verify", cwd=world.unmapped)
    assert ran.returncode == 2 and "holds no audit key" in ran.stderr and "Traceback" not in ran.stderr


def test_a_plain_log_is_continued_with_hmac(world: World) -> None:
    async def legacy() -> None:
        async with AuditLog(world.paths.audit_dir) as log:
            for n in range(3):
                await log.record({"event": "attempt", "tenant": "acme", "path": f"/old/{n}"})

    asyncio.run(legacy())
    run_broker_once(world, calls=1)
    records = world.audit()
    assert [r.get("chain") for r in records[:3]] == [None] * 3
    assert records[3]["event"] == "audit_hmac_started" and records[3]["after"] == 3
    assert records[3]["prev"] == records[2]["hash"]
    code, out, _ = verify_cli(world)
    assert code == 0 and out["plain_records"] == 3 and out["hmac_records"] == len(records) - 3
    assert any("plain SHA-256" in note for note in out["notes"])
    # A plain record appended after the sealed ones is a forgery.
    forged = _rechain_plain(records)[-1]
    last = records[-1]
    rec = {"ts": last["ts"], "id": "f" * 24, "event": "attempt", "prev": last["hash"], "seq": last["seq"] + 1}
    rec["hash"] = hashlib.sha256(last["hash"].encode() + canonical_json(rec)).hexdigest()
    assert forged
    with day_file(world).open("ab") as f:
        f.write(json.dumps(rec, separators=(",", ":")).encode() + b"\n")
    key = audit_keys.read_key()
    result = verify(world.paths.audit_dir, key, audit_keys.read_head())
    assert not result.ok and result.kind == "forged"
