"""A cap on how many connections one process may hold on the broker's socket.

A process that opens connections in a loop (a runaway agent, a leak in its HTTP
client) gets a clear 429 for the ones past the cap, audited, while the connections
it already holds, and every other process, are served as before.
"""

from __future__ import annotations

import json

from support.fixtures import BrokerThread, World

from broker.calls.server import MAX_PROCESS_CONNECTIONS

# Opens N connections and keeps them; then one more; then closes one and tries again.
HOARDER = r"""
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s
def health(s):
    s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: outloop\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    return data.split(b" ", 2)[1].decode()
held = [conn() for _ in range(n)]
statuses = [health(s) for s in held]  # all served (and so all accepted)
extra = conn()
refused = extra.recv(65536).decode("latin-1")
extra.close()
held.pop().close()
again = conn()
print(json.dumps({"held": statuses, "refused": refused, "after_close": health(again), "first_still": health(held[0])}))
"""


def test_one_process_cannot_hold_more_than_the_cap(world: World, broker: BrokerThread) -> None:
    ran = world.python(HOARDER, str(world.socket), str(MAX_PROCESS_CONNECTIONS))
    assert ran.returncode == 0, ran.stderr[-2000:]
    out = json.loads(ran.stdout)
    assert out["held"] == ["200"] * MAX_PROCESS_CONNECTIONS
    head, _, body = out["refused"].partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 429") and "X-Outloop-Error: bad_request" in head
    assert f"already holds {MAX_PROCESS_CONNECTIONS} connections" in json.loads(body)["error"]["message"]
    assert out["after_close"] == "200" and out["first_still"] == "200"
    refusals = [r for r in world.audit() if r.get("event") == "refusal" or r.get("decision") == "bad_request"]
    assert any("connections to the broker" in str(r.get("message")) for r in refusals)
    # Another process is not affected by the first one's connections.
    assert world.outloop("call", "api", "GET", "/echo/x").returncode == 0
