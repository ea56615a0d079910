"""The shared vocabularies: how a stream ended (Outcome) and what went wrong (ErrorCode).

An outcome is one word used alike by the log line, the metrics and the `error` event's `reason`.
An error code is one of the contract's words (the README's "Error codes and statuses"): an
ApiError raised before a stream starts becomes its HTTP status with a JSON body; once a stream
has started, the same code travels in an `error` event instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    COMPLETED = "completed"
    CLIENT_DISCONNECT = "client_disconnect"
    FIRST_TOKEN_TIMEOUT = "first_token_timeout"  # noqa: S105 (an outcome, not a secret)
    IDLE_TIMEOUT = "idle_timeout"
    TOTAL_TIMEOUT = "total_timeout"
    UPSTREAM_ERROR = "upstream_error"
    RATE_LIMITED = "rate_limited"
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    REQUEST_TIMEOUT = "request_timeout"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"
    UPSTREAM_ERROR = "upstream_error"
    OVERLOADED = "overloaded"
    SERVER_SHUTDOWN = "server_shutdown"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


# Error code -> HTTP status when it happens before the stream starts.
STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.SERVER_SHUTDOWN: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.CANCELLED: 499,
}

# The code of an HTTP error the service did not raise itself (aiohttp's router or parser).
_CODE_BY_STATUS: dict[int, ErrorCode] = {
    404: ErrorCode.NOT_FOUND,
    408: ErrorCode.REQUEST_TIMEOUT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


def code_for_status(status: int) -> ErrorCode:
    """The code for an HTTP error status from aiohttp: its own word where the contract has one,
    else `bad_request` for a 4xx and `internal` for a 5xx."""
    fallback = ErrorCode.BAD_REQUEST if status < 500 else ErrorCode.INTERNAL
    return _CODE_BY_STATUS.get(status, fallback)


# What a failed outcome looks like to a client: (code, message for people).
FAILURE_BY_OUTCOME: dict[Outcome, tuple[ErrorCode, str]] = {
    Outcome.FIRST_TOKEN_TIMEOUT: (ErrorCode.TIMEOUT, "The model did not start answering in time."),
    Outcome.IDLE_TIMEOUT: (ErrorCode.TIMEOUT, "The model stopped sending text for too long."),
    Outcome.TOTAL_TIMEOUT: (
        ErrorCode.TIMEOUT,
        "The answer took longer than the time allowed for it.",
    ),
    Outcome.UPSTREAM_ERROR: (ErrorCode.UPSTREAM_ERROR, "The model server failed to answer."),
    Outcome.RATE_LIMITED: (ErrorCode.RATE_LIMITED, "The token budget for this client ran out."),
    Outcome.CANCELLED: (ErrorCode.CANCELLED, "The request was cancelled."),
    Outcome.SHUTDOWN: (ErrorCode.SERVER_SHUTDOWN, "The server is restarting; please retry."),
    Outcome.CLIENT_DISCONNECT: (ErrorCode.CANCELLED, "The client went away."),
}


class ApiError(Exception):
    """An error with a code from the contract's vocabulary and a message safe to show anyone. It
    carries the headers of its answer: `Retry-After` (every 429 and 503 says when to retry) and
    whatever else its kind adds (a 429's quota headers, a 401's challenge)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: int | None = None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.details = dict(details or {})  # more fields of the error object (a 409's streamId)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS_BY_CODE[code]
        if retry_after_s is None and self.status in (429, 503):
            retry_after_s = 1
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(retry_after_s)

    def body(self) -> dict[str, dict[str, Any]]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}
