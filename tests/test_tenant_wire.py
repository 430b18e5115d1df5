"""No upstream connection ever carries two credentials' calls (DESIGN §4; issue 15).

Against a real upstream on loopback that two tenants share, and that gets HTTP/1.1
wrong the ways real servers do: it ignores a GET's Content-Length (so the body is
read as the next request: a CL.0 desync), and it answers one request twice (the
second answer turning up with the next request on that connection). Each tenant's
calls go through the broker as an agent makes them; the upstream keeps every byte
each connection carried.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from support.fixtures import BrokerThread, World

from broker.config import ConfigEditor


class _Naive(socketserver.BaseRequestHandler):
    server: NaiveUpstream

    def handle(self) -> None:
        sock: socket.socket = self.request
        wire = bytearray()  # every byte this connection carried
        with self.server.lock:
            self.server.connections.append(wire)
        buf = b""
        late: bytes | None = None  # a second answer to the last request, not yet sent
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                wire += data
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            body = b""
            if method not in ("GET", "HEAD"):  # naive: a GET has no body, whatever it says
                length = int(headers.get("content-length", "0"))
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    wire += data
                    buf += data
                body, buf = buf[:length], buf[length:]
            if late is not None:
                sock.sendall(late)  # the answer that came late, read as this request's
                late = None
            answer = self.server.answer(method, target, headers.get("authorization", ""), body)
            sock.sendall(answer)
            if target.endswith("/late"):
                late = _response({"path": target, "late": True})


def _response(doc: dict[str, Any]) -> bytes:
    body = json.dumps(doc).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class NaiveUpstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, keys: dict[tuple[str, str], str]) -> None:
        super().__init__(("127.0.0.1", 0), _Naive)
        self.keys = keys
        self.lock = threading.Lock()
        self.connections: list[bytearray] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def tenant_of(self, authorization: str) -> str | None:
        for (tenant, _), key in self.keys.items():
            if authorization == f"Bearer {key}":
                return tenant
        return None

    def answer(self, method: str, target: str, authorization: str, body: bytes) -> bytes:
        return _response(
            {"method": method, "path": target, "tenant": self.tenant_of(authorization), "body_bytes": len(body)}
        )

    def tenants_per_connection(self) -> list[set[str]]:
        with self.lock:
            wires = [bytes(w) for w in self.connections]
        return [{t for (t, c), key in self.keys.items() if c == "api" and key.encode() in w} for w in wires]


@pytest.fixture
def naive(world: World) -> Iterator[NaiveUpstream]:
    server = NaiveUpstream(world.keys)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    editor = ConfigEditor(world.paths)
    for tenant in ("acme", "globex"):  # both tenants' "api" on the one naive upstream
        editor.tenant(tenant)["credentials"]["api"]["base_url"] = f"{server.url}/{tenant}"
    editor.save()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def naive_broker(world: World, naive: NaiveUpstream) -> Iterator[BrokerThread]:
    thread = BrokerThread(world.paths).start()
    try:
        yield thread
    finally:
        thread.stop()


def _proxied(world: World, folder: Any, path: str, body: str | None = None) -> dict[str, Any]:
    (result,) = world.agent(folder, [{"method": "GET", "target": f"/v1/proxy/api{path}", "body": body}])
    assert result["status"] == 200, result["body"][:300]
    doc: dict[str, Any] = json.loads(result["body"])
    return doc


def test_a_late_second_answer_never_reaches_another_tenant(
    world: World, naive: NaiveUpstream, naive_broker: BrokerThread
) -> None:
    first = _proxied(world, world.acme, "/late")
    assert first == {"method": "GET", "path": "/acme/late", "tenant": "acme", "body_bytes": 0}
    # acme's connection now holds a second answer that comes with its next request:
    # globex's call must not be that request.
    theirs = _proxied(world, world.globex, "/whoami")
    assert theirs == {"method": "GET", "path": "/globex/whoami", "tenant": "globex", "body_bytes": 0}
    assert all(len(tenants) <= 1 for tenants in naive.tenants_per_connection())


def test_a_cl0_desync_swallows_no_other_tenants_request(
    world: World, naive: NaiveUpstream, naive_broker: BrokerThread
) -> None:
    # acme's GET carries a body the upstream ignores, so it reads it as a request of
    # its own: a POST whose body is whatever comes next on that connection.
    smuggled = "POST /acme/swallow HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n"
    first = _proxied(world, world.acme, "/cl0", body=smuggled)
    assert first["path"] == "/acme/cl0"
    theirs = _proxied(world, world.globex, "/whoami")
    assert theirs == {"method": "GET", "path": "/globex/whoami", "tenant": "globex", "body_bytes": 0}
    theirs = _proxied(world, world.globex, "/again")
    assert theirs["path"] == "/globex/again"
    per_connection = naive.tenants_per_connection()
    assert {"acme"} in per_connection and {"globex"} in per_connection
    # No connection ever carried both tenants' keys: globex's request head (its key in
    # it) was never on the wire where acme's smuggled POST could swallow it.
    assert all(len(tenants) <= 1 for tenants in per_connection)
