"""What an agent raises to end its step with a reason the planner acts on.

An agent's result says why a step could not finish in the mesh's own terms (``ErrorInfo``: a kind
and whether another try may succeed), because the planner decides on them: a ``refused`` or
``killed`` step is never retried, a retryable one may go to another instance. ``AgentError`` lets
an agent say so itself (an unusable input is ``invalid``, not worth a retry); ``CallRefused`` is the
one the mesh raises inside ``ctx.llm`` when a defence stopped a call. Either, uncaught, becomes the
``AgentResult.error`` next to what the agent stored before it; any other exception is the agent's
own failure (kind ``agent``, retryable).
"""

from __future__ import annotations

from schemas.messages import ErrorInfo, ErrorKind


class AgentError(Exception):
    """The step cannot finish, for the reason ``error`` (raise it from a handler)."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(f"{error.kind}: {error.message}")
        self.error = error

    @classmethod
    def of(cls, kind: ErrorKind, message: str, *, retryable: bool = False) -> AgentError:
        return cls(ErrorInfo(kind=kind, message=message, retryable=retryable))


class CallRefused(AgentError):
    """A model call did not happen or failed: the router refused it (budget, kill switch, pinning, anti-loop),
    the deadline passed, no router answered, or the model failed. ``error.kind`` says which; the agent may
    catch it and decide (store its best artifact so far, say) or let it end the step."""
