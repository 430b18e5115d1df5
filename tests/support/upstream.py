"""A real HTTP upstream on loopback for broker tests: it records and echoes.

`Upstream()` listens on 127.0.0.1 in a thread (`with Upstream() as up:` or
`up.start()` / `up.stop()`), records every request it receives (`up.records`) and
answers according to the path (any prefix before these markers is ignored, so a
credential's base_url may carry a path of its own):

    .../echo/...            200 JSON: the credential it received, echoed in every
                            encoding (plain, base64 standard and URL-safe at each
                            byte alignment, base64("Bearer " + key), percent-encoded,
                            JSON-escaped) in headers and body, plus the request's
                            nonce (header X-Nonce or query nonce) and path
    .../text/...            the same echoes as text/plain
    .../binary/...          the key's bytes inside a body that is not UTF-8
    .../compressed/...      the JSON echo, compressed with the first encoding of
                            Accept-Encoding it knows (gzip, deflate, bzip2), or
                            with ?force=<encoding> whatever was asked (an unknown
                            one is named in Content-Encoding, the body left as is)
    .../redirect?to=URL     302 to URL (the key rides along in the query)
    .../huge?n=N            N bytes of "x"; with &coding=gzip|deflate|raw-deflate
                            they are sent compressed that way
    .../slow?s=S            answers after S seconds
    .../hold                answers once `release()` is called
    .../status/NNN          answers NNN with the JSON echo
    .../sneaky/...          the JSON echo gzip-compressed (?z=1: zlib) with no
                            Content-Encoding header
    .../uescape/...         200 JSON whose one string is the key with every character
                            written as a \\uXXXX escape (lower-case hex; ?upper=1 for
                            upper case), as some JSON encoders write it
    .../models              an OpenAI models.list shaped answer
    .../chat/completions    an OpenAI chat-completions shaped answer
    .../v1/messages         an Anthropic Messages shaped answer
    (with "stream": true in the JSON body, the last two answer as their APIs stream:
    server-sent events, chunked)
    .../sse                 the byte strings of `up.stream_parts`, each its own chunk
    .../silent              one event, then nothing until `release()` (or 60 s)
    .../as-written          the byte strings of `up.raw_parts` exactly as they are (status
                            line, headers, framing and body: whatever a hostile or broken
                            server would send), each written alone; then the connection closes

A path holding "/gated" streams its first chunk at once and each later one only
when the test calls `up.step()`; while it waits, a client that hangs up is noticed
(`up.disconnected` is set). So a test sees, without timing anything, that a chunk
reached the agent before the upstream sent the next.

The credential is read from Authorization (Bearer or Basic), X-Api-Key, or the
`key` query parameter. This module never imports the broker.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import json
import re
import select
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit


@dataclass(frozen=True)
class Received:
    """One request as the upstream saw it."""

    method: str
    target: str  # path and query as sent
    path: str
    query: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def text(self) -> str:
        """Everything received, as one string (for 'does it hold X' checks)."""
        head = "\n".join(f"{k}: {v}" for k, v in self.headers)
        return f"{self.method} {self.target}\n{head}\n\n{self.body.decode('utf-8', 'replace')}"


def key_of(auth: str | None, api_key: str | None, query: list[tuple[str, str]]) -> str:
    """The credential a request carried, however it was put on the wire."""
    if auth and auth.startswith("Bearer "):
        return auth[len("Bearer ") :]
    if auth and auth.startswith("Basic "):
        raw = base64.b64decode(auth[len("Basic ") :]).decode("utf-8", "replace")
        return raw.partition(":")[2]
    if api_key:
        return api_key
    return dict(query).get("key", "")


def _utf16_units(text: str) -> list[int]:
    data = text.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)


def echoes(key: str) -> dict[str, str]:
    """The key in every encoding the broker must redact, by label."""
    raw = key.encode("utf-8")
    out = {
        "plain": key,
        "bearer": f"Bearer {key}",
        "pct": quote(key, safe=""),
        "pct_plus": quote_plus(key, safe=""),
        "pct_lower": _lower_hex(quote(key, safe="")),
        "pct_path": quote(key),
        "json_escaped": json.dumps(key),
        "json_slashes": json.dumps(key).replace("/", "\\/"),
        "b64_bearer": base64.b64encode(f"Bearer {key}".encode()).decode(),
        "b64url_bearer": base64.urlsafe_b64encode(f"Bearer {key}".encode()).decode(),
        "b64_basic": base64.b64encode(f"user:{key}".encode()).decode(),
        "hex": raw.hex(),
        "hex_upper": raw.hex().upper(),
        "pct_all": "".join(f"%{b:02X}" for b in raw),
        "pct_all_lower": "".join(f"%{b:02x}" for b in raw),
        "u_all": "".join(f"\\u{u:04x}" for u in _utf16_units(key)),
        "u_all_upper": "".join(f"\\u{u:04X}" for u in _utf16_units(key)),
    }
    for k in range(5):
        out[f"b32_{k}"] = base64.b32encode(b"abcd"[:k] + raw).decode()
        out[f"b32_{k}_lower"] = base64.b32encode(b"abcd"[:k] + raw).decode().lower()
    for k in range(3):
        pad = b"ab"[:k]
        out[f"b64_{k}"] = base64.b64encode(pad + raw).decode()
        out[f"b64url_{k}"] = base64.urlsafe_b64encode(pad + raw).decode()
        out[f"b64_{k}_nopad"] = base64.b64encode(pad + raw).decode().rstrip("=")
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        query = parse_qsl(parts.query, keep_blank_values=True)
        rec = Received(self.command, self.path, parts.path, query, list(self.headers.items()), body)
        self.server.owner._record(rec)
        key = key_of(self.headers.get("Authorization"), self.headers.get("X-Api-Key"), query)
        nonce = self.headers.get("X-Nonce") or dict(query).get("nonce", "")
        path = parts.path
        params = dict(query)
        if "/hold" in path:
            self.server.owner._hold.wait(60)
        if path.endswith("/models"):
            return self._json(
                200, {"object": "list", "data": [{"id": "gpt-test", "object": "model", "created": 1, "owned_by": key}]}
            )
        streaming = b'"stream": true' in body or b'"stream":true' in body
        if path.endswith("/v1/messages") and streaming:
            return self._stream(path, anthropic_events(f"echo {key}"), "text/event-stream")
        if path.endswith("/chat/completions") and streaming:
            return self._stream(path, openai_events(f"echo {key}"), "text/event-stream")
        if path.endswith("/sse"):
            return self._stream(path, list(self.server.owner.stream_parts), "text/event-stream")
        if path.endswith("/as-written"):
            return self._raw(path)
        if path.endswith("/silent"):
            self._stream_head("text/event-stream")
            self._chunk(b"data: first\n\n")
            self.server.owner._hold.wait(60)
            self._chunk(b"data: late\n\n")
            self._chunk(b"")
            return None
        if path.endswith("/v1/messages"):  # Anthropic's Messages API
            return self._json(
                200,
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-test",
                    "content": [{"type": "text", "text": f"echo {key}"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 1, "output_tokens": 1},
                },
            )
        if path.endswith("/chat/completions"):
            return self._json(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": "gpt-test",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f"echo {key}"},
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )
        if "/redirect" in path:
            target = params.get("to", "http://127.0.0.1:9/")
            return self._send(302, b"", [("Location", f"{target}?token={quote_plus(key)}")])
        if "/huge" in path:
            data = b"x" * int(params.get("n", "1000"))
            coding = params.get("coding")
            if coding is None:
                return self._send(200, data, [("Content-Type", "text/plain")])
            raw = coding == "raw-deflate"
            packer = zlib.compressobj(wbits=-zlib.MAX_WBITS) if raw else None
            packed = (
                packer.compress(data) + packer.flush()
                if packer
                else gzip.compress(data)
                if coding == "gzip"
                else zlib.compress(data)
            )
            return self._send(
                200, packed, [("Content-Type", "text/plain"), ("Content-Encoding", "deflate" if raw else coding)]
            )
        if "/slow" in path:
            time.sleep(float(params.get("s", "1")))
        doc = {
            "path": path,
            "nonce": nonce,
            "method": self.command,
            "echo": echoes(key),
            "body": body.decode("utf-8", "replace"),
        }
        status = 200
        if "/status/" in path:
            status = int(path.rsplit("/status/", 1)[1][:3])
        if "/text" in path:
            text = "\n".join(f"{k}={v}" for k, v in echoes(key).items()).encode()
            return self._send(
                status, text, [("Content-Type", "text/plain; charset=utf-8"), *self._echo_headers(key, nonce)]
            )
        if "/binary" in path:
            blob = b"\xff\xfe\x00" + key.encode() + b"\x80" + base64.b64encode(key.encode())
            return self._send(
                status, blob, [("Content-Type", "application/octet-stream"), *self._echo_headers(key, nonce)]
            )
        if "/compressed" in path:
            return self._compressed(json.dumps(doc).encode(), key, nonce, params.get("force"))
        if "/sneaky" in path:  # compressed, and not saying so
            packed = (
                zlib.compress(json.dumps(doc).encode()) if params.get("z") else gzip.compress(json.dumps(doc).encode())
            )
            return self._send(status, packed, [("Content-Type", "application/octet-stream")])
        if "/uescape" in path:
            escaped = "".join(f"\\u{u:04x}" for u in _utf16_units(key))
            if params.get("upper"):
                escaped = escaped.upper().replace("\\U", "\\u")
            return self._send(status, ('{"key": "' + escaped + '"}').encode(), [("Content-Type", "application/json")])
        return self._json(status, doc, self._echo_headers(key, nonce))

    def _stream_head(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, path: str, parts: list[bytes], content_type: str) -> None:
        owner = self.server.owner
        try:
            self._stream_head(content_type)
            for i, part in enumerate(parts):
                if i and "/gated" in path and not self._step():
                    return
                self._chunk(part)
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            owner.disconnected.set()

    def _raw(self, path: str) -> None:
        self.close_connection = True
        try:
            for i, part in enumerate(list(self.server.owner.raw_parts)):
                if i and "/gated" in path and not self._step():
                    return
                self.wfile.write(part)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.server.owner.disconnected.set()

    def _step(self) -> bool:
        """Wait for the test's `step()`; False (and `disconnected` set) if the client hangs up first."""
        owner = self.server.owner
        sock = self.connection
        while not owner._steps.acquire(timeout=0.02):
            if select.select([sock], [], [], 0)[0]:
                try:
                    gone = sock.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    gone = True
                if gone:
                    owner.disconnected.set()
                    return False
        return True

    def _echo_headers(self, key: str, nonce: str) -> list[tuple[str, str]]:
        hdrs = [("X-Nonce", nonce)]
        for label, value in echoes(key).items():
            hdrs.append((f"X-Echo-{label.replace('_', '-')}", value))
        hdrs.append(("Set-Cookie", f"session={quote(key, safe='')}"))
        hdrs.append((f"X-Named-{key.encode().hex()}", "the key is in this header's name"))
        hdrs.append(("X-Filename", "caf\u00e9.txt"))  # a header value outside ASCII (latin-1)
        return hdrs

    def _compressed(self, data: bytes, key: str, nonce: str, force: str | None) -> None:
        accepted = [a.split(";")[0].strip() for a in (self.headers.get("Accept-Encoding") or "").split(",")]
        if force:
            accepted = [force]
        coders = {"bzip2": bz2.compress, "gzip": gzip.compress, "deflate": zlib.compress}
        if force and force not in coders:  # a coding nobody knows, named as asked
            return self._send(200, data, [("Content-Type", "application/json"), ("Content-Encoding", force)])
        for name in accepted:
            if name in coders:
                return self._send(
                    200,
                    coders[name](data),
                    [("Content-Type", "application/json"), ("Content-Encoding", name), *self._echo_headers(key, nonce)],
                )
        return self._send(200, data, [("Content-Type", "application/json")])

    def _json(self, status: int, doc: Any, headers: list[tuple[str, str]] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), [("Content-Type", "application/json"), *(headers or [])])

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if status in (204, 304):  # no body, and no length (RFC 9110 8.6)
            body = b""
        else:
            self.send_header("Content-Length", str(len(body)))
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the broker gave up on this answer (a timeout, a cap): nothing to report

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    owner: Upstream


class Upstream:
    """A recording, echoing HTTP server on loopback (an ephemeral port) in a thread."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.tls = tls  # a server context: HTTPS instead of HTTP
        self._lock = threading.Lock()
        self._records: list[Received] = []
        self._hold = threading.Event()
        self._steps = threading.Semaphore(0)
        self.stream_parts: list[bytes] = []  # what .../sse sends, a chunk each
        self.raw_parts: list[bytes] = []  # what .../as-written writes on the wire, a write each
        self.disconnected = threading.Event()  # a client hung up on a gated stream
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Upstream:
        self._server = _Server((self.host, 0), _Handler)
        self._server.owner = self
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        # A short poll interval: shutdown() waits for the serving loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True, name="test-upstream"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._hold.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    @property
    def records(self) -> list[Received]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def release(self) -> None:
        """Let every request waiting on /hold answer (and those to come)."""
        self._hold.set()

    def step(self, n: int = 1) -> None:
        """Let gated streams send their next chunk (n of them)."""
        for _ in range(n):
            self._steps.release()

    def _record(self, rec: Received) -> None:
        with self._lock:
            self._records.append(rec)


def _sse(event: str | None, data: Any) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def openai_events(text: str) -> list[bytes]:
    """A chat-completions stream: the text a word at a time, then [DONE]."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test"}
    words = text.split(" ")
    events = [
        _sse(None, {**base, "choices": [{"index": 0, "delta": {"content": w + (" " if i < len(words) - 1 else "")}}]})
        for i, w in enumerate(words)
    ]
    events.append(_sse(None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_events(text: str) -> list[bytes]:
    """A Messages stream as the API sends it: start, one delta per word, stop."""
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 0},
    }
    words = text.split(" ")
    events = [
        _sse("message_start", {"type": "message_start", "message": message}),
        _sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
    ]
    for i, w in enumerate(words):
        delta = {"type": "text_delta", "text": w + (" " if i < len(words) - 1 else "")}
        events.append(_sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(words)},
            },
        )
    )
    events.append(_sse("message_stop", {"type": "message_stop"}))
    return events
