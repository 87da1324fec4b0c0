"""Write an agent service for a frugalmesh mesh in Python.

```python
from frugalmesh.agents import Agent, Context

agent = Agent("critic", version="1.0.0", consumes=["answer"], produces=["review"])

@agent.handler
async def review(ctx: Context):
    draft = await ctx.get(ctx.needs["draft"])
    reply = await ctx.llm([{"role": "user", "content": ctx.goal}], role="review")
    return await ctx.put("review", {"text": reply.output, "model": reply.model, "verdict": "accept"})
```

``frugalmesh agent run module:agent`` runs one instance (run it again to scale out); a workflow step
``kind = "agent"`` sends it requests. Its model calls are calls of the task it works for: the
task's budget, the kill switch, pinning and the deadline bind them, and what stops one arrives as
``CallRefused``. The modules: ``agent`` (the declaration), ``context`` (one request), ``service``
(a running instance), ``errors``; ``shipped`` holds the agents frugalmesh ships.
"""

from frugalmesh.agents.agent import Agent
from frugalmesh.agents.context import Context
from frugalmesh.agents.errors import AgentError, CallRefused

__all__ = ["Agent", "AgentError", "CallRefused", "Context"]
