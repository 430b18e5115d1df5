"""An HTTP/2-only upstream over TLS on loopback (ALPN "h2"), built on the h2 library.

It answers every request with a small JSON echo of the credential it received and
the protocol, and records (method, path, authorization) per stream. A client that
cannot speak HTTP/2 fails the handshake (no "http/1.1" in ALPN). This module never
imports the broker.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading

import h2.config
import h2.connection
import h2.events


class H2Upstream:
    def __init__(self, context: ssl.SSLContext) -> None:
        context.set_alpn_protocols(["h2"])
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.requests: list[tuple[str, str, str]] = []
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def __enter__(self) -> H2Upstream:
        threading.Thread(target=self._accept, daemon=True, name="h2-upstream").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            sock = self._context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        heads: dict[int, dict[str, str]] = {}
        with sock:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        heads[event.stream_id] = {
                            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                            for k, v in event.headers
                        }
                    elif isinstance(event, h2.events.StreamEnded):
                        head = heads.pop(event.stream_id, {})
                        auth = head.get("authorization", "")
                        self.requests.append((head.get(":method", ""), head.get(":path", ""), auth))
                        body = json.dumps({"protocol": "h2", "auth": auth}).encode()
                        conn.send_headers(
                            event.stream_id,
                            [
                                (":status", "200"),
                                ("content-type", "application/json"),
                                ("content-length", str(len(body))),
                            ],
                        )
                        conn.send_data(event.stream_id, body, end_stream=True)
                sock.sendall(conn.data_to_send())
