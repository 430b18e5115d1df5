"""A scripted stand-in for Anthropic's Messages API, on loopback, for the real `claude` binary.

`FakeMessages(script)` serves `POST /v1/messages` the way the real API does: JSON, or
server-sent events (`message_start`, `content_block_start`, `content_block_delta` with
`text_delta` / `input_json_delta`, `content_block_stop`, `message_delta`,
`message_stop`) when the request says `"stream": true`.

The script is a list of turns, each a list of tool calls `(tool name, input)`; the
turn to play is the number of assistant messages already in the request's
conversation, so the answer depends only on the request (Claude Code retries and
side requests do not move the script on). After the last turn the model says "done".
Requests that offer no tools (a title, a summary) get a short text answer.

Every request body is kept in `requests`, so a test can assert on exactly what the
model would have been sent: each `tool_result`, each hook's additional context.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Call = tuple[str, dict[str, Any]]
MODEL = "claude-sonnet-4-5-20250929"


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _blocks(calls: list[Call], turn: int) -> list[dict[str, Any]]:
    if not calls:
        return [{"type": "text", "text": "done"}]
    return [
        {"type": "tool_use", "id": f"toolu_{turn:02d}_{i:02d}_outloop", "name": name, "input": args}
        for i, (name, args) in enumerate(calls)
    ]


def events(blocks: list[dict[str, Any]], msg_id: str) -> Iterator[bytes]:
    """The server-sent events of one streamed answer holding `blocks`."""
    tool = any(b["type"] == "tool_use" for b in blocks)
    yield _sse(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 1},
            },
        },
    )
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            start = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        yield _sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": start})
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta})
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": i})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 12},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


class FakeMessages:
    """The scripted Messages API; `url` goes into ANTHROPIC_BASE_URL."""

    def __init__(self, script: list[list[Call]]) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.credentials: list[tuple[str | None, str | None]] = []  # (x-api-key, authorization) of each call
        self.other: list[str] = []  # any other path that was asked for
        self._lock = threading.Lock()
        self._n = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
                pass

            def do_GET(self) -> None:
                fake.other.append(f"GET {self.path}")
                self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "not here"}})

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                path = self.path.split("?")[0]
                if path.endswith("/count_tokens"):
                    self._json(200, {"input_tokens": 100})
                    return
                if not path.endswith("/v1/messages"):
                    fake.other.append(f"POST {self.path}")
                    self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "not here"}})
                    return
                with fake._lock:
                    fake.credentials.append((self.headers.get("x-api-key"), self.headers.get("authorization")))
                blocks = fake.answer(body)
                with fake._lock:
                    fake._n += 1
                    msg_id = f"msg_fake_{fake._n:04d}"
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for chunk in events(blocks, msg_id):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    self.close_connection = True
                    return
                tool = any(b["type"] == "tool_use" for b in blocks)
                self._json(
                    200,
                    {
                        "id": msg_id,
                        "type": "message",
                        "role": "assistant",
                        "model": MODEL,
                        "content": blocks,
                        "stop_reason": "tool_use" if tool else "end_turn",
                        "stop_sequence": None,
                        "usage": {"input_tokens": 10, "output_tokens": 12},
                    },
                )

            def _json(self, status: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-messages", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def answer(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The content blocks for one request (see the module docstring)."""
        with self._lock:
            self.requests.append(body)
        if not body.get("tools"):
            return [{"type": "text", "text": "ok"}]
        turn = sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")
        calls = self.script[turn] if turn < len(self.script) else []
        return _blocks(calls, turn)

    def conversation(self) -> list[dict[str, Any]]:
        """The messages of the longest main-conversation request (the last one the model saw)."""
        main = [r for r in self.requests if r.get("tools")]
        return max((r.get("messages", []) for r in main), key=len, default=[])

    def tool_results(self) -> dict[str, Any]:
        """tool_use id -> the tool_result content the model was sent for it."""
        out: dict[str, Any] = {}
        for request in self.requests:
            for message in request.get("messages", []):
                content = message.get("content")
                if not isinstance(content, list):
                    continue
                for block in content:
                    if isinstance(block, dict) and block.get("type") == "tool_result":
                        out[str(block.get("tool_use_id"))] = block.get("content")
        return out

    def __enter__(self) -> FakeMessages:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
