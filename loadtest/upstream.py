"""A zero-latency OpenAI-compatible upstream on loopback, for the gateway benchmarks.

It answers ``POST /v1/chat/completions`` at once with a fixed short reply and real-looking usage,
as one JSON body or (``"stream": true``) as server-sent events ending with a usage chunk, over
HTTP/1.1 keep-alive. Raw asyncio streams rather than a framework, so the upstream costs as little
CPU as possible and the gateways' own cost is what a benchmark sees. Run it in its own process:
``python -m loadtest.upstream --port 0`` prints the port it listens on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

REPLY = "The answer is 42."
USAGE = {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}


def _completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}],
            "usage": USAGE,
        }
    ).encode()


def _stream(model: str) -> bytes:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": REPLY}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": USAGE},
    ]
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            if body.get("stream"):
                payload, kind = _stream(model), b"text/event-stream"
            else:
                payload, kind = _completion(model), b"application/json"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                + str(len(payload)).encode() + b"\r\nConnection: keep-alive\r\n\r\n" + payload
            )  # fmt: skip
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(main(parser.parse_args().port))
