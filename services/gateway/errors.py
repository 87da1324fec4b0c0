"""Errors as OpenAI's SDKs expect them: ``{"error": {"message", "type", "param", "code"}}`` with the
status code each SDK maps to its own exception type (401 AuthenticationError, 400 BadRequestError,
403 PermissionDeniedError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError).

A mesh failure arrives as an ``ErrorInfo`` (an error ``InferenceResult`` or a ``Rejection``);
``from_mesh`` maps its kind to a status. Two choices are deliberate:

- a refusal that quotes a kill switch is a 403, like ``killed``: the accountant refuses a
  reservation for a tripped switch the router had not heard of yet, and to the client both are
  the same stop;
- every error carries ``x-should-retry`` from ``ErrorInfo.retryable``. The OpenAI SDKs retry 429
  and 5xx on their own unless told not to, and a budget cap, a kill switch or a passed deadline
  will not move for a retry; an accountant that did not answer (fail closed) might, so that
  refusal is a retryable 503 rather than a 429.
"""

from __future__ import annotations

import msgspec
from starlette.responses import Response

from schemas.messages import ErrorInfo
from services.runtime.reservations import UNAVAILABLE

KILL_SWITCH = "kill switch tripped"  # how every refusal caused by a switch begins (control.killed_message)


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct, kw_only=True):
    error: ErrorBody


class GatewayError(Exception):
    """A request the gateway answers with an error: the status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, param=param, code=code)
        self.retryable = retryable
        # The x-frugalmesh-* headers of a call that was made and failed (it was metered).
        self.headers: dict[str, str] = {}

    def envelope(self) -> bytes:
        """The error as one JSON document (an HTTP body, or an SSE event after a stream began)."""
        return msgspec.json.encode(ErrorEnvelope(error=self.body))

    def response(self) -> Response:
        return Response(
            self.envelope(),
            status_code=self.status,
            media_type="application/json",
            headers={**self.headers, "x-should-retry": "true" if self.retryable else "false"},
        )


def invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_request")


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key")


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404, f"The model `{model}` does not exist; GET /v1/models lists them", param="model", code="model_not_found"
    )


def model_not_allowed(model: str, key_id: str, allowed: list[str]) -> GatewayError:
    message = f"The key {key_id} may not use the model `{model}`; it may use: {', '.join(allowed)}"
    return GatewayError(403, message, type="permission_denied", param="model", code="model_not_allowed")


# kind -> (status, OpenAI error type, code)
_BY_KIND: dict[str, tuple[int, str, str]] = {
    "invalid": (400, "invalid_request_error", "invalid_request"),
    "refused": (429, "insufficient_quota", "budget_refused"),
    "killed": (403, "permission_denied", "kill_switch"),
    "timeout": (504, "timeout", "deadline_exceeded"),
    "provider": (502, "api_error", "provider_error"),
    "pinning": (502, "api_error", "model_mismatch"),
    "unavailable": (503, "api_error", "unavailable"),
    "cancelled": (499, "api_error", "cancelled"),
}


def from_mesh(error: ErrorInfo) -> GatewayError:
    """The HTTP error for a call the mesh refused or failed; the mesh's message is kept whole (it
    names the layer and the cap)."""
    status, type_, code = _BY_KIND.get(error.kind, (502, "api_error", error.kind))
    retryable = error.retryable
    if error.kind == "refused" and error.message.startswith(KILL_SWITCH):
        status, type_, code = _BY_KIND["killed"]
    elif error.kind == "refused" and error.message.startswith(UNAVAILABLE):
        status, type_, code, retryable = 503, "api_error", "budget_unavailable", True
    return GatewayError(status, error.message, type=type_, code=code, retryable=retryable)


def client_gone() -> GatewayError:
    """What a request whose client left is logged and counted as (nobody reads it): nginx's 499."""
    message = "the client closed the request before its answer; the call was cancelled"
    return GatewayError(499, message, type="api_error", code="client_closed_request")


def no_router(message: str) -> GatewayError:
    return GatewayError(503, message, type="api_error", code="no_router", retryable=True)


def deadline(message: str) -> GatewayError:
    return GatewayError(504, message, type="timeout", code="deadline_exceeded")
