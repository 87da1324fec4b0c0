"""Secrets taken out of text that leaves the process: provider error messages and log lines.

A provider's error answer, or an exception from the HTTP client, can carry what the call was sent
with: the API key, a bearer token, the request URL with user info or a key in its query string.
Such text passes ``scrub`` before it becomes an ``ErrorInfo`` message (which flows into
InferenceResults, task events and ClickHouse rows) or a log line (services/runtime/log.py runs it
on every log event). Each secret is replaced by ``REDACTED`` and the rest of the text is kept, so
the error still says what went wrong. Scrubbing scrubbed text changes nothing.

The patterns catch the known shapes. ``add_known_secret`` registers a secret this process holds
(a provider key read from the environment), which is then caught whatever its shape.
"""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"
# Shorter literals would replace ordinary words; real keys are far longer.
MIN_KNOWN_SECRET_CHARS = 8

# Each alternative has at most one named group: the text kept in front of the secret.
_SECRET = re.compile(
    "|".join(
        (
            # User info in a URL: scheme://user:password@host, or scheme://token@host.
            r"(?P<url>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/?#@]+(?=@)",
            # An Authorization header's value, whatever its scheme.
            r"(?P<header>(?i:\bauthorization)[\"']?\s*[:=]\s*[\"']?(?:(?i:bearer|basic|token)\s+)?)[^\s\"',;}]+",
            # A bearer token anywhere (8 or more characters, so "bearer of" stays).
            r"(?P<bearer>(?i:\bbearer)\s+)[A-Za-z0-9._~+/=\-]{8,}",
            # A key-like header or JSON field: api-key: x, "x-api-key": "x", access_token=x.
            r"(?P<param>(?<![A-Za-z0-9])(?i:(?:x-(?:goog-)?)?"
            r"(?:api[-_]?key|(?:access|auth|refresh)[-_]?token|client[-_]?secret|password))"
            r"[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,;}]+",
            # A credential in a query string: ?key=x (Google), &token=x, &sig=x (Azure SAS).
            r"(?P<query>[?&](?i:key|token|sig|secret)=)[^\s\"'&#]+",
            # Provider key shapes: OpenAI, Anthropic, DeepSeek (sk-), Groq, xAI, Hugging Face, Google.
            r"\b(?:sk-|gsk_|xai-|hf_)[A-Za-z0-9_\-]{16,}",
            r"\bAIza[0-9A-Za-z_\-]{35}",
        )
    )
)

_known_secrets: set[str] = set()


def add_known_secret(secret: str) -> None:
    """Scrub ``secret`` wherever it appears from now on in this process (too short ones are ignored)."""
    if len(secret) >= MIN_KNOWN_SECRET_CHARS:
        _known_secrets.add(secret)


def _replace(match: re.Match[str]) -> str:
    kept = match.group(match.lastgroup) if match.lastgroup else ""
    return kept + REDACTED


def scrub(text: str) -> str:
    """``text`` with every secret it holds replaced by ``REDACTED``."""
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _SECRET.sub(_replace, text)
