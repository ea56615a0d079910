"""Parse an OpenAI-compatible chat-completion event stream once, straight from the bytes.

The SDK's own stream builds a pydantic model per chunk, which costs more CPU than everything else
the relay does per token; this parser reads the raw body the SDK hands back (auth, retries and
Azure stay the SDK's) and keeps only what the relay needs: the text deltas, the usage, the model,
the finish reason. Deltas that arrive in one network read come back joined, with their count, so
the relay writes one event for them (the README's `tokenCount` note).
"""

from __future__ import annotations

from typing import Any

import orjson


class MalformedChunk(ValueError):
    """The upstream sent something that is not an OpenAI chat-completion chunk."""


class UpstreamReportedError(ValueError):
    """The upstream sent an `{"error": ...}` object inside its stream."""


class ChunkParser:
    __slots__ = ("_data", "_tail", "done", "finish_reason", "model", "usage")

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []
        self.done = False
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.usage: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """The upstream said it was done (`[DONE]` or a finish reason)."""
        return self.done or self.finish_reason is not None

    def feed(self, data: bytes) -> tuple[str, int]:
        """Consume bytes; return the text of the complete events in them and how many deltas."""
        if self._tail:
            data = self._tail + data
        lines = data.split(b"\n")
        self._tail = lines.pop()
        pieces: list[str] = []
        for line in lines:
            if line.startswith(b"data:"):
                self._data.append(line[5:].strip())
            elif (not line or line == b"\r") and self._data:
                payload = b"\n".join(self._data)
                self._data.clear()
                text = self._dispatch(payload)
                if text:
                    pieces.append(text)
            # other fields (event:, id:, retry:) and comments carry nothing for a chat completion
        if not pieces:
            return "", 0
        if len(pieces) == 1:
            return pieces[0], 1
        return "".join(pieces), len(pieces)

    def _dispatch(self, payload: bytes) -> str | None:
        if payload == b"[DONE]":
            self.done = True
            return None
        try:
            obj = orjson.loads(payload)
            if obj.get("error"):
                raise UpstreamReportedError(_error_text(obj["error"]))
            if self.model is None:
                self.model = obj.get("model")
            usage = obj.get("usage")
            if usage:
                self.usage = usage
            choices = obj.get("choices")
            if not choices:
                return None
            choice = choices[0]
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            delta = choice.get("delta")
            content = delta.get("content") if delta else None
        except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError, IndexError) as err:
            raise MalformedChunk(f"malformed chunk: {payload[:80]!r}") from err
        if content is not None and not isinstance(content, str):
            raise MalformedChunk("delta content is not a string")
        return content


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("type") or error.get("code") or "error")
    return "error"
