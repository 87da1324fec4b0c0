"""cloud-inference: provider APIs (``mesh.infer.cloud.<provider>``, queue group ``cloud-inference``).

Backends by ``[providers.X] backend``: ``replay`` answers from the recorded outcomes; ``openai``
calls an OpenAI-compatible Chat Completions API (``base_url``, key from ``api_key_env``).
"""

from __future__ import annotations

from faststream import FastStream

from services.inference.app import create_inference_app
from services.runtime.serve import DEFAULT_CAPACITY
from services.runtime.settings import MeshSettings


def create_app(settings: MeshSettings, capacity: int = DEFAULT_CAPACITY) -> FastStream:
    return create_inference_app(settings, "cloud", capacity)
