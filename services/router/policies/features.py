"""What the learned policies see: lexical features of a prompt, and the structure of an answer.

Prompt features are hashed word 1-2-grams (scikit-learn's HashingVectorizer) and character
3-5-grams, weighted by sublinear tf-idf and L2-normalised. Hashing needs no vocabulary, so a
router file holds only the weights of the features seen in training; nothing is downloaded.

Character n-grams are hashed here with numpy rather than by scikit-learn's ``char_wb`` analyzer,
which builds every n-gram as a Python string (about 2.5 us per character: 12 ms for the longest
recorded prompts, past the 5 ms decision budget); reading only part of the prompt instead cost a
fifth of the held-out savings. A sentence-embedding model was measured as the other alternative:
all-MiniLM-L6-v2 as int8 ONNX takes about 5 ms per query on this CPU, the whole budget, and the
packages that ship it either bundle no tokenizer or pull in torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

# 2^18 buckets per analyzer: collisions among the ~10^5 distinct n-grams of the training data
# stay rare, and the file only stores the buckets that occur.
HASH_BITS = 18
BUCKETS = 1 << HASH_BITS
N_FEATURES = 2 * BUCKETS
CHAR_NGRAMS = range(3, 6)
WHITESPACE = re.compile(r"\s+")
# Polynomial rolling hash over UTF-8 bytes, then Fibonacci hashing (multiply by 2^64 / golden
# ratio, keep the top bits) to spread it over the buckets. uint64 arithmetic wraps by design.
BASE = np.uint64(257)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
SHIFT = np.uint64(64 - HASH_BITS)


def char_ngram_buckets(text: str) -> np.ndarray:
    """The bucket of every character 3-, 4- and 5-gram of ``text`` (lower-cased, runs of
    whitespace as one space), one entry per occurrence."""
    data = np.frombuffer(WHITESPACE.sub(" ", text.lower()).encode("utf-8"), np.uint8).astype(np.uint64)
    parts = []
    for n in CHAR_NGRAMS:
        count = len(data) - n + 1
        if count <= 0:
            continue
        rolling = np.zeros(count, np.uint64)
        for offset in range(n):
            rolling = rolling * BASE + data[offset : offset + count]
        # Adding n keeps a 3-gram and a 4-gram with the same rolling value apart.
        parts.append(((rolling + np.uint64(n)) * GOLDEN) >> SHIFT)
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def char_ngram_counts(prompts: list[str]) -> sp.csr_matrix:
    rows = [np.unique(char_ngram_buckets(p), return_counts=True) for p in prompts]
    indptr = np.concatenate([[0], np.cumsum([len(buckets) for buckets, _ in rows])])
    indices = np.concatenate([buckets for buckets, _ in rows]) if rows else np.zeros(0, np.int64)
    counts = np.concatenate([c for _, c in rows]) if rows else np.zeros(0, np.int64)
    return sp.csr_matrix((counts.astype(np.float32), indices, indptr), shape=(len(prompts), BUCKETS))


@dataclass(frozen=True)
class PromptFeatures:
    """Hashed n-gram counts of prompts (stateless: the same function at training and at routing)."""

    def __post_init__(self) -> None:
        # Imported here: a router that only runs rules or fixed policies starts without scikit-learn.
        from sklearn.feature_extraction.text import HashingVectorizer

        words = HashingVectorizer(
            n_features=BUCKETS, ngram_range=(1, 2), alternate_sign=False, norm=None, dtype=np.float32
        )
        object.__setattr__(self, "_words", words)

    def counts(self, prompts: list[str]) -> sp.csr_matrix:
        return sp.hstack([self._words.transform(prompts), char_ngram_counts(prompts)], format="csr")


def tfidf(counts: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    """Sublinear tf times idf, each row L2-normalised (scikit-learn's TfidfTransformer, inlined
    so that routing needs only the idf vector)."""
    weighted = counts.astype(np.float32, copy=True)
    weighted.data = (1.0 + np.log(weighted.data)) * idf[weighted.indices]
    lengths = np.diff(weighted.indptr)
    # reduceat over an empty row would read the next row's first value: empty rows keep norm 1.
    squares = np.add.reduceat(np.append(weighted.data**2, 0.0), weighted.indptr[:-1])
    norms = np.where(lengths > 0, np.sqrt(squares), 1.0)
    weighted.data /= np.repeat(norms, lengths).astype(np.float32)
    return weighted


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
