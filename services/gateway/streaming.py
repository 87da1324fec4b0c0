"""One streamed call: the engine's tokens relayed as OpenAI chunks (server-sent events) as they come.

How chunks cross the bus: the gateway subscribes a fresh inbox *before* it sends the step with
``stream_to`` = that inbox; the inference service publishes a ``StreamChunk`` there per piece of
output (core NATS, in order, numbered by ``seq``) and still answers the call with the one
``InferenceResult`` that is metered. The stream is therefore a view; the result is the record:

- when the result arrives, whatever output the chunks did not carry (a cache hit, a backend that
  does not stream, chunks still in flight or lost: a gap in ``seq`` stops the relay) is sent as
  one more delta, so the client always ends with exactly the result's text and tool calls;
- the chunk that carries ``finish_reason`` also carries ``usage`` and the ``frugalmesh`` cost
  field, whatever ``stream_options`` says; with ``include_usage`` OpenAI's final chunk with empty
  ``choices`` follows; then ``data: [DONE]``;
- a failure before anything was relayed is an ordinary HTTP error (``open`` raises it), so an SDK
  raises its usual exception type; after that it is an SSE event ``{"error": {...}}``;
- a client that goes away mid-stream, or before the first token: a message on ``<inbox>.cancel``
  asks the inference service to stop the engine (it meters what was produced, once), repeated at
  each chunk that still comes until the call's answer (services/gateway/disconnect.py). Starlette
  cancels the generator at its await, where any further await would be cancelled again, so the
  clean-up runs as its own task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from starlette.types import Receive

from schemas.messages import InferenceResult, StepRequest, StreamChunk, ToolCallDelta
from services.gateway import translate
from services.gateway.disconnect import left_first, stop_call
from services.gateway.errors import GatewayError, client_gone
from services.gateway.mesh_call import call_router
from services.gateway.openai_wire import (
    ChatCompletionChunk,
    ChunkChoice,
    Cost,
    Delta,
    FunctionDelta,
    ToolCallDeltaOut,
    UsageOut,
)
from services.runtime.bus import Bus

DONE = b"data: [DONE]\n\n"
# Clean-up tasks outlive the request that spawned them; held here so they are not collected.
_background: set[asyncio.Task[None]] = set()
_decode_chunk = msgspec.json.Decoder(StreamChunk).decode


def sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


class CallStream:
    """``open``, then ``events`` is the response body (``response_headers`` its headers)."""

    def __init__(self, bus: Bus, step: StepRequest, headers: dict[str, str], include_usage: bool) -> None:
        self.bus = bus
        self.step = step
        self.nats_headers = headers
        self.include_usage = include_usage
        # Until the result names it: the pinned model, or the routed name the client asked for.
        self.model = step.allow_models[0] if step.allow_models and len(step.allow_models) == 1 else "frugalmesh/auto"
        self.created = int(time.time())
        self.call_id = ""
        self.queue: asyncio.Queue[StreamChunk | InferenceResult | GatewayError] = asyncio.Queue()
        self.first: StreamChunk | InferenceResult | None = None
        self.inbox = ""
        self.sub: Subscription | None = None
        self.request: asyncio.Task[None] | None = None
        self.finished = False
        # What has been relayed: the text, each tool call's (id, name, arguments), the next seq.
        self.text = ""
        self.tools: dict[int, list[str]] = {}
        self.next_seq = 0
        self.gap = False
        self.role_sent = False

    async def open(self, receive: Receive | None = None) -> None:
        """Send the step and wait for its first chunk or its result; GatewayError if it failed first,
        ``client_gone`` when the client (``receive``: its ASGI receive) left before (the call is cancelled)."""
        self.inbox = self.bus.new_inbox()
        self.sub = await self.bus.subscribe_core(self.inbox, self._on_chunk)
        step = msgspec.structs.replace(self.step, stream_to=self.inbox)
        self.request = asyncio.create_task(self._call(step))
        waiting = asyncio.ensure_future(self.queue.get())
        if receive is not None and await left_first(waiting, receive):
            waiting.cancel()
            self._close()
            raise client_gone()
        first = await waiting
        if isinstance(first, GatewayError):
            self.finished = True
            self._close()
            raise first
        self.first = first
        self.call_id = first.call_id

    def response_headers(self) -> dict[str, str]:
        result = self.first if isinstance(self.first, InferenceResult) else None
        return translate.headers(result, self.call_id, self.step.task_id)

    async def _call(self, step: StepRequest) -> None:
        try:
            self.queue.put_nowait(await call_router(self.bus, step, self.nats_headers))
        except GatewayError as error:
            self.queue.put_nowait(error)

    async def _on_chunk(self, msg: Msg) -> None:
        try:
            self.queue.put_nowait(_decode_chunk(msg.data))
        except msgspec.DecodeError:
            self.bus.log.warning("stream_chunk_unreadable", inbox=self.inbox)

    async def events(self) -> AsyncIterator[bytes]:
        """The SSE body: relayed chunks, the finishing chunk(s), ``[DONE]``."""
        assert self.first is not None, "open() first"
        event: StreamChunk | InferenceResult | GatewayError = self.first
        try:
            while isinstance(event, StreamChunk):
                data = self._relay(event)
                if data:
                    yield data
                event = await self.queue.get()
            self.finished = True
            if isinstance(event, GatewayError):
                yield sse(event.envelope())
                return
            for data in self._finish(event):
                yield data
        finally:
            self._close()

    def _chunk(
        self,
        delta: Delta | None,
        finish_reason: str | None = None,
        usage: UsageOut | None = None,
        cost: Cost | None = None,
    ) -> bytes:
        """One SSE event; ``delta`` None: OpenAI's usage chunk, with empty ``choices``."""
        choices = []
        if delta is not None:
            if not self.role_sent:
                delta.role, self.role_sent = "assistant", True
            choices.append(ChunkChoice(delta=delta, finish_reason=finish_reason))
        chunk = ChatCompletionChunk(
            id=translate.completion_id(self.call_id),
            created=self.created,
            model=self.model,
            choices=choices,
            object="chat.completion.chunk",
            usage=usage,
            frugalmesh=cost,
        )
        return sse(msgspec.json.encode(chunk))

    def _relay(self, chunk: StreamChunk) -> bytes:
        if self.gap or chunk.seq != self.next_seq:
            # A lost chunk: relay nothing more; the result fills in the rest.
            self.gap = True
            return b""
        self.next_seq += 1
        self.call_id = chunk.call_id
        self.text += chunk.content
        tools = [self._tool_delta(piece) for piece in chunk.tool_calls or ()]
        if not chunk.content and not tools:
            return b""
        return self._chunk(Delta(content=chunk.content or None, tool_calls=tools or None))

    def _tool_delta(self, piece: ToolCallDelta) -> ToolCallDeltaOut:
        sent = self.tools.setdefault(piece.index, ["", "", ""])
        first = not sent[0] and piece.id is not None
        if piece.id:
            sent[0] = piece.id
        if piece.name:
            sent[1] = piece.name
        sent[2] += piece.arguments
        return ToolCallDeltaOut(
            index=piece.index,
            id=piece.id,
            type="function" if first else None,
            function=FunctionDelta(name=piece.name, arguments=piece.arguments),
        )

    def _finish(self, result: InferenceResult) -> Iterator[bytes]:
        self.call_id = result.call_id
        self.model = result.model
        tail = self._tail(result)
        if tail is not None:
            yield self._chunk(tail)
        usage = translate.usage(result)
        cost = translate.cost(result, self.step.task_id)
        yield self._chunk(Delta(), translate.finish_reason(result), usage, cost)
        if self.include_usage:
            yield self._chunk(None, usage=usage, cost=cost)
        yield DONE

    def _tail(self, result: InferenceResult) -> Delta | None:
        """What of the result the chunks did not carry, as one delta (None: nothing is missing)."""
        content = None
        if result.output.startswith(self.text):
            content = result.output[len(self.text) :] or None
        else:
            self.bus.log.warning("stream_diverged", call_id=result.call_id, relayed=len(self.text))
        tools = []
        for index, call in enumerate(result.tool_calls or ()):
            sent = self.tools.get(index)
            if sent is None:
                name, arguments = call.function.name, call.function.arguments
                tools.append(
                    ToolCallDeltaOut(
                        index=index, id=call.id, type="function", function=FunctionDelta(name=name, arguments=arguments)
                    )
                )
            elif call.function.arguments.startswith(sent[2]) and len(call.function.arguments) > len(sent[2]):
                rest = call.function.arguments[len(sent[2]) :]
                tools.append(ToolCallDeltaOut(index=index, function=FunctionDelta(arguments=rest)))
        if content is None and not tools and self.role_sent:
            return None
        return Delta(content=content if content is not None or tools else "", tool_calls=tools or None)

    def _close(self) -> None:
        task = asyncio.get_running_loop().create_task(self._clean_up(stop=not self.finished))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _clean_up(self, stop: bool) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()
        if stop:
            # The client went away: the engine should stop; the inference service meters the call.
            await stop_call(self.bus, self.inbox, self.request)
