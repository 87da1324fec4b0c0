"""cloud-inference: provider APIs (``mesh.infer.cloud.<provider>``, queue group ``cloud-inference``).

Backends by ``[providers.X] backend``: ``replay`` answers from the recorded outcomes; ``openai``
calls an OpenAI-compatible Chat Completions API (``base_url``, key from ``api_key_env``).
"""

from __future__ import annotations

from faststream import FastStream

from services.inference.app import DEFAULT_CONCURRENCY, create_inference_app
from services.runtime.settings import MeshSettings


def create_app(settings: MeshSettings, max_concurrency: int = DEFAULT_CONCURRENCY) -> FastStream:
    return create_inference_app(settings, "cloud", max_concurrency)
