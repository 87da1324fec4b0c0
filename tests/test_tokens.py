"""Token counts are a reservation's worst case: the offline tokenizers must count a text as the
model's own tokenizer does, however it is cut up to be counted faster."""

from __future__ import annotations

import random
from importlib.resources import files

import pytest
import sentencepiece

from services.runtime.data import load_recorded_outcomes
from services.runtime.tokens import PIECE_CHARS, tokenizer, whitespace_pieces

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def whole_text_encoder():
    """Mixtral's SentencePiece model, encoding a text in one go."""
    model = files("mistral_common") / "data" / "tokenizer.model.v1"
    return sentencepiece.SentencePieceProcessor(model_file=str(model)).encode


def test_long_texts_counted_in_pieces_give_mixtrals_own_ids(data_dir, whole_text_encoder):
    rng = random.Random(15)
    prompts = [record.prompt for record in load_recorded_outcomes(data_dir)]
    alphabet = list("abcdefghij KLMNOP 0123  \n\t.,;!?-'\"éüß中文日本語😀\u00a0\u2003  ")
    texts = ["\n\n".join(rng.sample(prompts, rng.randint(5, 200))) for _ in range(40)]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(2_000, 12_000))) for _ in range(40)]
    texts += [" ".join(["word"] * 3_000), "x" * 5_000, " " * 5_000 + "end", "a " * 3_000]
    mixtral = tokenizer("mistral-v1")
    for text in texts:
        assert mixtral.encode(text) == whole_text_encoder(text), text[:80]


def test_pieces_are_cut_at_single_spaces_and_rejoin_to_the_text():
    text = " ".join(f"w{i}" for i in range(2_000)) + "  double  spaces " + "z" * 3 * PIECE_CHARS
    pieces = list(whitespace_pieces(text))
    assert len(pieces) > 3 and " ".join(pieces) == text
    assert all(len(piece) <= 2 * PIECE_CHARS or " " not in piece[PIECE_CHARS:] for piece in pieces)
    assert list(whitespace_pieces("short text")) == ["short text"]
