"""local-inference: the local models (``mesh.infer.local.<model>``, queue group ``local-inference``).

Backends by ``[providers.X] backend`` (services/inference/backend_factories.py): ``replay``
answers from the recorded outcomes; ``openai`` calls a local engine that speaks the OpenAI wire
protocol (the embedded engine, vLLM, llama.cpp's server) at its URL.

Every replica also publishes each local model's load (``mesh.local.load.<model>``, every
``load_interval_s``; services/local_inference/load.py) for the router's spillover.
"""

from __future__ import annotations

from faststream import FastStream

from services.inference.app import create_inference_app
from services.local_inference.load import DEFAULT_LOAD_INTERVAL_S, publish_load
from services.runtime.serve import DEFAULT_CAPACITY
from services.runtime.settings import MeshSettings


def create_app(
    settings: MeshSettings,
    capacity: int = DEFAULT_CAPACITY,
    load_interval_s: float = DEFAULT_LOAD_INTERVAL_S,
) -> FastStream:
    """``load_interval_s``: how often the models' load is published; 0 publishes none."""
    setup = publish_load(load_interval_s) if load_interval_s > 0 else None
    return create_inference_app(settings, "local", capacity, setup=setup)
