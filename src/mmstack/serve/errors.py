"""Errors with an HTTP status, and the OpenAI-style error object they become.

Every error response has the body ``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API
does, so the official client raises its usual exception classes (``RateLimitError`` for 429, ...).
Messages describe the request's problem; internal failures say only "internal error" (the traceback
goes to the server log, never to the client).
"""

from __future__ import annotations

from typing import Any

from mmstack.errors import ImageError, MmstackError, ServeError


class APIError(ServeError):
    """A request failure with an HTTP status and OpenAI error fields."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class QueueFullError(APIError):
    """The model's queue is full: 429 with ``Retry-After``."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class DeadlineExceededError(APIError):
    """The request did not finish before its deadline: 504."""

    status, type, code = 504, "timeout_error", "deadline_exceeded"


class ClientDisconnectedError(APIError):
    """The client went away; nobody reads this response (499, nginx's convention)."""

    status, type, code = 499, "client_closed_request", "client_disconnected"


def not_found(what: str, name: str, known: list[str]) -> APIError:
    listed = ", ".join(sorted(known)) or "none"
    return APIError(
        f"{what} {name!r} does not exist; served {what}s: {listed}",
        status=404,
        code=f"{what}_not_found",
        param=what,
    )


def as_api_error(err: BaseException) -> APIError:
    """The API error for any exception: user-input errors keep their message, anything else is a 500."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, ImageError):
        return APIError(str(err), code="invalid_image")
    if isinstance(err, MmstackError):  # the request's content (config, data, model inputs) was at fault
        return APIError(str(err))
    return APIError("internal error; see the server log", status=500, type="server_error", code="internal_error")
