"""A minimal loopback HTTP/1.1 upstream for benchmarks: a fixed small JSON answer.

Run as its own process (`python bench/upstream_fast.py`), it prints its port on
stdout and serves until killed. It is a raw `asyncio.Protocol`, not h11 or
uvicorn (not installed), so that its own cost per call is as small as possible
and what the benchmark measures is the client and the broker: it frames
requests by Content-Length only, which is all that httpx sends it. Keep-alive,
no chunked bodies, loopback only. Never use this for anything but a benchmark.
"""

from __future__ import annotations

import asyncio
import sys

BODY = b'{"ok":true,"items":[1,2,3],"message":"hello from the bench upstream"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"\r\n" + BODY
)
MAX_HEAD = 64 * 1024


class _Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD and self.transport is not None:
                    self.transport.close()
                return self._flush(out)
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buf) < total:
                return self._flush(out)
            self.buf = self.buf[total:]
            out.append(RESPONSE)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
