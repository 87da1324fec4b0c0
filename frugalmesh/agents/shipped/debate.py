"""``debate``: k debaters answer the goal, then answer again having read each other, for r rounds; the
majority's final answer is the result (Du et al., "Improving Factuality and Reasoning in Language
Models through Multiagent Debate", 2023).

One agent makes every call itself, so the whole debate is one step of the task: k * r calls, each
reserved against the task's budget. A round's k calls run at once (at most ``MAX_DEBATERS``, the
mesh's fan-out cap); a debate's cost grows with k * r, and what each debater reads grows with k, so
both are capped. Every call starts with the debater's own system message (no two calls of a task are
identical, which layer 2 would stop) and then the goal as the first user message, untouched, which
replay backends find recorded answers by; from round 2 a second user message holds the others'
previous answers.

Answers are compared by their final answer: the last number in the text (GSM8K-style goals), else
the whole stripped text. Ties go to the lowest-numbered debater. When a call is refused (budget,
kill switch, deadline) the debate stops: the majority of the last complete round, or else any
answer, is stored before the refusal ends the step, so the task ends ``partial`` with it.

params: ``k`` (debaters, default 3, 1 to 9), ``rounds`` (default 2, 1 to 5), ``max_tokens`` (per call,
default 512).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

from frugalmesh.agents import Agent, AgentError, CallRefused, Context
from schemas.messages import ArtifactRef, InferenceResult

MAX_DEBATERS = 9
MAX_ROUNDS = 5

agent = Agent(
    "debate",
    version="1.0.0",
    produces=["answer"],
    description="k debaters answer the goal, read each other's answers and answer again for r rounds; "
    "the majority's final answer wins",
)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str:
    """What two answers are compared by: the last number in ``text`` (commas dropped, 18.0 as 18), else
    the whole stripped text."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return text.strip()
    number = numbers[-1].replace(",", "")
    return number.rstrip("0").rstrip(".") if "." in number else number


def majority(answers: dict[int, InferenceResult]) -> InferenceResult:
    """The answer most debaters gave (by ``final_answer``), as the lowest-numbered of them wrote it."""
    finals = {debater: final_answer(result.output) for debater, result in sorted(answers.items())}
    votes = Counter(finals.values())
    first = {final: debater for debater, final in reversed(finals.items())}
    winner = max(votes, key=lambda final: (votes[final], -first[final]))
    return answers[first[winner]]


def _prompt(
    debater: int, k: int, goal: str, previous: dict[int, InferenceResult], round_number: int, rounds: int
) -> list[dict[str, str]]:
    """Debater ``debater``'s messages: its persona, the goal, and after round 1 the others' last answers."""
    persona = f"You are debater {debater} of {k}. Reason step by step and end with your final answer."
    prompt = [{"role": "system", "content": persona}, {"role": "user", "content": goal}]
    if not previous:
        return prompt
    # The round number keeps a debater's calls distinct even when nobody changed their answer.
    lines = [f"Round {round_number} of {rounds}. The other debaters answered:"]
    lines += [f"Debater {other}: {result.output}" for other, result in sorted(previous.items()) if other != debater]
    if debater in previous:
        lines.append(f"Your previous answer: {previous[debater].output}")
    lines.append("Weigh their reasoning against yours and give your final answer again.")
    return [*prompt, {"role": "user", "content": "\n\n".join(lines)}]


def _bounded(params: dict[str, Any], name: str, default: int, most: int) -> int:
    value = params.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise AgentError.of("invalid", f"debate: params.{name} must be a whole number from 1 to {most}, got {value!r}")
    return value


@agent.handler
async def debate(ctx: Context) -> ArtifactRef:
    k = _bounded(ctx.params, "k", 3, MAX_DEBATERS)
    rounds = _bounded(ctx.params, "rounds", 2, MAX_ROUNDS)
    max_tokens = _bounded(ctx.params, "max_tokens", 512, 32_768)
    last_complete: dict[int, InferenceResult] = {}
    for round_number in range(1, rounds + 1):
        calls = [
            ctx.llm(_prompt(d, k, ctx.goal, last_complete, round_number, rounds), max_tokens=max_tokens, role="debate")
            for d in range(1, k + 1)
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        answers = {d: o for d, o in enumerate(outcomes, 1) if isinstance(o, InferenceResult)}
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            refused = next((f for f in failures if isinstance(f, CallRefused)), None)
            if refused is None:
                raise failures[0]
            best = last_complete or answers
            if best:
                await _store(ctx, majority(best), rounds_done=round_number - 1)
            ctx.log.info("debate_stopped", round=round_number, kind=refused.error.kind)
            raise refused
        last_complete = answers
    return await _store(ctx, majority(last_complete), rounds_done=rounds)


async def _store(ctx: Context, chosen: InferenceResult, rounds_done: int) -> ArtifactRef:
    ctx.log.info("debate_answer", rounds=rounds_done, answer=final_answer(chosen.output))
    return await ctx.put("answer", {"text": chosen.output, "model": chosen.model, "graded": chosen.graded})
