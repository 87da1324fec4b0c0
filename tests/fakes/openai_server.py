"""A loopback fake of a paid OpenAI-compatible Chat Completions API, speaking the real wire protocol.

``POST /v1/chat/completions`` answers one JSON body, or with ``stream: true`` server-sent events:
``data: {chunk}`` per token (``choices[0].delta.content``), a chunk with ``finish_reason``, a
usage chunk with empty ``choices`` when ``stream_options.include_usage`` asks, then
``data: [DONE]``.

As the real API: when ``tools`` are offered (and ``tool_choice`` is not "none") and the last message
is the user's, it calls the first ``Behaviour.tool_calls`` tools with ``Behaviour.tool_arguments``
(streamed as ``delta.tool_calls`` pieces with their ``index``: the first piece has the id, type and
name, the next ones the arguments a character at a time; finish_reason ``tool_calls``; content null
in a JSON body); after a tool message it answers text. ``response_format`` json_object answers
``Behaviour.json_reply``; ``stop`` cuts the reply before the first stop sequence (finish_reason stop).

The HTTP is a real server on a real socket (a ThreadingHTTPServer, HTTP/1.1 chunked), so the
client under test is the production client, connection handling included. What it answers is set
per test through ``Behaviour``; what it saw is kept in ``requests`` and ``disconnects``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Behaviour:
    reply: str = "The answer is 42."
    # The model the fake reports; None echoes the requested one.
    model: str | None = None
    # False: a stream never carries usage, even when include_usage asks for it.
    usage: bool = True
    # None counts the words of every message.
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    token_delay_s: float = 0.0
    # Seconds before the answer starts: a slow model (each request waits in its own thread).
    delay_s: float = 0.0
    status: int = 200
    # The error message of a non-200 answer; None: "fake status <status>". A real provider may echo
    # what it was sent (a key, a URL) in it.
    error_message: str | None = None
    # False: ignore stream=true and answer one JSON body, as some compatible servers do.
    stream: bool = True
    # When set, a request without ``Authorization: Bearer <api_key>`` gets 401.
    api_key: str | None = None
    # How many of the offered tools a tool-calling answer calls (the first ones, in order), and with what.
    tool_calls: int = 1
    tool_arguments: str = "{}"
    # The reply to response_format json_object.
    json_reply: str = '{"answer": 42}'


@dataclass
class Seen:
    body: dict[str, Any]
    headers: dict[str, str]


class _Server(ThreadingHTTPServer):
    # The listen backlog: hundreds of calls connect at once in the in-flight tests (the default, 5,
    # would make most of them wait for the kernel's SYN retry, a second or more).
    request_queue_size = 1024


@dataclass
class FakeOpenAI:
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[Seen] = field(default_factory=list)
    # Set when a client went away while a stream was still being written.
    disconnects: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        # A short poll interval makes shutdown (once per test) take milliseconds, not half a second.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, name="fake-openai", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.requests.append(Seen(body=body, headers={k.lower(): v for k, v in self.headers.items()}))
            behaviour = fake.behaviour
            time.sleep(behaviour.delay_s)
            if behaviour.api_key and self.headers.get("Authorization") != f"Bearer {behaviour.api_key}":
                return self._json(
                    401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
                )
            if behaviour.status != 200:
                message = behaviour.error_message or f"fake status {behaviour.status}"
                return self._json(behaviour.status, {"error": {"message": message, "type": "fake"}})
            model = behaviour.model or body["model"]
            prompt_tokens = (
                behaviour.prompt_tokens
                if behaviour.prompt_tokens is not None
                else sum(len((m.get("content") or "").split()) for m in body["messages"])
            )
            include_usage = behaviour.usage and (body.get("stream_options") or {}).get("include_usage")
            streamed = body.get("stream") and behaviour.stream
            if _calls_tools(body):
                names = [tool["function"]["name"] for tool in body["tools"][: behaviour.tool_calls]]
                calls = [_tool_call(i, name, behaviour.tool_arguments) for i, name in enumerate(names)]
                pieces = [_tool_call(i, name, "") | {"index": i} for i, name in enumerate(names)]
                pieces += [
                    {"index": i, "function": {"arguments": char}}
                    for i in range(len(names))
                    for char in behaviour.tool_arguments
                ]
                usage = _usage(prompt_tokens, len(pieces), behaviour.cached_tokens)
                if streamed:
                    deltas = [{"tool_calls": [piece]} for piece in pieces]
                    return self._stream(model, deltas, "tool_calls", usage if include_usage else None)
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                return self._body(model, message, "tool_calls", usage)
            reply = behaviour.reply
            if (body.get("response_format") or {}).get("type") == "json_object":
                reply = behaviour.json_reply
            stopped = False
            stops = body.get("stop") or []
            for stop in [stops] if isinstance(stops, str) else stops:
                if stop in reply:
                    reply, stopped = reply[: reply.index(stop)], True
            tokens = re.findall(r"\s*\S+", reply)
            finish_reason = "length" if len(tokens) > body["max_tokens"] else "stop"
            tokens = tokens[: body["max_tokens"]]
            # A stop sequence is generated (and billed) before it is cut.
            usage = _usage(prompt_tokens, len(tokens) + stopped, behaviour.cached_tokens)
            if streamed:
                deltas = [{"content": t} for t in tokens]
                return self._stream(model, deltas, finish_reason, usage if include_usage else None)
            self._body(model, {"role": "assistant", "content": "".join(tokens)}, finish_reason, usage)

        def _body(self, model: str, message: dict[str, Any], finish_reason: str, usage: dict[str, Any]) -> None:
            self._json(
                200,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                    **({"usage": usage} if fake.behaviour.usage else {}),
                },
            )

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(
            self, model: str, deltas: list[dict[str, Any]], finish_reason: str, usage: dict[str, Any] | None
        ) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            base = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
            }
            events = [
                {
                    **base,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }
            ]
            events += [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
            events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
            if usage is not None:
                events.append({**base, "choices": [], "usage": usage})
            try:
                for event in events:
                    self._chunk(f"data: {json.dumps(event)}\n\n".encode())
                    time.sleep(fake.behaviour.token_delay_s)
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                fake.disconnects.set()
                self.close_connection = True

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


def _calls_tools(body: dict[str, Any]) -> bool:
    """Whether the fake answers with tool calls: tools offered, not refused, and the user spoke last."""
    return bool(body.get("tools")) and body.get("tool_choice") != "none" and body["messages"][-1]["role"] == "user"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _tool_call(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_fake_{index}", "type": "function", "function": {"name": name, "arguments": arguments}}
