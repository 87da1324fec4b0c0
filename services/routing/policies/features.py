"""What the learned policies see: a sentence embedding of the prompt, and the structure of an answer.

The prompt embedding is WordLlama's ``l2_supercat`` model: static token embeddings (256
dimensions, a 32,000-token vocabulary) trained from large language models' token embeddings,
averaged over the prompt's tokens and L2-normalised. Its weights (16 MB) and tokenizer ship inside
the ``wordllama`` wheel, so nothing is downloaded, and embedding a prompt is one tokenizer pass
and one average: cheap enough for the router's event loop, where a transformer encoder would take
the whole decision budget. Why this embedding, and what it was measured against: docs/routing.md.
"""

from __future__ import annotations

import math
import re
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wordllama.inference import WordLlamaInference

# Which embedding a router file's weights belong to: a file trained on another one is refused.
PROMPT_EMBEDDING = "wordllama/l2_supercat_256"
EMBEDDING_DIMENSIONS = 256
# The decision runs on the router's event loop and embedding costs grow with the prompt, so a
# huge prompt would hold every other step (docs/benchmarks.md has the figures). What a prompt
# asks is in its opening; the longest recorded prompt (4,900 characters) is embedded whole.
MAX_EMBEDDED_CHARS = 8_000


@cache
def _embedder() -> WordLlamaInference:
    """The embedding model, read from the files inside the wheel (once per process).

    Not ``WordLlama.load()``: it looks for the tokenizer in a folder the wheel does not have
    (``tokenizer/``, the file is in ``tokenizers/``) and then downloads it from Hugging Face.
    """
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from wordllama.inference import WordLlamaInference

    package = files("wordllama")
    tokenizer = Tokenizer.from_file(str(package / "tokenizers" / "l2_supercat_tokenizer_config.json"))
    with safe_open(str(package / "weights" / "l2_supercat_256.safetensors"), framework="np") as weights:
        embedding = weights.get_tensor("embedding.weight")
    return WordLlamaInference(embedding, tokenizer)


def prompt_embeddings(prompts: list[str]) -> np.ndarray:
    """One L2-normalised row of EMBEDDING_DIMENSIONS per prompt (the same function at training and
    at routing)."""
    vectors = _embedder().embed([prompt[:MAX_EMBEDDED_CHARS] for prompt in prompts])
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A prompt without tokens (empty) has no direction: it stays the zero vector, which the prompt
    # model scores by its intercept alone (WordLlama's own norm=True would make it NaN).
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


# -- answers: what a validator can check without knowing the right answer --

# GSM8K-style answers end with "#### <number>" and mark each calculation as <<expression=result>>.
FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
CALCULATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
ARITHMETIC = re.compile(r"^[\d\s.+\-*/()]+$")
HEDGES = re.compile(r"\b(however|assum\w*|approximately|round\w*|cannot|not possible|actually)\b", re.IGNORECASE)

ANSWER_FEATURES = (
    "has_final_answer",
    "final_is_integer",
    "final_is_negative",
    "several_final_answers",
    "calculations",
    "wrong_calculations",
    "final_equals_last_calculation",
    "hedges",
)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def _calculation_holds(expression: str, stated: str) -> bool:
    """Whether ``expression`` evaluates to ``stated``: plain arithmetic only, anything else fails."""
    value = _number(stated)
    expression = expression.replace(",", "").replace("x", "*")
    if value is None or not ARITHMETIC.match(expression) or "**" in expression:
        return False
    try:
        # Digits, + - * / and parentheses only (checked above): safe to evaluate.
        computed = eval(expression, {"__builtins__": {}}, {})  # noqa: S307
    except (SyntaxError, ZeroDivisionError, TypeError):
        return False
    return math.isclose(float(computed), value, rel_tol=1e-4, abs_tol=1e-2)


def answer_features(answer: str) -> np.ndarray:
    """Structure and self-consistency of a worked numeric answer, in ANSWER_FEATURES order.

    Deliberately blind to length and wording beyond these checks: a validator must judge the
    answer's form, never text that happens to correlate with a grade.
    """
    finals = FINAL_ANSWER.findall(answer)
    final = _number(finals[-1]) if finals else None
    calculations = CALCULATION.findall(answer)
    wrong = sum(not _calculation_holds(expression, stated) for expression, stated in calculations)
    last = _number(calculations[-1][1]) if calculations else None
    return np.array(
        [
            final is not None,
            final is not None and final == int(final),
            final is not None and final < 0,
            len(finals) > 1,
            math.log1p(len(calculations)),
            math.log1p(wrong),
            final is not None and last is not None and math.isclose(final, last),
            HEDGES.search(answer) is not None,
        ],
        dtype=np.float64,
    )
