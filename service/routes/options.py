"""The model options a request may carry, shared by generate and chat: `model`, `maxTokens` and
`temperature`, declared with the same types in each body and checked against this deployment's
settings by one function, so both routes accept and refuse exactly the same values, with the same
messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from pydantic import Field, StrictInt, StrictStr

from ..config import Settings
from ..errors import ApiError, ErrorCode
from ..upstream import CompletionRequest

# A body's fields, camelCase as on the wire; absent is None (the deployment's default).
Model = StrictStr | None
MaxTokens = StrictInt | None
Temperature = Annotated[float, Field(strict=True, ge=0, le=2)] | None


class HasOptions(Protocol):
    """A request body that declares the three fields above."""

    @property
    def model(self) -> str | None: ...

    @property
    def maxTokens(self) -> int | None: ...

    @property
    def temperature(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class Options:
    """A request's checked options, the deployment's defaults filled in."""

    model: str
    max_tokens: int
    temperature: float | None

    def request(self, messages: list[dict[str, Any]]) -> CompletionRequest:
        """The upstream request for `messages` with these options."""
        return CompletionRequest(
            model=self.model,
            messages=messages,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
        )


def options(body: HasOptions, settings: Settings) -> Options:
    """Check a body's options against `settings` (400 with the field named), defaults filled in:
    `DEFAULT_MAX_TOKENS` and `OPENAI_MODEL`; no temperature leaves it to the upstream."""
    max_tokens = body.maxTokens if body.maxTokens is not None else settings.default_max_tokens
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise ApiError(
            ErrorCode.BAD_REQUEST, f"maxTokens: must be from 1 to {settings.max_tokens_limit}"
        )
    model = body.model or settings.openai_model
    if model not in settings.model_allowlist:
        raise ApiError(ErrorCode.BAD_REQUEST, "model: not offered here (see ALLOWED_MODELS)")
    return Options(model=model, max_tokens=max_tokens, temperature=body.temperature)
