"""Forwarding in worker processes, for when the broker's event loop is busy.

Everything that decides a call (identity, policy, approval, audit) stays in the
broker's own process. What only carries it out — putting the request on the
wire with httpx, reading the answer, redacting it — can run in a worker, so
that under load the broker uses more than one core, and a large response's
redaction does not hold up the dashboard or other agents' calls.

A worker is `python -m broker.calls.workers FD`, a child of the broker, talking over
a private socket pair: length-prefixed `marshal` frames of plain data (no
pickle: nothing on either side can run code by sending a frame). The secret of
a call, and the managed secrets to redact, cross that socket and nothing else:
never argv, the environment or a file. A worker exits when the broker closes
its end (or dies); if a worker dies, its calls in flight fail as
`upstream_error` and a new worker takes its place on the next call.

Frames, broker -> worker:
    ("redact", [(label, secret), ...])      the managed secrets, from now on
    ("call", id, job)                        see `ForwardPool.forward`
worker -> broker:
    ("ok", id, status, headers, body, raw_bytes, ms)
    ("error", id, message, http_status)      an UpstreamError
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import marshal
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.calls.forward import Forwarder, UpstreamError, UpstreamSettings
from broker.config import Auth, Credential
from broker.policy import NormalPath
from broker.secrets import Secret

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
# A frame is a whole call or answer, so it holds up to a body cap (configurable);
# this only catches a corrupt length.
MAX_FRAME = 1 << 30
RETRY_SECONDS = 10.0  # after a failed start or a second lost worker
# A worker's answer may take 4x the upstream timeout plus this before the worker
# is taken for stuck (the upstream timeout applies to each phase, not the call).
GRACE_SECONDS = 10.0


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame, or None at end of stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        (size,) = _LENGTH.unpack(head)
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes")
        # Frames come only from the other end of a socket pair this broker made with
        # its own child: and marshal builds plain values, it cannot run code.
        return marshal.loads(await reader.readexactly(size))  # noqa: S302
    except asyncio.IncompleteReadError:
        return None


def _frame(message: tuple[Any, ...]) -> bytes:
    data = marshal.dumps(message)
    return _LENGTH.pack(len(data)) + data


class _Worker:
    def __init__(
        self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self.redaction: object = None  # the secrets list last sent (compared by identity)
        self.alive = True
        self.reading: asyncio.Task[None] | None = None


class ForwardPool:
    """Worker processes that forward calls and redact the answers."""

    def __init__(self, size: int, cwd: Path) -> None:
        """`cwd`: a private folder for the workers to run in (the broker's state folder)."""
        self.size = size
        self.cwd = cwd
        self._workers: list[_Worker] = []
        self._next_id = 0
        self._starting: asyncio.Task[None] | None = None
        self._closed = False
        self._retry_at = 0.0  # monotonic time before which no worker is started
        self.calls = 0  # calls the workers made
        self.lost = 0  # workers that stopped while the broker ran

    def health(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "calls": self.calls,
            "lost": self.lost,
            "pids": [w.proc.pid for w in self._workers if w.alive],
        }

    @property
    def ready(self) -> bool:
        """True once at least one worker is running (they start in the background)."""
        return any(w.alive for w in self._workers)

    def start_soon(self) -> None:
        """Start the missing workers in the background (calls meanwhile run in-process)."""
        if self._closed or self._starting is not None:
            return
        if time.monotonic() < self._retry_at:
            return  # a start failed, or a worker died, moments ago: not in a loop
        if sum(w.alive for w in self._workers) >= self.size:
            return
        self._starting = asyncio.create_task(self._fill(), name="outloop-forward-workers")

    async def _fill(self) -> None:
        try:
            self._workers = [w for w in self._workers if w.alive]
            while len(self._workers) < self.size and not self._closed:
                self._workers.append(await self._spawn())
        except Exception as e:  # no worker: calls keep running in-process
            log.warning("could not start a forwarding worker: %s", e)
            self._retry_at = time.monotonic() + RETRY_SECONDS
        finally:
            self._starting = None

    async def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        proc: asyncio.subprocess.Process | None = None
        try:
            # -P and a private cwd: `-m` would otherwise import from the current folder
            # first, and the broker may have been started inside a client's workspace,
            # where an agent could have left a `broker/` package to be run with every
            # tenant's secrets.
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-m",
                "broker.calls.workers",
                str(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            theirs.close()
            reader, writer = await asyncio.open_unix_connection(sock=ours)
        except BaseException:
            theirs.close()
            ours.close()
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(OSError):
                    proc.kill()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(proc.wait(), 2)
            raise
        worker = _Worker(proc, reader, writer)
        worker.reading = asyncio.create_task(self._read(worker), name="outloop-forward-worker")
        return worker

    async def _read(self, worker: _Worker) -> None:
        try:
            while True:
                message = await _read_frame(worker.reader)
                if message is None:
                    break
                future = worker.pending.pop(message[1], None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (OSError, ValueError, EOFError, TypeError) as e:
            log.warning("forwarding worker %s: %s", worker.proc.pid, type(e).__name__)
        finally:
            self._lost(worker)

    def _lost(self, worker: _Worker) -> None:
        if not worker.alive:
            return  # already counted: killed as stuck, then its reader saw the end
        worker.alive = False
        if not self._closed:
            self.lost += 1
            if self.lost > 1:  # once may be a kill; again, wait before the next start
                self._retry_at = time.monotonic() + RETRY_SECONDS
        for future in worker.pending.values():
            if not future.done():
                future.set_exception(UpstreamError("the forwarding worker stopped", 502))
        worker.pending.clear()
        worker.writer.close()
        if worker.proc.returncode is None and not self._closed:
            with contextlib.suppress(OSError):
                worker.proc.kill()

    async def forward(
        self,
        credential: Credential,
        secret: Secret,
        method: str,
        path: NormalPath,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        body: bytes,
        *,
        settings: UpstreamSettings,
        redaction: Sequence[tuple[str, str]],
    ) -> tuple[int, list[tuple[str, str]], bytes, int, float]:
        """(status, redacted headers, redacted body, upstream body size, ms) of the call
        made by a worker; raises UpstreamError as `Forwarder.send` does."""
        live = [w for w in self._workers if w.alive]
        if len(live) < self.size:
            self.start_soon()
        if not live:
            raise UpstreamError("no forwarding worker is running", 502)
        worker = min(live, key=lambda w: len(w.pending))
        frames = []
        if worker.redaction is not redaction:
            frames.append(_frame(("redact", [tuple(p) for p in redaction])))
            worker.redaction = redaction
        self._next_id += 1
        call_id = self._next_id
        job = (
            credential.tenant,
            credential.name,
            credential.base_url,
            credential.auth.kind,
            credential.auth.arg,
            secret.reveal(),
            method,
            path.encoded,
            [tuple(q) for q in query],
            dict(headers),
            bytes(body),
            dataclasses.astuple(settings),
        )
        frames.append(_frame(("call", call_id, job)))
        future: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        worker.pending[call_id] = future
        worker.writer.write(b"".join(frames))
        try:
            # Timeouts apply upstream in the worker; this catches a worker that is
            # stuck (stopped, wedged) yet still holds its socket open.
            answer = await asyncio.wait_for(future, 4 * settings.timeout + GRACE_SECONDS)
        except TimeoutError:
            log.warning("forwarding worker %s stopped answering; replacing it", worker.proc.pid)
            self._lost(worker)
            raise UpstreamError("the forwarding worker stopped answering", 504) from None
        finally:
            worker.pending.pop(call_id, None)
        self.calls += 1
        if answer[0] == "error":
            raise UpstreamError(answer[2], answer[3])
        _, _, status, out_headers, out_body, raw_bytes, ms = answer
        return status, [tuple(h) for h in out_headers], out_body, raw_bytes, ms

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        for worker in self._workers:
            worker.writer.close()  # the worker sees EOF and exits
        for worker in self._workers:
            if worker.reading is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(worker.reading, 2)
            try:
                await asyncio.wait_for(worker.proc.wait(), 2)
            except TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
        self._workers = []


# -- the worker side ---------------------------------------------------------------


async def _serve(fd: int) -> None:
    from broker.leaks.redact import Redactor, with_leak_rules

    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    forwarder = Forwarder(UpstreamSettings())
    redactor = with_leak_rules([])
    tasks: set[asyncio.Task[None]] = set()

    async def call(call_id: int, job: tuple[Any, ...], redactor: Redactor) -> None:
        (tenant, name, base_url, auth_kind, auth_arg, secret, method, path, query, headers, body, settings) = job
        credential = Credential(tenant, name, base_url, Auth(auth_kind, auth_arg))
        forwarder.settings = UpstreamSettings(*settings)
        try:
            upstream = await forwarder.send(
                credential, Secret(secret), method, NormalPath((), path), [tuple(q) for q in query], headers, body
            )
            answer: tuple[Any, ...] = (
                "ok",
                call_id,
                upstream.status,
                [tuple(h) for h in redactor.headers(upstream.headers)],
                redactor.bytes(upstream.body),
                len(upstream.body),
                upstream.ms,
            )
        except UpstreamError as e:
            answer = ("error", call_id, str(e), e.status)
        except Exception as e:  # a bug: say which, never the details (they may hold the URL)
            answer = ("error", call_id, f"the forwarding worker failed ({type(e).__name__})", 502)
        writer.write(_frame(answer))

    try:
        while True:
            message = await _read_frame(reader)
            if message is None:
                break
            if message[0] == "redact":
                redactor = with_leak_rules([tuple(p) for p in message[1]])
            elif message[0] == "call":
                task = asyncio.create_task(call(message[1], message[2], redactor))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await forwarder.close()
        writer.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m broker.calls.workers FD (started by the broker)", file=sys.stderr)
        return 2
    # Ctrl-C in the broker's terminal reaches this process group too: the broker
    # decides when a worker stops (it closes the socket), so in-flight calls finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
