"""Streams on the broker's own pool (broker/calls/transport.py: PooledTransport.open,
Streamed) under unlucky interleavings and hostile upstreams, on real loopback sockets.

The helpers are tests/test_transport.py's. A few tests look at the connection behind a
stream (`conn_of`) to know when the client has reached the state a test is about (the
answer whole while reading is paused, say): the server cannot see that from outside.
"""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import pytest
import trustme
from test_transport import (
    CHUNKED_HEAD,
    WAIT,
    Conn,
    MiB,
    RawServer,
    bounded,
    chunk,
    client,
    eventually,
    response,
    server_context,
    then_silent,
    trusting,
)

from broker.calls.transport import STREAM_BUFFER, Streamed, _Connection

pytestmark = pytest.mark.timeout(60)

KiB = 1024


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def conn_of(answer: Streamed) -> _Connection:
    conn = answer._conn
    assert conn is not None
    return conn


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_an_answer_sent_while_reading_was_paused_is_never_the_next_call_s(ca: trustme.CA, tls: bool) -> None:
    # The first answer completes in the read that fills STREAM_BUFFER, so reading is
    # paused with the answer whole; a second, unasked-for answer then arrives. Over TLS,
    # asyncio reads it off the socket into its TLS buffer, which a select() on the
    # socket does not see, and resume_reading delivers it only a loop step later: by
    # then the connection must not be carrying the next call.
    first_in, send_stray, stray_sent = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def stray_after_a_paused_answer(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.target != "/one":
                await conn.send(response(req.target.encode()))
                continue
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (70 * KiB) + b"a" * (60 * KiB))
            await asyncio.wait_for(first_in.wait(), WAIT)
            await conn.send(b"b" * (10 * KiB))  # the answer's end: 70 KiB held, reading paused
            await asyncio.wait_for(send_stray.wait(), WAIT)
            await conn.send(response(b"STALE: an answer nobody asked for"))
            stray_sent.set()

    ssl_context = server_context(ca, "127.0.0.1") if tls else None
    async with RawServer(stray_after_a_paused_answer, ssl_context) as server:
        async with client(ssl_context=trusting(ca)) as c:
            answer = await c.open("GET", f"{server.url}/one")
            conn = conn_of(answer)
            await eventually(lambda: len(conn.body) == 60 * KiB, "the first 60 KiB to arrive")
            first_in.set()
            await eventually(lambda: conn.complete, "the answer to be whole")
            assert conn._reading_paused
            send_stray.set()
            await asyncio.wait_for(stray_sent.wait(), WAIT)
            if tls:
                assert conn.transport is not None
                transport = conn.transport
                await eventually(
                    lambda: transport.get_read_buffer_size() > 0, "the stray answer to reach the TLS layer"
                )
            else:
                await eventually(conn.unread_bytes_waiting, "the stray answer to reach the socket")
            got = b""
            while data := await answer.read(WAIT):
                got += data
            answer.close()
            assert got == b"a" * (60 * KiB) + b"b" * (10 * KiB)
            # In this same loop step (as another task of the credential, scheduled
            # before the TLS layer's delivery, would be): not a new task, as wait_for's.
            async with asyncio.timeout(WAIT):
                r = await c.get(f"{server.url}/two")
            assert r.text == "/two"


async def test_closing_a_stream_while_a_read_waits_ends_that_read_with_an_http_error() -> None:
    # The agent hung up (or the broker stops) while the pump waits for the upstream.
    async with RawServer(then_silent) as server, client() as c:
        answer = await c.open("GET", f"{server.url}/stream")
        assert await answer.read(WAIT) == b"data: one\n\n"
        reading = asyncio.ensure_future(answer.read(WAIT))
        await asyncio.sleep(0)  # the read is waiting now
        assert not reading.done()
        answer.close()
        with pytest.raises(httpx.ReadError):
            await bounded(reading)
        await asyncio.wait_for(server.conns[0].eof.wait(), WAIT)


async def test_a_stream_closed_while_a_read_waits_is_not_reused_even_when_its_end_comes_first() -> None:
    # The last chunk arrives and wakes the waiting read; before that read runs, the
    # stream is closed. The connection must not go back to the pool: the woken read
    # would otherwise run against the next call's exchange on it.
    go_on = asyncio.Event()

    async def two_parts(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.target != "/stream":
                await conn.send(response(b"%d" % conn.index))
                continue
            await conn.send(CHUNKED_HEAD + chunk(b"data: one\n\n"))
            await asyncio.wait_for(go_on.wait(), WAIT)
            await conn.send(chunk(b""))

    async with RawServer(two_parts) as server, client() as c:
        answer = await c.open("GET", f"{server.url}/stream")
        assert await answer.read(WAIT) == b"data: one\n\n"
        conn = conn_of(answer)
        closed = asyncio.Event()
        finish = conn._finish

        def finish_then_close(keep_alive: bool) -> None:
            finish(keep_alive)  # wakes the read...
            answer.close()  # ...and the stream is closed before it runs
            closed.set()

        conn._finish = finish_then_close  # type: ignore[method-assign]
        reading = asyncio.ensure_future(answer.read(WAIT))
        await asyncio.sleep(0)
        go_on.set()
        await asyncio.wait_for(closed.wait(), WAIT)
        assert (await bounded(c.get(f"{server.url}/next"))).text == "1"
        with pytest.raises(httpx.ReadError):
            await bounded(reading)


async def test_an_early_answer_longer_than_the_stream_buffer_does_not_stall_the_upload() -> None:
    # The server answers on reading the head and reads the upload only once its
    # answer is written (32 MiB: more than loopback's socket buffers hold). Pausing
    # reading while the request is still going out would hold both sides forever.
    size = 32 * MiB

    async def refuse_early_at_length(conn: Conn) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        if b"/upload" in head:
            await conn.send(response(b"x" * size, "413 Content Too Large"))
            await conn.until_eof()
            return
        await conn.send(response(b"fresh"))

    async with RawServer(refuse_early_at_length) as server, client(timeout=2) as c:
        r = await bounded(c.post(f"{server.url}/upload", b"w" * (64 * MiB)))
        assert (r.status_code, len(r.content)) == (413, size)
        assert (await c.get(f"{server.url}/next")).text == "fresh"


# -- what was probed and held: kept so that it goes on holding ---------------------------------


async def test_calls_cancelled_anywhere_leave_no_slot_taken() -> None:
    # One slot per lane: a slot lost per cancelled call would block the lane for good.
    release = asyncio.Event()
    heard: dict[str, int] = {"/stall": 0, "/held": 0}

    async def streams_and_stalls(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            heard[req.target] = heard.get(req.target, 0) + 1
            if req.target == "/stall":
                await conn.until_eof()
            elif req.target == "/held":
                await asyncio.wait_for(release.wait(), WAIT)
                await conn.send(response(b"held"))
            else:
                await conn.send(CHUNKED_HEAD + chunk(b"data: one\n\n"))
                await conn.until_eof()
            return

    async with RawServer(streams_and_stalls) as server, client(max_connections=1) as c:
        for i in range(20):
            # in read()
            answer = await bounded(c.open("GET", f"{server.url}/stream"))
            assert await answer.read(WAIT) == b"data: one\n\n"
            reading = asyncio.ensure_future(answer.read(WAIT))
            await asyncio.sleep(0)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            answer.close()
            answer.close()  # twice: nothing more
            # in head()
            waiting = asyncio.ensure_future(c.open("GET", f"{server.url}/stall"))
            stalled = i + 1
            await eventually(lambda: heard["/stall"] == stalled, "the call to reach the server")  # noqa: B023
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        # waiting for the lane's slot
        held = asyncio.ensure_future(c.get(f"{server.url}/held"))
        await eventually(lambda: heard["/held"] == 1, "the held call to reach the server")
        queued = [asyncio.ensure_future(c.get(f"{server.url}/queued")) for _ in range(5)]
        await asyncio.sleep(0.01)
        for call in queued:
            call.cancel()
        release.set()
        assert (await bounded(held)).text == "held"
        await asyncio.gather(*queued, return_exceptions=True)
        assert not c.transport._slots[()].locked()
        assert c.transport._slots[()]._value == 1  # all of the lane's one slot is free
        await asyncio.wait_for(asyncio.gather(*(conn.closed.wait() for conn in server.conns)), WAIT)


async def test_the_connection_after_a_paused_stream_read_whole_reads_normally() -> None:
    # Reading was paused and resumed many times: the next call on the connection reads as usual.
    size = 4 * MiB

    async def large_then_echo(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            await conn.send(response(b"z" * size if req.target == "/large" else req.target.encode()))

    async with RawServer(large_then_echo) as server, client() as c:
        answer = await c.open("GET", f"{server.url}/large")
        got = 0
        while data := await answer.read(WAIT):
            assert len(data) <= STREAM_BUFFER + 256 * KiB  # at most one read past the buffer
            got += len(data)
            await asyncio.sleep(0.001)
        answer.close()
        assert got == size
        for i in range(3):
            assert (await c.get(f"{server.url}/n/{i}")).text == f"/n/{i}"
        assert server.accepted == 1
