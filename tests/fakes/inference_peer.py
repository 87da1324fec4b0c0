"""A test peer standing in for local- and cloud-inference (plain nats-py, real NATS), so router
tests see exactly which model each step was routed to and what the router sent."""

from __future__ import annotations

import msgspec

from schemas.messages import ErrorInfo, InferenceRequest, InferenceResult, Usage
from schemas.subjects import Subjects


class InferencePeer:
    """Test peer standing in for local- and cloud-inference: records each InferenceRequest (with
    its headers) and replies an InferenceResult, an error result, or nothing at all."""

    def __init__(self, nc, subjects: Subjects, *, reply: bool = True, error: ErrorInfo | None = None) -> None:
        self.nc = nc
        self.subjects = subjects
        self.reply = reply
        self.error = error
        self.requests: list[tuple[InferenceRequest, dict[str, str]]] = []

    async def start(self) -> InferencePeer:
        for subject in (self.subjects.infer_local_all, self.subjects.infer_cloud_all):
            await self.nc.subscribe(subject, cb=self._answer)
        await self.nc.flush()
        return self

    async def _answer(self, msg) -> None:
        request = msgspec.json.decode(msg.data, type=InferenceRequest)
        self.requests.append((request, dict(msg.headers or {})))
        if not self.reply:
            return
        result = InferenceResult(
            call_id=request.call_id,
            model=request.model,
            provider_model=request.model,
            tier=request.tier,
            provider="test-peer",
            output=f"answer from {request.model}",
            finish_reason="stop",
            usage=Usage(input_tokens=40, output_tokens=7),
            latency_ms=3.0,
            cost_usd=0.001,
            error=self.error,
        )
        await msg.respond(msgspec.json.encode(result))

    @property
    def models(self) -> list[str]:
        return [request.model for request, _ in self.requests]
