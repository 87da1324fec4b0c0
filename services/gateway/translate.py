"""An OpenAI request becomes a mesh step, and the mesh's answer an OpenAI completion.

``to_step``: the tenant and key id come from the virtual key, never from the body. ``model`` is
a catalogue model (pinned: ``allow_models = [model]``, which must be inside the key's allow-list)
or ``frugalmesh/auto`` (``allow_models`` = the key's allow-list; the key's ``--policy`` picks when
it has one, else the tenant's or workflow's policy in deploy/routing.toml). The
headers ``X-Frugalmesh-Task`` (requests that share it form one task: one cap, one row set in
ClickHouse), ``-Task-Budget`` (that task's cap, passed to the router in ``Mesh-Budget``),
``-Deadline`` (seconds from now; default ``request_timeout_s``) and ``-Workflow`` (a label
routing rules may match) shape the step. Role is ``chat``; each request is its own step.

``completion``: the result as a ``chat.completion``, with usage and the ``frugalmesh`` cost
field; ``headers``: the ``x-frugalmesh-*`` response headers both kinds of response carry.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from schemas.messages import (
    ChatMessage,
    ChatOptions,
    FunctionCall,
    FunctionSpec,
    InferenceResult,
    StepRequest,
    Tool,
    ToolCall,
    VirtualKey,
)
from schemas.subjects import HEADER_BUDGET, HEADER_TRACEPARENT, token
from services.gateway.errors import invalid, model_not_allowed, model_not_found
from services.gateway.openai_wire import (
    AUTO_MODEL,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    Cost,
    FunctionCallOut,
    MessageIn,
    MessageOut,
    NamedToolChoice,
    ToolCallOut,
    UsageOut,
)
from services.runtime.bus import now_ms
from services.runtime.catalog import Catalog
from services.runtime.reservations import parse_budget

ROLE = "chat"
DEFAULT_WORKFLOW = "gateway"
# An OpenAI request may leave the output length open; the mesh reserves the worst case of every
# paid call, so it needs a bound: long enough for an agent's turn, short enough to reserve.
DEFAULT_MAX_TOKENS = 1024

H_TASK = "x-frugalmesh-task"
H_TASK_BUDGET = "x-frugalmesh-task-budget"
H_DEADLINE = "x-frugalmesh-deadline"
H_WORKFLOW = "x-frugalmesh-workflow"


def allowed_models(request_model: str, key: VirtualKey, catalog: Catalog) -> list[str] | None:
    """The step's allow-list for ``request_model``; 404 for a model the catalogue lacks, 403 for one
    outside the key's allow-list."""
    if request_model == AUTO_MODEL:
        return list(key.allow_models) if key.allow_models else None
    if request_model not in catalog.models:
        raise model_not_found(request_model)
    if key.allow_models and request_model not in key.allow_models:
        raise model_not_allowed(request_model, key.id, key.allow_models)
    return [request_model]


def to_step(
    request: ChatCompletionRequest,
    key: VirtualKey,
    headers: Mapping[str, str],
    catalog: Catalog,
    default_deadline_s: float,
) -> tuple[StepRequest, dict[str, str]]:
    """The step for ``request`` and the NATS headers to send it with."""
    allow = allowed_models(request.model, key, catalog)
    task_id = headers.get(H_TASK) or uuid.uuid4().hex
    try:
        token(task_id)
    except ValueError:
        raise invalid(f"{H_TASK} must be letters, digits, '-' and '_' only, not {task_id!r}", H_TASK) from None
    nats_headers: dict[str, str] = {}
    budget = headers.get(H_TASK_BUDGET)
    if budget is not None:
        try:
            parse_budget(budget)
        except ValueError:
            raise invalid(f"{H_TASK_BUDGET} must be an amount of USD >= 0, not {budget!r}", H_TASK_BUDGET) from None
        nats_headers[HEADER_BUDGET] = budget
    if HEADER_TRACEPARENT in headers:
        nats_headers[HEADER_TRACEPARENT] = headers[HEADER_TRACEPARENT]
    step = StepRequest(
        task_id=task_id,
        step_id=f"chat-{uuid.uuid4().hex[:12]}",
        tenant=key.tenant,
        workflow=headers.get(H_WORKFLOW) or DEFAULT_WORKFLOW,
        role=ROLE,
        messages=[_message(m) for m in request.messages],
        max_tokens=request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS,
        response_schema=_schema(request),
        allow_models=allow,
        deadline_ms=now_ms() + int(_deadline_s(headers, default_deadline_s) * 1000),
        options=_options(request),
        key_id=key.id,
        # A routed call follows the key's policy; a pinned one has nothing left to choose.
        policy=(key.policy or "") if request.model == AUTO_MODEL else "",
    )
    return step, nats_headers


def _deadline_s(headers: Mapping[str, str], default_s: float) -> float:
    value = headers.get(H_DEADLINE)
    if value is None:
        return default_s
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86_400:
        raise invalid(f"{H_DEADLINE} must be seconds from now (0 to a day), not {value!r}", H_DEADLINE)
    return seconds


def _message(m: MessageIn) -> ChatMessage:
    calls = None
    if m.tool_calls:
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
            for c in m.tool_calls
        ]
    return ChatMessage(role=m.role, content=m.text(), tool_calls=calls, tool_call_id=m.tool_call_id, name=m.name)


def _schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    format_ = request.response_format
    if format_ is not None and format_.type == "json_schema" and format_.json_schema is not None:
        return format_.json_schema.schema
    return None


def _options(request: ChatCompletionRequest) -> ChatOptions:
    tools = None
    if request.tools:
        tools = [
            Tool(
                function=FunctionSpec(
                    name=t.function.name,
                    description=t.function.description,
                    parameters=t.function.parameters,
                    strict=t.function.strict,
                )
            )
            for t in request.tools
        ]
    choice: str | dict[str, Any] | None = None
    if isinstance(request.tool_choice, NamedToolChoice):
        choice = {"type": "function", "function": {"name": request.tool_choice.function.name}}
    else:
        choice = request.tool_choice
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    return ChatOptions(
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=stop or None,
        tools=tools,
        tool_choice=choice,
        json_object=request.response_format is not None and request.response_format.type == "json_object",
        user=request.user or "",
    )


# -- the answer --


def finish_reason(result: InferenceResult) -> str:
    return "tool_calls" if result.tool_calls else (result.finish_reason or "stop")


def usage(result: InferenceResult) -> UsageOut:
    u = result.usage
    return UsageOut(
        prompt_tokens=u.input_tokens,
        completion_tokens=u.output_tokens,
        total_tokens=u.input_tokens + u.output_tokens,
        prompt_tokens_details={"cached_tokens": u.cached_input_tokens},
    )


def cost(result: InferenceResult, task_id: str) -> Cost:
    return Cost(
        cost_usd=result.cost_usd,
        call_id=result.call_id,
        model=result.model,
        tier=result.tier,
        cache_hit=result.cache_hit,
        task_id=task_id,
    )


def completion(result: InferenceResult, task_id: str) -> ChatCompletion:
    calls = None
    if result.tool_calls:
        calls = [
            ToolCallOut(id=c.id, function=FunctionCallOut(name=c.function.name, arguments=c.function.arguments))
            for c in result.tool_calls
        ]
    return ChatCompletion(
        id=completion_id(result.call_id),
        created=int(time.time()),
        model=result.model,
        choices=[
            Choice(
                message=MessageOut(content=result.output if result.output or not calls else None, tool_calls=calls),
                finish_reason=finish_reason(result),
            )
        ],
        usage=usage(result),
        frugalmesh=cost(result, task_id),
    )


def completion_id(call_id: str) -> str:
    return f"chatcmpl-{call_id}"


def headers(result: InferenceResult | None, call_id: str, task_id: str) -> dict[str, str]:
    """The ``x-frugalmesh-*`` headers: all of them once the result is known, else the ids alone
    (a stream whose first token came before its result: the rest rides on its finishing chunk)."""
    out = {"x-frugalmesh-call-id": call_id, "x-frugalmesh-task": task_id}
    if result is not None:
        out |= {
            "x-frugalmesh-model": result.model,
            "x-frugalmesh-tier": result.tier,
            "x-frugalmesh-cost-usd": f"{result.cost_usd:.10f}",
            "x-frugalmesh-cache": "hit" if result.cache_hit else "miss",
        }
    return out
