"""A gateway recording (``FRUGALMESH_GATEWAY_RECORD``, services/gateway/recording.py) as requests to
send again: each line's request body, its ``x-frugalmesh-*`` headers and its arrival time.

Lines are ordered by ``ts_ms`` (wall clock), not by file order: a replica writes a line when the
request ends, and several replicas may write one file, or their files be concatenated. What cannot
be sent again faithfully is skipped and counted: a body that was not a JSON object, and a request
refused for its key (401: the replay sends every request under its own, valid key, so it would be
served and no longer be the traffic that was recorded).

Two things change per replay run, so a run is new traffic to the mesh: a recorded
``X-Frugalmesh-Task`` gets the run's suffix (calls that shared a task still share one, but not the
recorded run's task cap or its identical-call and loop counts), and with a salt, the first message's
text starts with it, so the exact-match cache does not answer what the recorded run already asked.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from services.gateway.recording import RECORDING_VERSION, SOURCE

H_TASK = "x-frugalmesh-task"
UNAUTHORIZED = 401


@dataclass(frozen=True)
class RecordedRequest:
    arrival_s: float  # from the first replayed request
    body: dict[str, Any]
    headers: dict[str, str]  # the recorded x-frugalmesh-* request headers
    stream: bool
    # What the recorded run got, for comparison in the report.
    status: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


@dataclass
class GatewayTraffic:
    requests: list[RecordedRequest]
    skipped: dict[str, int] = field(default_factory=dict)  # why, how many


def is_gateway_recording(path: Path) -> bool:
    """Whether ``path``'s first line is a gateway recording's."""
    try:
        with path.open() as f:
            first = next((line for line in f if line.strip()), "")
        line = json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(line, dict) and line.get("source") == SOURCE


def read_gateway_recording(path: Path, limit: int | None = None, duration_s: float | None = None) -> GatewayTraffic:
    """The requests of ``path`` in arrival order, from 0 s, cut at ``limit`` requests and ``duration_s``."""
    lines = []
    with path.open() as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            line = json.loads(text)
            if line.get("source") != SOURCE:
                raise ValueError(f'{path}:{number}: not a gateway recording line (no "source": "{SOURCE}")')
            if line.get("v", RECORDING_VERSION) > RECORDING_VERSION:
                raise ValueError(f"{path}: recording version {line['v']} is newer than this reader's")
            lines.append(line)
    lines.sort(key=lambda line: line["ts_ms"])
    skipped: collections.Counter[str] = collections.Counter()
    requests = []
    first_ms = lines[0]["ts_ms"] if lines else 0.0
    for line in lines:
        if line.get("status") == UNAUTHORIZED:  # refused before its body was read: it has none
            skipped["refused for its key (401)"] += 1
            continue
        if not isinstance(line.get("request"), dict):
            skipped["body not a JSON object"] += 1
            continue
        usage = line.get("usage") or {}
        requests.append(
            RecordedRequest(
                arrival_s=(line["ts_ms"] - first_ms) / 1000,
                body=line["request"],
                headers=line.get("headers") or {},
                stream=bool(line["request"].get("stream")),
                status=line.get("status", 0),
                input_tokens=usage.get("input_tokens") or 0,
                output_tokens=usage.get("output_tokens") or 0,
                cost_usd=line.get("cost_usd") or 0.0,
            )
        )
    requests = list(islice(requests, limit))
    if requests:  # arrival times from the first request that is replayed
        start = requests[0].arrival_s
        requests = [dataclasses.replace(r, arrival_s=r.arrival_s - start) for r in requests]
    if duration_s is not None:
        requests = [r for r in requests if r.arrival_s <= duration_s]
    return GatewayTraffic(requests, dict(skipped))


def replay_headers(request: RecordedRequest, run_id: str) -> dict[str, str]:
    """The recorded headers, the task (if any) renamed for this run."""
    headers = dict(request.headers)
    if H_TASK in headers:
        headers[H_TASK] = f"{headers[H_TASK]}-{run_id}"
    return headers


def salted(body: dict[str, Any], salt: str) -> dict[str, Any]:
    """``body`` with ``[salt] `` before the first message text ("" : ``body`` itself)."""
    if not salt:
        return body
    out = dict(body)
    messages = copy.deepcopy(body.get("messages"))
    out["messages"] = messages
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and content:
            message["content"] = f"[{salt}] {content}"
            return out
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = f"[{salt}] {part['text']}"
                    return out
    return out


def sized(body: dict[str, Any], output_tokens: int) -> dict[str, Any]:
    """``body`` asking for at most the recorded output length (0, unknown: ``body`` itself)."""
    if output_tokens <= 0:
        return body
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return {**body, field: output_tokens}
