"""Parse an OpenAI-compatible chat-completion event stream once, straight from the bytes.

The SDK's own stream builds a pydantic model per chunk, which costs more CPU than everything else
the relay does per token; this parser reads the raw body the SDK hands back (auth and Azure stay the
SDK's) and keeps only what the relay needs: the text deltas, the usage, the model (the first
non-empty one: Azure's first chunk names none), the finish reason. Deltas that arrive in one network
read come back joined, with their count, so the relay writes one event for them (the README's
`tokenCount` note).

Design notes:
1. orjson reads every chunk first. What it refuses but JSON allows (a lone UTF-16 surrogate
   escape such as `"\\ud83d"`; invalid UTF-8, read as U+FFFD the way a browser would) is read
   again by the stdlib's `json`, so nothing a standard JSON parser reads as text ends a stream.
2. Some servers send an emoji's two UTF-16 halves as escapes in two consecutive chunks. A high
   half that ends a delta is held back (with its delta count) and joined with the low half that
   starts the next one; any half left alone becomes U+FFFD, so the text relayed is always valid.
3. A chunk that fails does not drop the text that arrived before it in the same read: `feed`
   returns that text and keeps the failure in `failure`, for the caller to raise once the text is
   relayed. With no text before it, `feed` raises at once.
4. A `refusal` delta is text for the user: it is relayed as content, and the answer's finish
   reason becomes `refusal`.
5. The upstream's words never reach a client through an exception: `UpstreamReportedError`
   carries the upstream's error object only as `detail`, for a length-capped log field.
6. `ChunkRelay` (the OpenAI-compatible routes) also keeps each chunk's own JSON in `chunks`, to
   be relayed as it came, and counts a chunk that carries only tool-call arguments as a delta.
   What it changes, and why: the `[DONE]` line is the gateway's to write (only after a whole
   answer); a usage-only chunk (`choices: []`) is dropped unless the client asked for usage (the
   gateway always asks, for its accounting); the chunks from the first one that carries a
   `finish_reason` on are held in `tail` until the upstream's stream has ended whole, so a
   stream cut in between never shows a finish reason that claims success; a chunk whose JSON
   spans lines, was read leniently (note 1) or holds a raw U+2028, U+2029 or U+0085 is written
   again as one safe line (`sse.dumps_kept`, the escapes every frame gets). `read_whole` reads
   a non-stream answer the same way, kept as given.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import orjson

from . import sse

DETAIL_MAX: Final = 200  # characters of the upstream's own text kept for the log
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_REASON: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


class MalformedChunk(ValueError):
    """The upstream sent something that is not an OpenAI chat-completion chunk."""


class UpstreamReportedError(ValueError):
    """The upstream sent an `{"error": ...}` object inside its stream. `detail` is the upstream's
    own text (capped), for the log only."""

    def __init__(self, detail: str) -> None:
        super().__init__("The model server reported an error in its stream.")
        self.detail = detail


def capped(text: str) -> str:
    """The upstream's text as a log field: at most DETAIL_MAX characters, always valid."""
    text = _SURROGATE.sub("\ufffd", text)
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "\u2026"


def _read_leniently(payload: bytes) -> Any:
    """Design note 1: what orjson refuses, read by the stdlib (surrogates kept as they are)."""
    try:
        return json.loads(payload.decode("utf-8", "replace"))
    except ValueError as err:
        raise MalformedChunk(f"malformed chunk: {payload[:80]!r}") from err


def _scrub(value: Any) -> Any:
    """Every string in a leniently read value with lone surrogates replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _pairs(text: str) -> str:
    """Surrogate pairs joined into their character; halves left alone become U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


class ChunkParser:
    __slots__ = (
        "_data",
        "_held",
        "_held_deltas",
        "_lenient",
        "_tail",
        "chunks",
        "done",
        "failure",
        "finish_reason",
        "model",
        "refused",
        "usage",
    )

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []
        self._held = ""  # a high surrogate half waiting for its low half (design note 2)
        self._held_deltas = 0
        self._lenient = False  # the last chunk was read by the stdlib (design note 1)
        self.done = False
        self.failure: MalformedChunk | UpstreamReportedError | None = None
        self.finish_reason: str | None = None  # the upstream's own word
        self.model: str | None = None
        self.refused = False
        self.usage: dict[str, Any] | None = None
        self.chunks: list[bytes] | None = None  # the chunks to relay as they came (note 6)

    @property
    def finished(self) -> bool:
        """The upstream said it was done (`[DONE]` or a finish reason)."""
        return self.done or self.finish_reason is not None

    @property
    def reason(self) -> str | None:
        """Why the answer ended, as its `finishReason`: the upstream's word, or `refusal`."""
        return "refusal" if self.refused else self.finish_reason

    def feed(self, data: bytes) -> tuple[str, int]:
        """Consume bytes; return the text of the complete events in them and how many deltas.
        A chunk that fails is raised at once, or kept in `failure` when text came before it in
        this read (design note 3)."""
        if self._tail:
            data = self._tail + data
        lines = data.split(b"\n")
        self._tail = lines.pop()
        pieces: list[str] = []
        count = 0
        for line in lines:
            if line.startswith(b"data:"):
                self._data.append(line[5:].strip())
            elif (not line or line == b"\r") and self._data:
                payload = b"\n".join(self._data)
                self._data.clear()
                try:
                    text = self._dispatch(payload)
                except (MalformedChunk, UpstreamReportedError) as err:
                    if not pieces:
                        raise
                    self.failure = err
                    break
                if text and (self._held or (self._lenient and _SURROGATE.search(text))):
                    released, self._held_deltas = self._held_deltas, 0
                    text = self._join(text)
                    if not text:  # only a high half: held, and counted with what ends it
                        self._held_deltas = released + 1
                        continue
                    count += released
                if text:
                    count += 1
                    pieces.append(text)
            # other fields (event:, id:, retry:) and comments carry nothing for a chat completion
        if self._held and self.finished:
            pieces.append("\ufffd")  # a high half the answer ended on
            count += self._held_deltas
            self._held, self._held_deltas = "", 0
        if not pieces:
            return "", 0
        if len(pieces) == 1:
            return pieces[0], count
        return "".join(pieces), count

    def _join(self, text: str) -> str:
        """Design note 2: the held half before `text`, a high half at its end held back."""
        text = self._held + text
        self._held = ""
        if "\ud800" <= text[-1:] <= "\udbff":
            text, self._held = text[:-1], text[-1]
        return _pairs(text)

    def _dispatch(self, payload: bytes) -> str | None:
        if payload == b"[DONE]":
            self.done = True
            return None
        try:
            obj = orjson.loads(payload)
            lenient = self._lenient = False
        except orjson.JSONDecodeError:
            obj = _read_leniently(payload)
            lenient = self._lenient = True
        try:
            if obj.get("error"):
                raise UpstreamReportedError(capped(_error_text(obj["error"])))
            choices = obj.get("choices")
            choice = choices[0] if choices else None
            delta = choice.get("delta") if choice else None
            content = delta.get("content") if delta else None
            refusal = delta.get("refusal") if delta else None
            if lenient:  # strings other than the text: lone halves replaced (design note 2)
                obj, choice = _scrub(obj), _scrub(choice)
            if not self.model:  # Azure's first chunk names none: the next one does
                model = obj.get("model")
                self.model = model if isinstance(model, str) and model else None
            usage = obj.get("usage")
            if usage:
                self.usage = usage
            if choice and choice.get("finish_reason"):
                self.finish_reason = _reason(choice["finish_reason"])
        except (AttributeError, TypeError, KeyError, IndexError) as err:
            raise MalformedChunk(f"malformed chunk: {payload[:80]!r}") from err
        if content is not None and not isinstance(content, str):
            raise MalformedChunk("delta content is not a string")
        if refusal is not None:
            if not isinstance(refusal, str):
                raise MalformedChunk("delta refusal is not a string")
            self.refused = True  # design note 4
            content = refusal if content is None else content + refusal
        if self.chunks is not None:
            self._relay(payload, obj, choices, delta, content, lenient)
        return content

    def _relay(
        self, payload: bytes, obj: Any, choices: Any, delta: Any, text: str | None, lenient: bool
    ) -> None:
        """Note 6: nothing to relay here (a plain parser keeps no chunks)."""


def _reason(value: object) -> str:
    """A finish reason as the upstream said it, if it is a word; `other` for anything else."""
    if isinstance(value, str) and _REASON.fullmatch(value):
        return value
    return "other"


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        parts = (error.get(k) for k in ("type", "code", "message"))
        return " ".join(str(p) for p in parts if p) or "error"
    return str(error)


_UNSAFE: Final = re.compile(rb"[\r\n]|\xe2\x80[\xa8\xa9]|\xc2\x85")


class ChunkRelay(ChunkParser):
    """A parser that also keeps each chunk's JSON to relay it as it came (design note 6)."""

    __slots__ = ("_tool_deltas", "forward_usage", "tail")

    def __init__(self, *, forward_usage: bool) -> None:
        super().__init__()
        self.chunks = []
        self.tail: list[bytes] = []  # from the first chunk with a finish reason on (note 6)
        self.forward_usage = forward_usage
        self._tool_deltas = 0

    def feed(self, data: bytes) -> tuple[str, int]:
        text, count = super().feed(data)
        if self._tool_deltas:
            count, self._tool_deltas = count + self._tool_deltas, 0
        return text, count

    def _relay(
        self, payload: bytes, obj: Any, choices: Any, delta: Any, text: str | None, lenient: bool
    ) -> None:
        if not text and delta and (delta.get("tool_calls") or delta.get("function_call")):
            self._tool_deltas += 1
        if not choices and obj.get("usage") and not self.forward_usage:
            return
        if lenient or _UNSAFE.search(payload):
            payload = sse.dumps_kept(obj)  # kept in the log: a copy of its own size
        assert self.chunks is not None
        (self.tail if self.finish_reason is not None else self.chunks).append(payload)


def read_whole(body: bytes) -> tuple[str, ChunkParser]:
    """A non-stream answer (`chat.completion`): its text (content and refusal) and a parser
    holding its usage, model and finish reason, with the body itself, kept as given, as its one
    chunk (design note 6)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = _read_leniently(body)
    parser = ChunkParser()
    parser.chunks = [body]
    parser.done = True
    try:
        if not isinstance(obj, dict):
            raise TypeError
        if obj.get("error"):
            raise UpstreamReportedError(capped(_error_text(obj["error"])))
        model, usage = obj.get("model"), obj.get("usage")
        parser.model = model if isinstance(model, str) else None
        parser.usage = usage if isinstance(usage, dict) else None
        choices = obj.get("choices") or []
        choice = choices[0] if choices else {}
        message = choice.get("message") or {}
        content, refusal = message.get("content"), message.get("refusal")
        if choice.get("finish_reason"):
            parser.finish_reason = _reason(choice["finish_reason"])
    except (AttributeError, TypeError, KeyError, IndexError) as err:
        raise MalformedChunk(f"malformed answer: {body[:80]!r}") from err
    text = content if isinstance(content, str) else ""
    if isinstance(refusal, str) and refusal:
        parser.refused = True
        text += refusal
    return text, parser
