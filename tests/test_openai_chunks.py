"""`ChunkRelay` and `read_whole`, pure: what the OpenAI-compatible routes relay of an upstream's
stream, and what they change (`chunks` design note 6)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.chunks import ChunkParser, ChunkRelay, MalformedChunk, read_whole


def data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


@pytest.mark.parametrize("forward", [False, True])
def test_chunks_kept_as_they_came_usage_only_when_asked_tail_held(forward: bool) -> None:
    relay = ChunkRelay(forward_usage=forward)
    role = chunk({"role": "assistant", "content": ""}, system_fingerprint="fp")
    body = data(role) + data(chunk({"content": "Hi"})) + data(chunk({}, "stop")) + data(USAGE)
    text, count = relay.feed(body + b"data: [DONE]\n\n")
    assert (text, count) == ("Hi", 1)
    assert relay.chunks == [orjson.dumps(role), orjson.dumps(chunk({"content": "Hi"}))]
    held = [orjson.dumps(chunk({}, "stop"))] + ([orjson.dumps(USAGE)] if forward else [])
    assert relay.tail == held
    assert relay.usage == USAGE["usage"]
    assert relay.finished


def test_tool_call_argument_chunks_count_as_deltas() -> None:
    relay = ChunkRelay(forward_usage=False)
    call = {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":1}'}}]}
    text, count = relay.feed(data(chunk(call)) + data(chunk(call)))
    assert (text, count) == ("", 2)
    assert len(relay.chunks or []) == 2


def test_unsafe_chunks_are_written_again_as_one_safe_line() -> None:
    relay = ChunkRelay(forward_usage=False)
    split = (
        b'data: {"choices":[{"index":0,\ndata: "delta":{"content":"a"},"finish_reason":null}]}\n\n'
    )
    breaks = data(chunk({"content": "x\u2028y"}))
    relay.feed(split + breaks)
    assert relay.chunks == [
        b'{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}',
        b'{"choices":[{"index":0,"delta":{"content":"x\\u2028y"},"finish_reason":null}]}',
    ]
    assert orjson.loads(relay.chunks[1])["choices"][0]["delta"]["content"] == "x\u2028y"


def test_a_plain_parser_keeps_no_chunks() -> None:
    parser = ChunkParser()
    parser.feed(data(chunk({"content": "a"})))
    assert parser.chunks is None


def test_read_whole_keeps_the_body_and_reads_its_accounting() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"content": "Hi", "refusal": None},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 4, "completion_tokens": 9},
        }
    )
    text, parser = read_whole(body)
    assert text == "Hi"
    assert parser.chunks == [body]
    assert (parser.model, parser.finish_reason, parser.usage) == (
        "m",
        "length",
        {"prompt_tokens": 4, "completion_tokens": 9},
    )
    with pytest.raises(MalformedChunk):
        read_whole(b"[1, 2]")
