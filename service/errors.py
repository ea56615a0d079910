"""The shared vocabularies: how a stream ended (Outcome) and what went wrong (ApiError codes).

An outcome is one word used alike by the log line, the metrics and the `error` event's `reason`.
An ApiError raised before a stream starts becomes an HTTP status with a JSON body; once a stream
has started, the same code travels in an `error` event instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


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


# Error code -> HTTP status when it happens before the stream starts.
STATUS_BY_CODE: dict[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "request_timeout": 408,
    "rate_limited": 429,
    "internal": 500,
    "upstream_error": 502,
    "overloaded": 503,
    "server_shutdown": 503,
    "timeout": 504,
    "cancelled": 499,
}

# What a failed outcome looks like to a client: (code, message for people).
FAILURE_BY_OUTCOME: dict[Outcome, tuple[str, str]] = {
    Outcome.FIRST_TOKEN_TIMEOUT: ("timeout", "The model did not start answering in time."),
    Outcome.IDLE_TIMEOUT: ("timeout", "The model stopped sending text for too long."),
    Outcome.TOTAL_TIMEOUT: ("timeout", "The answer took longer than the time allowed for it."),
    Outcome.UPSTREAM_ERROR: ("upstream_error", "The model server failed to answer."),
    Outcome.RATE_LIMITED: ("rate_limited", "The token budget for this client ran out."),
    Outcome.CANCELLED: ("cancelled", "The request was cancelled."),
    Outcome.SHUTDOWN: ("server_shutdown", "The server is restarting; please retry."),
    Outcome.CLIENT_DISCONNECT: ("cancelled", "The client went away."),
}


class ApiError(Exception):
    """An error with a code from the contract's vocabulary and a message safe to show anyone. It
    carries the headers of its answer: `Retry-After` (every 429 and 503 says when to retry) and
    whatever else its kind adds (a 429's quota headers, a 401's challenge)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS_BY_CODE[code]
        if retry_after_s is None and self.status in (429, 503):
            retry_after_s = 1
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(retry_after_s)

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}
