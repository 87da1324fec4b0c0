"""Secrets scrubbed from provider errors and log lines (services/runtime/scrub.py, services/runtime/log.py):
each known shape is replaced by the marker, the text around it is kept, ordinary text is left alone."""

from __future__ import annotations

import logging

import pytest

from services.inference.backend import BackendError
from services.inference.openai_client import OpenAIError
from services.runtime.log import ScrubFilter, scrub_secrets
from services.runtime.scrub import REDACTED, add_known_secret, scrub

pytestmark = pytest.mark.unit

OPENAI_KEY = "sk-" + "A1b2C3d4E5f6G7h8I9j0" * 2
PROJECT_KEY = "sk-proj-" + "Zz09_-Yy18" * 5
ANTHROPIC_KEY = "sk-ant-api03-" + "q" * 80 + "-AA"
GOOGLE_KEY = "AIza" + "S" * 35


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        (f"Incorrect API key provided: {OPENAI_KEY}.", f"Incorrect API key provided: {REDACTED}."),
        (f"key {PROJECT_KEY} revoked", f"key {REDACTED} revoked"),
        (f"x-api-key {ANTHROPIC_KEY} invalid", f"x-api-key {REDACTED} invalid"),
        ("Authorization: Bearer abc.def_ghi", f"Authorization: Bearer {REDACTED}"),
        ('{"authorization": "Basic dXNlcjpwYXNz"}', f'{{"authorization": "Basic {REDACTED}"}}'),
        ("sent with bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", f"sent with bearer {REDACTED}"),
        ("api-key: 0123456789abcdef", f"api-key: {REDACTED}"),
        ('{"x-api-key": "abc123", "n": 1}', f'{{"x-api-key": "{REDACTED}", "n": 1}}'),
        ("OPENAI_API_KEY=plain-value", f"OPENAI_API_KEY={REDACTED}"),
        (
            f"GET https://generativelanguage.googleapis.com/v1/models?key={GOOGLE_KEY}&alt=sse failed",
            f"GET https://generativelanguage.googleapis.com/v1/models?key={REDACTED}&alt=sse failed",
        ),
        (
            "https://x.openai.azure.com/openai?api-version=2024-06-01&api_key=s3cret&sig=abc%3D",
            f"https://x.openai.azure.com/openai?api-version=2024-06-01&api_key={REDACTED}&sig={REDACTED}",
        ),
        (
            "HTTP 502 from https://ops:hunter2@proxy.internal:8443/v1/chat/completions: bad gateway",
            f"HTTP 502 from https://{REDACTED}@proxy.internal:8443/v1/chat/completions: bad gateway",
        ),
        ("clone https://ghp_token@github.com/a/b", f"clone https://{REDACTED}@github.com/a/b"),
        (f"AIza key {GOOGLE_KEY}", f"AIza key {REDACTED}"),
    ],
)
def test_each_secret_shape_is_replaced_and_the_text_around_it_kept(text, scrubbed):
    assert scrub(text) == scrubbed
    assert scrub(scrubbed) == scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "HTTP 429 from https://api.openai.com/v1/chat/completions: rate limited",
        "'a b' cannot be a subject token: use letters, digits, '-' and '_'",
        "kill switch tripped (key fmk_a1b2): test trip",
        "the bearer of bad news did basic arithmetic with max_tokens: 300",
        "artifact 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 of call answer-1-4c2f",
        "sk-test is too short to be a real key",
    ],
)
def test_ordinary_text_is_left_as_it_is(text):
    assert scrub(text) == text


def test_a_known_secret_is_caught_whatever_its_shape():
    together_key = "f3c1" * 16
    add_known_secret(together_key)
    add_known_secret("short")  # too short to register: it would replace ordinary words

    assert scrub(f"invalid key {together_key}!") == f"invalid key {REDACTED}!"
    assert scrub("a short word") == "a short word"


def test_provider_and_backend_errors_are_scrubbed_where_they_are_made():
    text = f"HTTP 401 from https://u:p@host/v1: {OPENAI_KEY}"
    provider = OpenAIError(text, status=401, retryable=False, started=False)
    backend = BackendError("provider", f"Authorization: Bearer {OPENAI_KEY}")

    assert str(provider) == f"HTTP 401 from https://{REDACTED}@host/v1: {REDACTED}"
    assert backend.message == str(backend) == f"Authorization: Bearer {REDACTED}"


def test_the_log_processor_scrubs_every_value_and_leaves_the_rest():
    class Holder:
        def __repr__(self) -> str:
            return f"Holder({OPENAI_KEY})"

    plain = object()
    event = {
        "event": "call_failed",
        "error": f"HTTP 401: {OPENAI_KEY}",
        "nested": {"urls": ["https://u:p@h/v1", "https://h/v1"]},
        "holder": Holder(),
        "plain": plain,
        "tokens": 12,
        "ok": None,
    }

    scrubbed = scrub_secrets(None, "info", event)

    assert scrubbed["error"] == f"HTTP 401: {REDACTED}"
    assert scrubbed["nested"] == {"urls": [f"https://{REDACTED}@h/v1", "https://h/v1"]}
    assert scrubbed["holder"] == f"Holder({REDACTED})"
    assert scrubbed["plain"] is plain
    assert (scrubbed["event"], scrubbed["tokens"], scrubbed["ok"]) == ("call_failed", 12, None)


def test_the_stdlib_filter_scrubs_the_message_and_the_traceback():
    try:
        raise RuntimeError(f"provider said {OPENAI_KEY}")
    except RuntimeError as exc:
        record = logging.LogRecord("faststream", logging.ERROR, __file__, 1, "from %s", ("https://u:p@h",), (
            type(exc), exc, exc.__traceback__
        ))  # fmt: skip

    assert ScrubFilter().filter(record)

    rendered = logging.Formatter().format(record)
    assert OPENAI_KEY not in rendered and "u:p@" not in rendered
    assert f"from https://{REDACTED}@h" in rendered and f"RuntimeError: provider said {REDACTED}" in rendered
