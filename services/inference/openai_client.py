"""A client for OpenAI-compatible Chat Completions APIs over httpx (OpenAI, Together, vLLM, llama.cpp).

It always streams (``stream=true`` with ``stream_options.include_usage``) so a call cut off at
its deadline closes the connection and stops the provider generating, and reads the
server-sent events itself. Each chunk's text and tool-call pieces go to ``on_delta`` as they
arrive (when given); the tool calls are assembled by their ``index`` (the first piece carries the
id and name, the rest add to the arguments). It knows nothing of the mesh's routing or metering:
it returns what the provider said, with ``usage=None`` when the provider did not report usage.

An error's text (the URL, the provider's answer, the transport's complaint) is scrubbed of secrets
(services/runtime/scrub.py) before it is an ``OpenAIError``: a provider may echo the key or the
URL's user info back, and the message goes on into results, task events, usage rows and logs. The
client's own key is registered with the scrubber, so it is caught whatever its shape.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from schemas.messages import FunctionCall, ToolCall, ToolCallDelta
from services.inference.backend import OnDelta, OutputDelta
from services.runtime.scrub import add_known_secret, scrub

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# Idle connections kept for reuse; beyond them a burst opens (and then closes) its own.
CONNECTION_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=256)
ERROR_BODY_CHARS = 500


@dataclass(frozen=True)
class ProviderUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class ChatCompletion:
    text: str
    finish_reason: str
    # The model the provider says served the call ("" if it did not say).
    model: str
    usage: ProviderUsage | None
    # Seconds from sending the request to the first output text (0.0: none came, or not streamed).
    ttft_s: float = 0.0
    # The tool calls the model made, in index order; empty: none.
    tool_calls: tuple[ToolCall, ...] = ()


class OpenAIError(Exception):
    """A failed call. ``started``: the provider had accepted the call (HTTP 200), so it may bill.
    The message is kept scrubbed of secrets."""

    def __init__(self, message: str, *, status: int | None, retryable: bool, started: bool) -> None:
        super().__init__(scrub(message))
        self.status = status
        self.retryable = retryable
        self.started = started


def retryable_status(status: int) -> bool:
    """Rate limits and server errors pass; other 4xx are the request's fault and will fail again."""
    return status == 429 or status >= 500


class OpenAIClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if api_key:
            add_known_secret(api_key)
        # No cap on connections: the calls in flight are bounded by the service's capacity
        # (services/runtime/serve.py), and httpx's default of 100 would queue the rest unseen.
        self.http = http or httpx.AsyncClient(timeout=timeout, limits=CONNECTION_LIMITS)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = headers

    async def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        response_format: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        on_delta: OnDelta | None = None,
    ) -> ChatCompletion:
        """One chat completion. ``extra``: more request fields sent as given (top_p, seed, stop, tools,
        tool_choice, user); ``on_delta`` is awaited with each streamed piece of output, in order."""
        payload: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "temperature": temperature,
            **(extra or {}),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if response_format is not None:
            payload["response_format"] = dict(response_format)
        sent = time.monotonic()
        try:
            async with self.http.stream("POST", self.url, json=payload, headers=self.headers) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")[:ERROR_BODY_CHARS]
                    raise OpenAIError(
                        f"HTTP {response.status_code} from {self.url}: {body}",
                        status=response.status_code,
                        retryable=retryable_status(response.status_code),
                        started=False,
                    )
                if response.headers.get("content-type", "").startswith("application/json"):
                    # Some compatible servers ignore stream=true and answer with one JSON body.
                    return _from_body(json.loads(await response.aread()))
                return await _from_stream(sse_data(response.aiter_lines()), sent, on_delta)
        except httpx.TransportError as exc:
            # Connection failures, resets and read timeouts are transient. Only a call that never
            # reached the provider is surely unbilled.
            started = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
            message = f"{type(exc).__name__} talking to {self.url}: {exc}"
            raise OpenAIError(message, status=None, retryable=True, started=started) from exc
        except json.JSONDecodeError as exc:
            raise OpenAIError(
                f"malformed response from {self.url}: {exc}", status=200, retryable=True, started=True
            ) from exc

    async def aclose(self) -> None:
        await self.http.aclose()


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (data lines joined by newlines; other fields ignored)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


class _ToolCallAssembly:
    """Streamed tool-call pieces joined by index into whole tool calls."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, raw: Sequence[Mapping[str, Any]]) -> list[ToolCallDelta]:
        """Take one chunk's ``delta.tool_calls``; returns them as pieces to relay."""
        pieces = []
        for item in raw:
            index = int(item.get("index", 0))
            function = item.get("function") or {}
            piece = ToolCallDelta(
                index=index, id=item.get("id"), name=function.get("name"), arguments=function.get("arguments") or ""
            )
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": []})
            call["id"] = piece.id or call["id"]
            call["name"] = piece.name or call["name"]
            call["arguments"].append(piece.arguments)
            pieces.append(piece)
        return pieces

    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(
            ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments="".join(c["arguments"])))
            for _, c in sorted(self.calls.items())
        )


async def _from_stream(events: AsyncIterator[str], sent: float, on_delta: OnDelta | None) -> ChatCompletion:
    text: list[str] = []
    tools = _ToolCallAssembly()
    finish_reason = ""
    model = ""
    usage: ProviderUsage | None = None
    ttft_s = 0.0
    async for data in events:
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise OpenAIError(f"error in stream: {chunk['error']}", status=None, retryable=False, started=True)
        model = model or chunk.get("model") or ""
        # vLLM can repeat usage on every chunk; the last one reported is the total.
        if chunk.get("usage"):
            usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content") or ""
            pieces = tools.add(delta["tool_calls"]) if delta.get("tool_calls") else None
            if (content or pieces) and not ttft_s:
                ttft_s = time.monotonic() - sent
            text.append(content)
            finish_reason = choice.get("finish_reason") or finish_reason
            if on_delta is not None and (content or pieces):
                await on_delta(OutputDelta(content=content, tool_calls=pieces, provider_model=model))
    return ChatCompletion(
        text="".join(text),
        finish_reason=finish_reason,
        model=model,
        usage=usage,
        ttft_s=ttft_s,
        tool_calls=tools.tool_calls(),
    )


def _from_body(body: Mapping[str, Any]) -> ChatCompletion:
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    tools = _ToolCallAssembly()
    tools.add([{"index": i, **call} for i, call in enumerate(message.get("tool_calls") or [])])
    return ChatCompletion(
        text=message.get("content") or "",
        finish_reason=choice.get("finish_reason") or "",
        model=body.get("model") or "",
        usage=_usage(body["usage"]) if body.get("usage") else None,
        tool_calls=tools.tool_calls(),
    )


def _usage(raw: Mapping[str, Any]) -> ProviderUsage:
    details = raw.get("prompt_tokens_details") or {}
    return ProviderUsage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
    )
