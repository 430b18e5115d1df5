"""Forward proxies on loopback, as corporate networks have them.

`ConnectProxy()` speaks HTTP CONNECT only, as corporate proxies do for HTTPS;
`Socks5Proxy()` speaks SOCKS5 (no authentication, CONNECT only, RFC 1928). Each
listens on 127.0.0.1 in a thread, records each tunnel's target (`proxy.tunnels`,
"host:port"), opens the tunnel and copies bytes both ways. This module never
imports the broker.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from typing import Self


class _Tunnel(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        client: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                return
            head += data
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, _version = line.split(" ", 2)
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.server.owner.tunnels.append(target)  # type: ignore[attr-defined]
        host, _, port = target.rpartition(":")
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with upstream:
            back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
            back.start()
            _copy(client, upstream)
            back.join(10)


class _Socks5(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(10)
        version, count = _exactly(client, 2)
        methods = _exactly(client, count)
        if version != 5 or 0 not in methods:
            client.sendall(b"\x05\xff")  # no acceptable method
            return
        client.sendall(b"\x05\x00")
        _version, command, _reserved, kind = _exactly(client, 4)
        if kind == 1:
            host = socket.inet_ntop(socket.AF_INET, _exactly(client, 4))
        elif kind == 4:
            host = socket.inet_ntop(socket.AF_INET6, _exactly(client, 16))
        else:  # 3: a domain name
            host = _exactly(client, _exactly(client, 1)[0]).decode("ascii")
        port = int.from_bytes(_exactly(client, 2), "big")
        if command != 1:  # only CONNECT
            client.sendall(b"\x05\x07\x00\x01" + bytes(6))
            return
        self.server.owner.tunnels.append(f"{host}:{port}")  # type: ignore[attr-defined]
        try:
            upstream = socket.create_connection((host, port), timeout=10)
        except OSError:
            client.sendall(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
            return
        client.sendall(b"\x05\x00\x00\x01" + bytes(6))
        client.settimeout(None)
        with upstream:
            back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
            back.start()
            _copy(client, upstream)
            back.join(10)


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise ConnectionError("the client went away")
        data += more
    return data


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Proxy:
    scheme = ""
    handler: type[socketserver.BaseRequestHandler]

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self._server = _Server(("127.0.0.1", 0), self.handler)
        self._server.owner = self  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True, name=self.scheme).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class ConnectProxy(_Proxy):
    scheme = "http"
    handler = _Tunnel


class Socks5Proxy(_Proxy):
    scheme = "socks5"
    handler = _Socks5
