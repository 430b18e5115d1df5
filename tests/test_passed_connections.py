"""A connection passed to another process is that process's (issue 13, SCM_RIGHTS).

Real processes, real sockets: a *connector* in one tenant's folder connects to the
broker and hands the connected fd over SCM_RIGHTS to a *sender* in the other
tenant's folder, which writes the request. The broker identifies each request by
the credentials of the bytes that carried it (SO_PASSCRED + SCM_CREDENTIALS), so the
call is the sender's. A request whose bytes came from both is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support.fixtures import BrokerThread, World

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_PASSCRED is Linux's")

CONNECTOR = r"""
import socket, sys, time
broker, rendezvous, first = sys.argv[1], sys.argv[2], sys.argv[3].encode()
if broker.startswith("tcp:"):
    host, port = broker[4:].rsplit(":", 1)
    conn = socket.create_connection((host, int(port)))
else:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(broker)
if first:
    conn.sendall(first)  # the start of a request, written by this process
    time.sleep(0.3)      # read by the broker before the rest arrives
link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
for _ in range(300):
    try:
        link.connect(rendezvous)
        break
    except OSError:
        time.sleep(0.05)
socket.send_fds(link, [b"fd"], [conn.fileno()])
link.recv(1)  # keep the connection open until the sender is done
"""

SENDER = r"""
import json, os, socket, sys
rendezvous, body = sys.argv[1], sys.argv[2].encode()
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(rendezvous)
server.listen(1)
print("listening", flush=True)
link, _ = server.accept()
_, fds, _, _ = socket.recv_fds(link, 16, 1)
conn = socket.socket(fileno=fds[0])
conn.settimeout(60)
conn.sendall(body)
answer = b""
while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
    [l for l in answer.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1]
):
    chunk = conn.recv(65536)
    if not chunk:
        break
    answer += chunk
link.sendall(b"x")
head, _, payload = answer.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "body": json.loads(payload), "pid": os.getpid()}))
"""


def request_bytes(credential: str, path: str) -> bytes:
    doc = json.dumps({"credential": credential, "method": "GET", "path": path}).encode()
    head = b"POST /v1/request HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(doc) + doc


def hand_over(
    world: World, connector_dir: Path, sender_dir: Path, body: bytes, first: bytes = b"", broker: str = ""
) -> dict:
    rendezvous = world.root / f"r-{time.monotonic_ns()}.sock"
    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, str(rendezvous), body.decode()],
        cwd=sender_dir,
        env=world.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert sender.stdout is not None
    assert sender.stdout.readline().strip() == "listening"
    connector = subprocess.Popen(
        [sys.executable, "-c", CONNECTOR, broker or str(world.socket), str(rendezvous), first.decode()],
        cwd=connector_dir,
        env=world.env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = sender.communicate(timeout=120)
    connector.wait(60)
    assert sender.returncode == 0, err
    result: dict = json.loads(out.strip().splitlines()[-1])
    return result


def audited(world: World, audit_id: str) -> dict:
    return next(r for r in world.audit() if r.get("id") == audit_id)


def test_a_connection_from_globex_passed_to_acme_is_acmes(world: World, broker: BrokerThread) -> None:
    """globex connects, acme sends: acme's credential works, charged to acme's process."""
    result = hand_over(world, world.globex, world.acme, request_bytes("api", "/echo/passed"))
    assert result["status"] == 200, result
    record = audited(world, result["body"]["audit_id"])
    assert record["tenant"] == "acme" and record["pid"] == result["pid"]
    assert [r.path for r in world.upstream.records] == ["/acme/echo/passed"]


def test_a_connection_from_acme_passed_to_globex_gets_globex_not_acme(world: World, broker: BrokerThread) -> None:
    """The escape: acme's connection handed to a globex process must not carry acme's keys."""
    result = hand_over(world, world.acme, world.globex, request_bytes("api", "/echo/borrowed"))
    record = audited(world, result["body"]["audit_id"])
    assert record["tenant"] == "globex" and record["pid"] == result["pid"]
    assert "/acme/echo/borrowed" not in [r.path for r in world.upstream.records]
    # acme's own credential name, from globex's process: refused.
    result = hand_over(world, world.acme, world.globex, request_bytes("openai", "/models"))
    assert result["status"] == 403 and result["body"]["error"]["code"] in ("wrong_tenant", "unknown_credential")
    assert audited(world, result["body"]["error"]["audit_id"])["pid"] == result["pid"]


def test_a_request_written_by_two_processes_is_refused(world: World, broker: BrokerThread) -> None:
    body = request_bytes("api", "/echo/joint")
    result = hand_over(world, world.acme, world.globex, body[20:], first=body[:20])
    assert result["status"] == 400 and result["body"]["error"]["code"] == "bad_request"
    assert "more than one process" in result["body"]["error"]["message"]
    assert world.upstream.records == []


# -- loopback TCP: every process holding the connection must be of one tenant ----------------


@pytest.fixture
def served(world: World) -> Iterator[str]:
    """The broker with a loopback TCP listener; its address as the connector takes it."""
    world.configure(listen="127.0.0.1:0")
    thread = BrokerThread(world.paths).start()
    try:
        url = urlsplit(thread.engine.listen_url or "")
        yield f"tcp:{url.hostname}:{url.port}"
    finally:
        thread.stop()


def test_a_tcp_connection_held_by_two_tenants_is_refused(world: World, served: str) -> None:
    """acme connects over TCP and keeps the socket; globex, given it too, sends: both hold it."""
    result = hand_over(world, world.acme, world.globex, request_bytes("api", "/echo/tcp"), broker=served)
    assert result["status"] == 403, result
    error = result["body"]["error"]
    assert error["code"] == "wrong_tenant" and "different tenants" in error["message"]
    assert world.upstream.records == []


def test_a_tcp_connection_held_by_one_tenants_processes_is_served(world: World, served: str) -> None:
    result = hand_over(world, world.acme, world.acme, request_bytes("api", "/echo/tcp-same"), broker=served)
    assert result["status"] == 200, result
    assert [r.path for r in world.upstream.records] == ["/acme/echo/tcp-same"]
