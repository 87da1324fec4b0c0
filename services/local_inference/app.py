"""local-inference: the local models (``mesh.infer.local.<model>``, queue group ``local-inference``).

Backends by ``[providers.local] backend``: ``replay`` answers from the recorded outcomes;
``openai`` calls a local engine that speaks the OpenAI wire protocol (vLLM, llama.cpp's server)
at ``base_url``.

Every replica also publishes each local model's load (``mesh.local.load.<model>``, every
``load_interval_s``; services/local_inference/load.py) for the router's spillover.
"""

from __future__ import annotations

from faststream import FastStream

from services.local_inference.load import DEFAULT_LOAD_INTERVAL_S, publish_load
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


def create_app(
    settings: MeshSettings,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    load_interval_s: float = DEFAULT_LOAD_INTERVAL_S,
) -> FastStream:
    """``load_interval_s``: how often the models' load is published; 0 publishes none."""
    setup = publish_load(load_interval_s) if load_interval_s > 0 else None
    return create_inference_app(settings, "local", BACKENDS, max_concurrency, setup=setup)
