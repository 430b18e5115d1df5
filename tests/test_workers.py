"""Forwarding workers (broker/workers.py): calls made while others are on the wire go
through a worker process, with the same key, redaction and audit as in-process calls."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fixtures import BrokerThread, World, wait_for

from broker.calls import workers
from broker.secrets import SecretStoreError

# Each agent process makes its calls one after another; several agents at once keep
# more than one call on the wire, which is when the broker hands calls to a worker.
AGENT = r"""
import json, sys
from broker.client import call
from broker.paths import Paths
sock = Paths.from_env().socket
out = []
for target in json.loads(sys.argv[1]):
    path, _, query = target.partition("?")
    q = dict(p.split("=") for p in query.split("&")) if query else None
    r = call(sock, {"credential": "api", "method": "GET", "path": path, "query": q}, timeout=60)
    out.append({"status": r.status, "body": r.json()})
print(json.dumps(out))
"""


@pytest.fixture
def pooled(world: World) -> Iterator[BrokerThread]:
    world.configure(forward_workers=1)
    thread = BrokerThread(world.paths).start()
    try:
        yield thread
    finally:
        thread.stop()


def health(broker: BrokerThread) -> dict[str, Any]:
    info: dict[str, Any] = broker.call(broker.engine.health)["forward_workers"]
    return info


def agents(world: World, folder: Path, paths_per_agent: list[list[str]]) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", AGENT, json.dumps(paths)],
            cwd=folder,
            env=world.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for paths in paths_per_agent
    ]


def results(world: World, procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        world.assert_clean(stdout + stderr)
        out.extend(json.loads(stdout))
    return out


def busy_until_a_worker_runs(world: World, broker: BrokerThread) -> None:
    """Workers start on the first busy moment; keep the broker busy until one is up."""
    deadline = time.monotonic() + 60
    while not health(broker)["pids"]:
        assert time.monotonic() < deadline, "no forwarding worker started"
        results(world, agents(world, world.acme, [["/slow/warm?s=0.2"]] * 3))


def test_busy_calls_go_through_a_worker_with_the_right_key_and_redacted(world: World, pooled: BrokerThread) -> None:
    busy_until_a_worker_runs(world, pooled)
    before = health(pooled)["calls"]
    world.upstream.clear()
    paths = [[f"/echo/{a}-{i}" for i in range(10)] for a in range(4)]
    procs = [*agents(world, world.acme, paths), *agents(world, world.globex, paths)]
    answers = results(world, procs)

    assert health(pooled)["calls"] > before  # some of them went through the worker
    assert len(answers) == 80
    for answer in answers:
        assert answer["status"] == 200
        body = answer["body"]
        assert body["body"]["echo"]["plain"] == "[REDACTED:api]"
        assert body["headers"]["x-echo-plain"] == "[REDACTED:api]"
        world.assert_clean_deep(body)
    for rec in world.upstream.records:
        tenant = rec.path.split("/")[1]
        assert rec.header("Authorization") == f"Bearer {world.keys[(tenant, 'api')]}"
    outcomes = [r for r in world.audit() if r["event"] == "outcome" and r.get("status") == 200]
    assert len(outcomes) >= 80 and all(r["bytes"] > 0 for r in outcomes)
    world.assert_clean(world.audit_bytes())


def test_a_worker_never_holds_a_secret_in_its_arguments_or_environment(world: World, pooled: BrokerThread) -> None:
    busy_until_a_worker_runs(world, pooled)
    for pid in health(pooled)["pids"]:
        for name in ("cmdline", "environ"):
            world.assert_clean(Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" "))


def test_a_worker_killed_mid_call_fails_its_calls_and_a_new_one_takes_over(world: World, pooled: BrokerThread) -> None:
    busy_until_a_worker_runs(world, pooled)
    (pid,) = health(pooled)["pids"]
    procs = agents(world, world.acme, [["/slow/killed?s=3"]] * 4)
    wait_for(lambda: sum("/slow/killed" in r.path for r in world.upstream.records) >= 3, what="calls on the wire")
    os.kill(pid, signal.SIGKILL)
    answers = results(world, procs)
    failed = [a for a in answers if a["status"] == 502]
    assert failed, answers  # the calls the worker was making
    for answer in failed:
        assert answer["body"]["error"]["code"] == "upstream_error"
        assert "worker" in answer["body"]["error"]["message"]
    assert health(pooled)["lost"] == 1
    records = world.audit()
    assert sum(r["event"] == "outcome" and r.get("status") == "upstream_error" for r in records) == len(failed)

    busy_until_a_worker_runs(world, pooled)  # a new worker comes up on a busy moment
    assert health(pooled)["pids"] != [pid]
    answers = results(world, agents(world, world.acme, [[f"/echo/after-{i}"] for i in range(4)]))
    assert all(a["status"] == 200 for a in answers)


def test_a_worker_never_runs_code_from_the_folder_the_broker_was_started_in(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An agent's workspace with a planted `broker` package, and the operator starts
    # Outloop from there: `python -m broker.calls.workers` must not import it.
    planted = tmp_path / "planted"
    (planted / "broker").mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    (planted / "broker" / "__init__.py").write_text("")
    (planted / "broker" / "workers.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.chdir(planted)
    world.configure(forward_workers=1)
    broker = BrokerThread(world.paths).start()
    try:
        busy_until_a_worker_runs(world, broker)
        answers = results(world, agents(world, world.acme, [["/slow/p?s=0.3"]] * 4))
        assert all(a["status"] == 200 for a in answers)
        assert health(broker)["calls"] > 0
    finally:
        broker.stop()
    assert not marker.exists()


def test_a_stuck_worker_fails_its_calls_in_time_and_is_replaced(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "GRACE_SECONDS", 1.0)
    world.configure(forward_workers=1, upstream_timeout=0.5)
    broker = BrokerThread(world.paths).start()
    try:
        busy_until_a_worker_runs(world, broker)
        (pid,) = health(broker)["pids"]
        os.kill(pid, signal.SIGSTOP)  # alive, socket open, never answers
        try:
            start = time.monotonic()
            answers = results(world, agents(world, world.acme, [["/slow/s?s=0.2"]] * 4))
            assert time.monotonic() - start < 30
        finally:
            with contextlib.suppress(ProcessLookupError):  # killed as stuck, as it should be
                os.kill(pid, signal.SIGCONT)
        stuck = [a for a in answers if a["status"] != 200]
        assert stuck and all(a["body"]["error"]["code"] == "upstream_error" for a in stuck)
        assert health(broker)["lost"] == 1
    finally:
        broker.stop()


def test_an_answer_that_cannot_be_redacted_is_refused_before_the_key_goes_out(
    world: World, pooled: BrokerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = pooled.engine

    def broken(keys: object) -> object:
        raise SecretStoreError("the keyring is locked")

    working = engine.secrets.managed
    monkeypatch.setattr(engine.secrets, "managed", broken)
    pooled.call(setattr, engine, "_redactor", None)  # as after a config reload
    world.upstream.clear()
    (answer,) = results(world, agents(world, world.acme, [["/echo/x"]]))
    assert answer["status"] != 200
    assert answer["body"]["error"]["code"] == "unknown_credential"
    assert "redacted" in answer["body"]["error"]["message"]
    assert world.upstream.records == []
    monkeypatch.setattr(engine.secrets, "managed", working)
    (answer,) = results(world, agents(world, world.acme, [["/echo/x"]]))
    assert answer["status"] == 200 and answer["body"]["body"]["echo"]["plain"] == "[REDACTED:api]"


def test_workers_stop_with_the_broker(world: World) -> None:
    world.configure(forward_workers=1)
    broker = BrokerThread(world.paths).start()
    try:
        busy_until_a_worker_runs(world, broker)
        pids = health(broker)["pids"]
    finally:
        broker.stop()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
        except FileNotFoundError:
            return True

    assert pids and all(gone(pid) for pid in pids)


def test_no_workers_when_set_to_zero(world: World) -> None:
    world.configure(forward_workers=0)
    broker = BrokerThread(world.paths).start()
    try:
        results(world, agents(world, world.acme, [["/slow/x?s=0.3"]] * 4))
        assert "forward_workers" not in broker.call(broker.engine.health)
    finally:
        broker.stop()
