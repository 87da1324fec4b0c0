"""``fixer``: fix it until it passes. A model call writes a candidate, a local check tests it, and on a
failure the next call gets the candidate and what failed, up to ``max_turns`` calls.

The check is deterministic and runs here, free: ``must_contain`` (the candidate holds that text)
and/or ``expected`` (its last number equals that number). The first candidate that passes is the
result, an ``answer`` artifact.

Each call carries only the last candidate and its failure, never the whole history: what a turn
costs stays flat, and a model stuck on one answer sends the same call again, which the router's
layer 2 stops (identical calls per task). That is where a runaway ends: not in this loop, whose
``max_turns`` is the workflow's to set, but in the mesh: layer 2's identical and per-task call
counts and the task's budget cap refuse the next call, and the refusal ends the step with the best
candidate so far stored. A loop that runs out of turns stores its last candidate too and fails the
step (kind ``agent``, not retryable: another try would loop the same).

params: ``must_contain`` (text), ``expected`` (a number), at least one of them; ``max_turns`` (default
5); ``max_tokens`` (per call, default 512).
"""

from __future__ import annotations

from typing import Any

from frugalmesh.agents import Agent, AgentError, CallRefused, Context
from frugalmesh.agents.shipped.debate import final_answer
from schemas.messages import ArtifactRef, InferenceResult

DEFAULT_MAX_TURNS = 5

agent = Agent(
    "fixer",
    version="1.0.0",
    produces=["answer"],
    description="writes a candidate, checks it locally and feeds the failure back until it passes",
)


def failure(candidate: str, params: dict[str, Any]) -> str | None:
    """Why ``candidate`` fails the step's check, or None when it passes."""
    must_contain = params.get("must_contain")
    if must_contain is not None and str(must_contain) not in candidate:
        return f"the answer must contain {must_contain!r}"
    expected = params.get("expected")
    if expected is not None and final_answer(candidate) != final_answer(str(expected)):
        return f"the final number must be the correct result; {final_answer(candidate)!r} is not"
    return None


def _params(params: dict[str, Any]) -> tuple[int, int]:
    if params.get("must_contain") is None and params.get("expected") is None:
        raise AgentError.of("invalid", "fixer: params need must_contain and/or expected: there is nothing to check")
    bounded = []
    for name, default in (("max_turns", DEFAULT_MAX_TURNS), ("max_tokens", 512)):
        value = params.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AgentError.of("invalid", f"fixer: params.{name} must be a whole number of at least 1, got {value!r}")
        bounded.append(value)
    return bounded[0], bounded[1]


@agent.handler
async def fix(ctx: Context) -> ArtifactRef:
    max_turns, max_tokens = _params(ctx.params)
    instructions = {"role": "system", "content": "Answer the task. End with your final answer."}
    # Replay backends find recorded answers by the first user message: it stays the bare goal.
    prompt: list[dict[str, str]] = [instructions, {"role": "user", "content": ctx.goal}]
    best: InferenceResult | None = None
    for turn in range(1, max_turns + 1):
        try:
            reply = await ctx.llm(prompt, max_tokens=max_tokens, role="fix")
        except CallRefused as refused:
            if best is not None:
                await _store(ctx, best)
            ctx.log.info("fixer_stopped", turn=turn, kind=refused.error.kind)
            raise
        best = reply
        why = failure(reply.output, ctx.params)
        if why is None:
            return await _store(ctx, reply)
        retry = {"role": "user", "content": f"Your answer failed the check: {why}. Fix it and answer again."}
        candidate = {"role": "assistant", "content": reply.output}
        prompt = [instructions, {"role": "user", "content": ctx.goal}, candidate, retry]
    assert best is not None  # max_turns >= 1, and every turn either returned, raised or set it
    await _store(ctx, best)
    raise AgentError.of("agent", f"fixer: no candidate passed the check in {max_turns} turns")


async def _store(ctx: Context, candidate: InferenceResult) -> ArtifactRef:
    return await ctx.put("answer", {"text": candidate.output, "model": candidate.model, "graded": candidate.graded})
