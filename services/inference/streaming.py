"""A streamed call's two side channels on core NATS: the chunks it publishes and the cancel it obeys.

When an InferenceRequest names ``stream_to`` (an inbox of the caller's), each piece of output the
backend produces is published there as a ``StreamChunk``, ``seq`` from 0, in the order the engine
produced it, with ``Bus.publish_core``. Core NATS, not JetStream: chunks only let a caller show
tokens early and nobody needs them stored, and a stream must not wait for an acknowledgement per
token. One connection publishes a call's chunks in order, so they arrive in order; a lost one
shows as a gap in ``seq``. The InferenceResult reply stays the one complete answer and the only
thing metered, so a lost chunk can cost a caller a token on screen, never a wrong bill.

The caller stops the call with any message on ``<stream_to>.cancel`` (its client went away). The
service cancels the backend call, which closes the HTTP stream, so the engine stops generating,
and meters the call once as ``cancelled``. What was streamed is known exactly, so the row is
``counted`` rather than the worst case: the prompt (messages, their tool calls and the tools
offered) counted with the model's tokenizer, the output counted over the text, tool names and
tool arguments relayed so far. Not counted: the few tokens an engine made after the last piece
relayed and before it saw the stream close.

``stream_to`` comes from the caller, so it is checked before anything is published to it: one
plain subject (no wildcards), outside the mesh's own subjects and NATS's ``$`` subjects (JetStream's
API, KV buckets), where a published chunk could land in a stream, a bucket or a service.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.messages import InferenceRequest, StreamChunk, Usage
from schemas.subjects import Subjects
from services.inference.backend import OutputDelta
from services.runtime.bus import Bus, encode
from services.runtime.catalog import ModelSpec
from services.runtime.tokens import count_prompt_tokens, count_tokens


def check_stream_to(stream_to: str, subjects: Subjects) -> None:
    """Raise ValueError unless ``stream_to`` is a subject chunks may be published to."""
    parts = stream_to.split(".")
    if any(not part or part in ("*", ">") or any(c.isspace() for c in part) for part in parts):
        raise ValueError(f"stream_to {stream_to!r} is not one plain NATS subject")
    if stream_to.startswith("$") or f"{stream_to}.".startswith(f"{subjects.prefix}."):
        raise ValueError(f"stream_to {stream_to!r} is a mesh or NATS system subject, not a caller's inbox")


class StreamRelay:
    """Publishes one call's output pieces as StreamChunks and keeps what it published, to count it."""

    def __init__(self, bus: Bus, request: InferenceRequest, *, strict_pinning: bool) -> None:
        self.bus = bus
        self.request = request
        self.strict_pinning = strict_pinning
        self.seq = 0
        # The text, tool names and tool arguments relayed so far: the output a cancelled call is billed.
        self._streamed: list[str] = []

    async def relay(self, delta: OutputDelta) -> None:
        reported = delta.provider_model
        if self.strict_pinning and reported and reported != self.request.model:
            return  # another model's answer is withheld under strict pinning, so are its pieces
        chunk = StreamChunk(
            call_id=self.request.call_id, seq=self.seq, content=delta.content, tool_calls=delta.tool_calls
        )
        self.seq += 1
        self._streamed.append(delta.content)
        for piece in delta.tool_calls or ():
            self._streamed.extend((piece.name or "", piece.arguments))
        await self.bus.publish_core(self.request.stream_to, encode(chunk))

    def counted_usage(self, model: ModelSpec) -> Usage:
        """The usage of a call stopped part-way: its prompt, and the output streamed until then."""
        return Usage(
            input_tokens=count_prompt_tokens(model.tokenizer, self.request.messages, self.request.options.tools),
            output_tokens=count_tokens(model.tokenizer, "".join(self._streamed)),
        )


async def listen_for_cancel(bus: Bus, stream_to: str, cancel: Callable[[], None]) -> Subscription:
    """Call ``cancel`` when the caller asks on ``<stream_to>.cancel``; unsubscribe when the call ends."""

    async def on_cancel(_: Msg) -> None:
        cancel()

    return await bus.subscribe_core(bus.subjects.stream_cancel(stream_to), on_cancel)
