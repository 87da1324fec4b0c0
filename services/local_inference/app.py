"""local-inference: the local models (``mesh.infer.local.<model>``, queue group ``local-inference``).

Backends by ``[providers.local] backend``: ``replay`` answers from the recorded outcomes;
``openai`` calls a local engine that speaks the OpenAI wire protocol (vLLM, llama.cpp's server)
at ``base_url``.
"""

from __future__ import annotations

from faststream import FastStream

from services.runtime.inference.openai_backend import OpenAIBackend
from services.runtime.inference.backend import BackendFactory
from services.runtime.inference.replay import ReplayBackend
from services.runtime.inference.synthetic import SyntheticBackend
from services.runtime.inference.service import DEFAULT_CONCURRENCY, create_inference_app
from services.runtime.settings import MeshSettings

BACKENDS: dict[str, BackendFactory] = {
    "replay": ReplayBackend.from_provider,
    "openai": OpenAIBackend.from_provider,
    # Any prompt, max_tokens of text after the latency model's delay: for load tests of recorded traffic.
    "synthetic": SyntheticBackend.from_provider,
}


def create_app(settings: MeshSettings, max_concurrency: int = DEFAULT_CONCURRENCY) -> FastStream:
    return create_inference_app(settings, "local", BACKENDS, max_concurrency)
