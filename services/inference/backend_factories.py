"""The backends a provider can run on, by its ``backend`` in deploy/models.toml; both inference
services take theirs from here."""

from __future__ import annotations

from services.inference.backend import BackendFactory
from services.inference.openai_backend import OpenAIBackend
from services.inference.replay import ReplayBackend
from services.inference.synthetic import SyntheticBackend

BACKENDS: dict[str, BackendFactory] = {
    "replay": ReplayBackend.from_provider,
    "openai": OpenAIBackend.from_provider,
    # Any prompt, max_tokens of text after the latency model's delay: for load tests of recorded traffic.
    "synthetic": SyntheticBackend.from_provider,
}
