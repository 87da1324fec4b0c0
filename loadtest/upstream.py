"""An OpenAI-compatible upstream on loopback for the gateway benchmarks: at once, or model-like.

It answers ``POST /v1/chat/completions`` with real-looking usage, as one JSON body or
(``"stream": true``) as server-sent events ending with a usage chunk, over HTTP/1.1 keep-alive.
Raw asyncio streams rather than a framework, so the upstream costs as little CPU as possible and
the gateways' own cost is what a benchmark sees. Run it in its own process:
``python -m loadtest.upstream --port 0`` prints the port it listens on.

By default it answers at once with a fixed short reply (six tokens). ``--ttft-ms T --token-ms D
--tokens N`` make it behave like a model: the first token T ms after the request, then one more
every D ms, N in all, each streamed as its own chunk (``Transfer-Encoding: chunked``, written as
it is produced); a non-streamed call gets the whole reply once the last token would have been made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

REPLY = "The answer is 42."
USAGE = {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}


@dataclass(frozen=True)
class Latency:
    """A model-like answer: ``tokens`` tokens, the first after ``ttft_ms``, then one every ``token_ms``."""

    ttft_ms: float = 0.0
    token_ms: float = 0.0
    tokens: int = 0

    @property
    def total_ms(self) -> float:
        return self.ttft_ms + self.token_ms * max(0, self.tokens - 1)

    def args(self) -> list[str]:
        """The command-line options that give this latency."""
        return ["--ttft-ms", str(self.ttft_ms), "--token-ms", str(self.token_ms), "--tokens", str(self.tokens)]


def _usage(completion_tokens: int) -> dict[str, int]:
    prompt = USAGE["prompt_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def _completion(model: str, text: str = REPLY, usage: dict[str, int] = USAGE) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }
    ).encode()


def _event(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _chunk_base(model: str) -> dict:
    return {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}


def _content(base: dict, text: str, first: bool) -> bytes:
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    return _event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})


def _ending(base: dict, usage: dict[str, int]) -> bytes:
    return (
        _event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        + _event({**base, "choices": [], "usage": usage})
        + b"data: [DONE]\n\n"
    )


def _stream(model: str) -> bytes:
    base = _chunk_base(model)
    return _content(base, REPLY, True) + _ending(base, USAGE)


def _token(i: int) -> str:
    return f"tok{i} "


def _head(kind: bytes, length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: " + str(length).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\n" + framing + b"\r\nConnection: keep-alive\r\n\r\n"


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _answer_slowly(writer: asyncio.StreamWriter, model: str, stream: bool, latency: Latency) -> None:
    """Tokens on the model's schedule (absolute times, so slow writes do not stretch it)."""
    start = time.monotonic()
    usage = _usage(latency.tokens)
    if not stream:
        await asyncio.sleep(max(0.0, start + latency.total_ms / 1000 - time.monotonic()))
        payload = _completion(model, "".join(_token(i) for i in range(latency.tokens)), usage)
        writer.write(_head(b"application/json", len(payload)) + payload)
        return
    writer.write(_head(b"text/event-stream", None))
    base = _chunk_base(model)
    for i in range(latency.tokens):
        due = start + (latency.ttft_ms + i * latency.token_ms) / 1000
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        writer.write(_chunked(_content(base, _token(i), i == 0)))
    writer.write(_chunked(_ending(base, usage)) + b"0\r\n\r\n")


def _handler(latency: Latency):
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else {}
                model = body.get("model", "bench")
                stream = bool(body.get("stream"))
                if latency.tokens:
                    await _answer_slowly(writer, model, stream, latency)
                elif stream:
                    payload = _stream(model)
                    writer.write(_head(b"text/event-stream", len(payload)) + payload)
                else:
                    payload = _completion(model)
                    writer.write(_head(b"application/json", len(payload)) + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return serve


async def main(port: int, latency: Latency) -> None:
    server = await asyncio.start_server(_handler(latency), "127.0.0.1", port, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to the first token (with --tokens)")
    parser.add_argument("--token-ms", type=float, default=0.0, help="time between tokens (with --tokens)")
    parser.add_argument("--tokens", type=int, default=0, help="tokens per answer; 0: the short reply at once")
    args = parser.parse_args()
    asyncio.run(main(args.port, Latency(args.ttft_ms, args.token_ms, args.tokens)))
