"""A local engine's load, read from its Prometheus ``/metrics``: what spillover decides on.

Two engines' metric names are understood:

- llama.cpp's server (and the embedded engine, services/embedded/engine, which uses the same
  names): ``llamacpp:requests_processing``, ``llamacpp:requests_deferred`` (waiting),
  ``llamacpp:kv_cache_usage_ratio``, ``llamacpp:predicted_tokens_seconds`` (recent decode rate).
- vLLM: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``
  (``vllm:gpu_cache_usage_perc`` before v1; a fraction despite the name), and the per-token
  latency histogram (``vllm:inter_token_latency_seconds``, formerly
  ``vllm:time_per_output_token_seconds``), whose growth between two reads gives the recent decode
  rate of one sequence. vLLM labels its samples ``model_name``: a read for one model keeps that
  model's samples when there are any, and sums the rest (e.g. several data-parallel engines).

``parse_metrics`` is a pure function of the text; ``EngineLoadReader`` reads an engine over httpx
and keeps the previous read, which the vLLM decode rate needs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families

MetricsDialect = Literal["llamacpp", "vllm"]

LLAMACPP_RUNNING = "llamacpp:requests_processing"
LLAMACPP_WAITING = "llamacpp:requests_deferred"
LLAMACPP_KV = "llamacpp:kv_cache_usage_ratio"
LLAMACPP_DECODE_RATE = "llamacpp:predicted_tokens_seconds"

VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
VLLM_TOKEN_LATENCY = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")

MODEL_LABEL = "model_name"
DEFAULT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class EngineLoad:
    engine: MetricsDialect
    running: int
    waiting: int
    # Share of the KV cache in use, 0 to 1.
    kv_cache_usage: float
    # Recent output tokens per second of one sequence; None when not measured yet.
    decode_tokens_per_s: float | None
    # vLLM: the per-token latency histogram's running sum (seconds) and count, for the next read's rate.
    token_latency_sum_s: float = 0.0
    token_latency_count: float = 0.0


class MetricsError(Exception):
    """The text is not Prometheus exposition, or names neither engine's metrics."""


def parse_metrics(text: str, model: str | None = None) -> EngineLoad:
    """The load in one /metrics text of llama.cpp's server or vLLM. ``model`` picks vLLM's
    samples labelled ``model_name=<model>`` when there are any."""
    values = _samples(text, model)
    if LLAMACPP_RUNNING in values:
        rate = values.get(LLAMACPP_DECODE_RATE, 0.0)
        return EngineLoad(
            engine="llamacpp",
            running=round(values[LLAMACPP_RUNNING]),
            waiting=round(values.get(LLAMACPP_WAITING, 0.0)),
            kv_cache_usage=values.mean(LLAMACPP_KV),
            # 0 until the engine has finished a generation.
            decode_tokens_per_s=rate if rate > 0 else None,
        )
    if VLLM_RUNNING in values:
        kv = next((values.mean(name) for name in VLLM_KV if name in values), 0.0)
        latency = next((name for name in VLLM_TOKEN_LATENCY if f"{name}_count" in values), None)
        return EngineLoad(
            engine="vllm",
            running=round(values[VLLM_RUNNING]),
            waiting=round(values.get(VLLM_WAITING, 0.0)),
            kv_cache_usage=kv,
            decode_tokens_per_s=None,
            token_latency_sum_s=values.get(f"{latency}_sum", 0.0) if latency else 0.0,
            token_latency_count=values.get(f"{latency}_count", 0.0) if latency else 0.0,
        )
    raise MetricsError(f"no {LLAMACPP_RUNNING} or {VLLM_RUNNING} among the metrics")


class _Samples(dict[str, float]):
    """Sample name -> value summed over label sets, with how many were summed."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: float) -> None:
        self[name] = self.get(name, 0.0) + value
        self.counts[name] += 1

    def mean(self, name: str) -> float:
        """A ratio (KV-cache use) is averaged over engines, not summed."""
        return self[name] / self.counts[name] if name in self else 0.0


def _samples(text: str, model: str | None) -> _Samples:
    """The samples of ``model`` (label ``model_name``) when it has any, else every sample."""
    mine, every = _Samples(), _Samples()
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                every.add(sample.name, sample.value)
                if model is not None and sample.labels.get(MODEL_LABEL) == model:
                    mine.add(sample.name, sample.value)
    except ValueError as exc:
        raise MetricsError(f"not Prometheus text: {exc}") from None
    return mine if mine else every


def with_decode_rate(current: EngineLoad, previous: EngineLoad | None) -> EngineLoad:
    """vLLM reports no rate, only a latency histogram: the tokens decoded between two reads over
    the time they took is one sequence's recent rate. With no tokens in between (idle), the
    previous rate stands."""
    if current.engine != "vllm" or previous is None or previous.engine != "vllm":
        return current
    tokens = current.token_latency_count - previous.token_latency_count
    seconds = current.token_latency_sum_s - previous.token_latency_sum_s
    if tokens > 0 and seconds > 0:
        return replace(current, decode_tokens_per_s=tokens / seconds)
    return replace(current, decode_tokens_per_s=previous.decode_tokens_per_s)


def metrics_url(base_url: str) -> str:
    """An OpenAI-compatible engine's /metrics from its base URL (``http://host:port/v1``)."""
    return base_url.rstrip("/").removesuffix("/v1") + "/metrics"


class EngineLoadReader:
    """Reads one engine's /metrics; keeps the previous read for the vLLM decode rate."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.model = model
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._owns_client = client is None
        self.last: EngineLoad | None = None
        self.read_at: float = 0.0

    async def read(self) -> EngineLoad:
        """The engine's load now; raises httpx.HTTPError or MetricsError."""
        response = await self._client.get(self.url)
        response.raise_for_status()
        load = with_decode_rate(parse_metrics(response.text, self.model), self.last)
        self.last = load
        self.read_at = time.monotonic()
        return load

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
