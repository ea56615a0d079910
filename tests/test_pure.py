"""Pure pieces as tables: SSE framing, the upstream chunk parser, placeholders, settings, the
watchdog's decision."""

from __future__ import annotations

import base64
import math

import orjson
import pytest

from service import sse
from service.chunks import DETAIL_MAX, ChunkParser, MalformedChunk, UpstreamReportedError
from service.config import DEMO_MODEL, SettingsError, from_env
from service.errors import Outcome
from service.prompts import extract_placeholders, generate_messages
from service.relay import Clocks, Step, next_step
from tests.fake_upstream import chunk

SID = "AAAAAAAAAAAAAAAAAAAAAA"  # the form of a stream id: 22 URL-safe characters
FULL = sse.Framing.full(SID)


@pytest.mark.parametrize(
    ("seq", "payload", "full", "data_only"),
    [
        (
            1,
            {"type": "start", "requestId": "r1"},
            b'id: AAAAAAAAAAAAAAAAAAAAAA:1\ndata: {"type":"start","requestId":"r1"}\n\n',
            b'data: {"type":"start","requestId":"r1"}\n\n',
        ),
        (
            7,
            {"a": "\n\ndata: x"},
            b'id: AAAAAAAAAAAAAAAAAAAAAA:7\ndata: {"a":"\\n\\ndata: x"}\n\n',
            b'data: {"a":"\\n\\ndata: x"}\n\n',
        ),
        (
            2,
            {"a": "\r\n\u2028\u2029\u0085é\u2027\u0084"},
            'id: AAAAAAAAAAAAAAAAAAAAAA:2\ndata: {"a":"\\r\\n\\u2028\\u2029\\u0085é\u2027\u0084"}'
            "\n\n".encode(),
            'data: {"a":"\\r\\n\\u2028\\u2029\\u0085é\u2027\u0084"}\n\n'.encode(),
        ),
        (
            12345,
            {"n": None, "l": [1, 2]},
            b'id: AAAAAAAAAAAAAAAAAAAAAA:12345\ndata: {"n":null,"l":[1,2]}\n\n',
            b'data: {"n":null,"l":[1,2]}\n\n',
        ),
    ],
)
def test_event_frames_in_both_shapes(
    seq: int, payload: dict[str, object], full: bytes, data_only: bytes
) -> None:
    assert FULL.event(seq, payload) == full
    assert sse.DATA_ONLY.event(seq, payload) == data_only


@pytest.mark.parametrize("framing", [FULL, sse.DATA_ONLY], ids=["full", "data-only"])
def test_text_event_is_one_line_of_json_whatever_the_text(framing: sse.Framing) -> None:
    text = 'evil\n\ndata: {"type":"done"}\r\n\r\nid: 99\n\u2028\u2029\u0085 end'
    # as the pump builds it: the pre-encoded head, the text, the tail
    frame = framing.frame(5, b'{"type":"content","delta":%b,"tokenCount":3}' % sse.dumps(text))
    lines = frame.decode().splitlines()  # splits on U+2028, U+2029 and U+0085 too
    assert lines[:-2] == ([f"id: {SID}:5"] if framing is FULL else [])
    assert lines[-1] == ""
    assert orjson.loads(lines[-2].removeprefix("data: ")) == {
        "type": "content",
        "delta": text,
        "tokenCount": 3,
    }
    assert frame == framing.event(5, {"type": "content", "delta": text, "tokenCount": 3})


def test_heartbeats_suit_each_shape() -> None:
    assert FULL.ping == b": ping\n"  # a blank line after it would be an empty message
    assert sse.DATA_ONLY.ping == b": ping\n\n"  # a block of its own for blank-line readers


@pytest.mark.parametrize(
    ("accept", "full"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("application/json", False),
        ("text/event-stream", True),
        ("Text/Event-Stream", True),
        ("application/json, text/event-stream;q=0.5", True),
        (" text/event-stream ; charset=utf-8", True),
        ("text/event-stream;q=0", False),
        ("text/event-stream; q=0.000", False),
        ("text/event-streams", False),
    ],
)
def test_accept_chooses_the_shape(accept: str | None, full: bool) -> None:
    assert sse.wants_full(accept) is full
    framing = sse.Framing.for_accept(accept, SID)
    assert framing == (FULL if full else sse.DATA_ONLY)


def test_stream_ids_are_128_random_url_safe_bits_and_cursors_name_them() -> None:
    ids = {sse.new_stream_id() for _ in range(1000)}
    assert len(ids) == 1000
    for value in ids:
        assert sse.valid_stream_id(value), value
        assert len(value) == 22
        assert len(base64.urlsafe_b64decode(value + "==")) == 16
        assert sse.parse_cursor(f"{value}:17") == (value, 17)
    for bad in ("", "x", SID + "A", SID[:-1] + "!", SID[:-1] + ":"):
        assert not sse.valid_stream_id(bad)
    for cursor in ("", "17", SID, SID + ":", SID + ":x", SID + ":-1", SID + ":\u0661", "a:1"):
        assert sse.parse_cursor(cursor) is None, cursor


def _stream(*texts: str) -> bytes:
    body = b"".join(chunk({"content": t}) for t in texts)
    return (
        body
        + chunk({}, finish="stop")
        + chunk({}, usage={"completion_tokens": 3})
        + b"data: [DONE]\n\n"
    )


def test_parser_joins_deltas_of_one_read_and_keeps_usage() -> None:
    parser = ChunkParser()
    assert parser.feed(_stream("a", "b", "c")) == ("abc", 3)
    assert parser.usage == {"completion_tokens": 3}
    assert parser.finish_reason == "stop"
    assert parser.done
    assert parser.model == "test-model"


def test_parser_gives_the_same_text_split_at_every_byte() -> None:
    wire = _stream("Hé", "llo\n\n", " wörld", "data: [DONE]")
    for cut in range(len(wire) + 1):
        parser = ChunkParser()
        first, second = parser.feed(wire[:cut]), parser.feed(wire[cut:])
        assert first[0] + second[0] == "Héllo\n\n wörlddata: [DONE]", cut
        assert first[1] + second[1] == 4
        assert parser.done


def test_parser_accepts_crlf_and_comments_and_other_fields() -> None:
    wire = (
        b": keepalive\r\n\r\nevent: x\r\ndata: "
        + orjson.dumps({"choices": [{"delta": {"content": "ok"}}]})
        + b"\r\n\r\n"
    )
    assert ChunkParser().feed(wire) == ("ok", 1)


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"data: {not json\n\n", MalformedChunk),
        (b"data: [1,2]\n\n", MalformedChunk),
        (b'data: {"choices":[{"delta":{"content":5}}]}\n\n', MalformedChunk),
        (b'data: {"choices":"x"}\n\n', MalformedChunk),
        (
            b'data: {"error":{"type":"server_error","message":"sk-secret"}}\n\n',
            UpstreamReportedError,
        ),
    ],
)
def test_parser_rejects_what_is_not_a_chunk(wire: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        ChunkParser().feed(wire)
    assert "sk-secret" not in str(caught.value)


def _literal(content: bytes, finish: bytes = b"null", model: bytes = b'"m"') -> bytes:
    """A chunk whose delta content is the JSON string literal `content`, written as it is
    (orjson cannot write lone surrogate escapes)."""
    return (
        b'data: {"model":%b,"choices":[{"index":0,"delta":{"content":%b},"finish_reason":%b}]}\n\n'
        % (model, content, finish)
    )


SMILE = "\U0001f600"  # U+1F600, UTF-16 \ud83d\ude00


@pytest.mark.parametrize(
    ("chunks", "text"),
    [
        ([b'"a\\ud83d"', b'"\\ude00b"'], "a" + SMILE + "b"),
        ([b'"\\ud83d"', b'"\\ude00"'], SMILE),
        ([b'"\\ud83d\\ude00"'], SMILE),  # a whole pair in one string is plain JSON
        ([b'"\\ud83d"', b'"x"'], "\ufffdx"),  # a high half with no low half after it
        ([b'"x\\ude00"'], "x\ufffd"),  # a low half with no high half before it
        ([b'"\\ude00\\ud83d"', b'"\\ude00"'], "\ufffd" + SMILE),
        ([b'"\\ud83d"', b'"\\ud83d"', b'"\\ude00"'], "\ufffd" + SMILE),
        ([b'"\\ud83d"'], "\ufffd"),  # the answer ended on a high half
        ([b'"\\u2028 \\u00e9"', '"\u00e9\\n"'.encode()], "\u2028 \u00e9\u00e9\n"),
    ],
)
def test_surrogate_halves_split_across_chunks_are_joined(chunks: list[bytes], text: str) -> None:
    wire = b"".join(_literal(c) for c in chunks) + _literal(b'""', b'"stop"') + b"data: [DONE]\n\n"
    for cut in range(len(wire) + 1):  # in one read, in two, split anywhere
        parser = ChunkParser()
        first, second = parser.feed(wire[:cut]), parser.feed(wire[cut:])
        assert first[0] + second[0] == text, cut
        assert first[1] + second[1] == len(chunks), cut
        assert bool(first[0]) == bool(first[1]), cut  # no empty content event
        assert bool(second[0]) == bool(second[1]), cut
        assert parser.finish_reason == "stop"
        assert parser.failure is None
    orjson.dumps(text)  # every piece can be written to a client


def test_a_held_half_is_counted_with_its_pair() -> None:
    parser = ChunkParser()
    assert parser.feed(_literal(b'"\\ud83d"')) == ("", 0)
    assert parser.feed(_literal(b'"\\ude00"')) == (SMILE, 2)


def test_lone_halves_and_bad_bytes_elsewhere_in_a_chunk_are_replaced() -> None:
    parser = ChunkParser()
    wire = _literal(b'"ok\xff"', b'"stop\\ud800"', model=b'"m\\udfff"') + b"data: [DONE]\n\n"
    assert parser.feed(wire) == ("ok\ufffd", 1)
    assert parser.model == "m\ufffd"
    assert parser.finish_reason == "other"  # not a word: never the upstream's text
    assert parser.done


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        (b'"stop"', "stop"),
        (b'"length"', "length"),
        (b'"content_filter"', "content_filter"),
        (b'"tool_calls"', "tool_calls"),
        (b'"a secret in a sentence"', "other"),
        (b'"' + b"x" * 33 + b'"', "other"),
        (b"5", "other"),
    ],
)
def test_finish_reasons_are_the_upstream_s_words(finish: bytes, reason: str) -> None:
    parser = ChunkParser()
    parser.feed(_literal(b'"a"') + _literal(b"null", finish))
    assert (parser.finish_reason, parser.reason) == (reason, reason)
    assert parser.finished


def test_a_refusal_is_relayed_as_text_and_ends_as_refusal() -> None:
    parser = ChunkParser()
    wire = (
        chunk({"role": "assistant", "content": None, "refusal": ""})
        + chunk({"refusal": "I can't"})
        + chunk({"refusal": " help with that."})
        + chunk({}, finish="stop")
        + b"data: [DONE]\n\n"
    )
    assert parser.feed(wire) == ("I can't help with that.", 2)
    assert parser.finish_reason == "stop"
    assert parser.reason == "refusal"


def test_a_malformed_chunk_keeps_the_text_before_it_in_the_same_read() -> None:
    parser = ChunkParser()
    wire = chunk({"content": "kept"}) + chunk({"content": " too"}) + b"data: {broken\n\n"
    assert parser.feed(wire + chunk({"content": "after"})) == ("kept too", 2)
    assert isinstance(parser.failure, MalformedChunk)
    reported = ChunkParser()
    wire = chunk({"content": "kept"}) + b'data: {"error":{"message":"sk-secret"}}\n\n'
    assert reported.feed(wire) == ("kept", 1)
    assert isinstance(reported.failure, UpstreamReportedError)
    assert "sk-secret" not in str(reported.failure)
    assert reported.failure.detail == "sk-secret"


def test_the_upstream_s_error_text_is_capped_for_the_log() -> None:
    long = "sk-secret " + "x" * 1000
    with pytest.raises(UpstreamReportedError) as caught:
        ChunkParser().feed(b'data: {"error":{"type":"t","message":"%b"}}\n\n' % long.encode())
    assert "sk-secret" not in str(caught.value)
    assert len(caught.value.detail) == DETAIL_MAX
    assert caught.value.detail.startswith("t sk-secret xxx")


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("no images", []),
        (
            "a [[image:1]] b [[image: a cat]]\n[[image:1]]",
            ["[[image:1]]", "[[image: a cat]]", "[[image:1]]"],
        ),
        ("[[image:]] [[image:x\ny]] [image:1]", []),
        ("[[image:" + "x" * 201 + "]]", []),
    ],
)
def test_placeholders(text: str, found: list[str]) -> None:
    assert extract_placeholders(text) == found


def test_images_become_image_parts_after_the_prompt() -> None:
    messages = generate_messages("Write", ["https://a/1.png"], ["data:image/png;base64,AA=="])
    assert messages[0]["role"] == "system"
    assert "[[image:N]]" in messages[0]["content"]
    parts = messages[1]["content"]
    assert parts[0]["type"] == "text"
    assert parts[0]["text"].startswith("Write\n\n")
    assert [p["image_url"]["url"] for p in parts[1:]] == [
        "https://a/1.png",
        "data:image/png;base64,AA==",
    ]
    assert generate_messages("Plain", [], [])[1] == {"role": "user", "content": "Plain"}


def test_settings_defaults_use_the_demo_upstream() -> None:
    settings = from_env({})
    assert settings.uses_demo_upstream
    assert settings.openai_model == DEMO_MODEL
    assert (settings.port, settings.admin_port, settings.heartbeat_interval_s) == (3301, 3300, 15.0)
    assert "sk-" not in repr(from_env({"OPENAI_API_KEY": "sk-hidden"}))


def test_settings_name_every_bad_variable_at_once() -> None:
    env = {
        "PORT": "http",
        "HEARTBEAT_INTERVAL_S": "-1",
        "IDLE_TIMEOUT_S": "nan",
        "MAX_STREAMS": "-5",
        "LOG_FORMAT": "xml",
        "OPENAI_BASE_URL": "ftp://x",
        "AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com",
        "UPSTREAM_MAX_RETRIES": "99",
    }
    with pytest.raises(SettingsError) as caught:
        from_env(env)
    assert set(caught.value.problems) == {
        "PORT",
        "HEARTBEAT_INTERVAL_S",
        "IDLE_TIMEOUT_S",
        "MAX_STREAMS",
        "LOG_FORMAT",
        "OPENAI_BASE_URL",
        "AZURE_OPENAI_API_KEY",
        "UPSTREAM_MAX_RETRIES",
    }
    for name in caught.value.problems:
        assert name in str(caught.value)


@pytest.mark.parametrize(
    "name", ["OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "ADMIN_API_BASE", "CORS_ORIGINS"]
)
@pytest.mark.parametrize(
    "url",
    [
        "http://user:Secret-Canary@127.0.0.1:9/v1",
        "https://Secret-Canary@example.com",
        "https://:Secret-Canary@example.com/v1",
        "http://example.com:Secret-Canary/v1",
    ],
)
def test_url_settings_refuse_credentials_without_repeating_them(name: str, url: str) -> None:
    env = {name: url, "AZURE_OPENAI_API_KEY": "k"}
    with pytest.raises(SettingsError) as caught:
        from_env(env)
    assert set(caught.value.problems) == {name}
    assert "Secret-Canary" not in str(caught.value)


def test_settings_parse_the_contract_names() -> None:
    settings = from_env(
        {
            "HOST": "0.0.0.0",
            "PORT": "8080",
            "OPENAI_API_KEY": "k",
            "OPENAI_MODEL": "m",
            "IDLE_TIMEOUT_S": "0",
            "MAX_STREAM_S": "30.5",
            "SHUTDOWN_DRAIN_S": "3",
            "ALLOWED_MODELS": "a, b,",
            "LOG_FORMAT": "console",
            "BODY_TIMEOUT_S": "2.5",
            "HEADER_TIMEOUT_S": "0",
        }
    )
    assert (settings.body_timeout_s, settings.header_timeout_s) == (2.5, 0)
    assert (settings.host, settings.port, settings.openai_model) == ("0.0.0.0", 8080, "m")
    assert (settings.idle_timeout_s, settings.max_stream_s, settings.shutdown_drain_s) == (
        0,
        30.5,
        3,
    )
    assert settings.model_allowlist == {"a", "b", "m"}
    assert not settings.uses_demo_upstream


# --- the watchdog's decision ----------------------------------------------------------------

ON = Clocks(first_token_s=10.0, idle_s=5.0, total_s=60.0)
OFF = Clocks(first_token_s=0.0, idle_s=0.0, total_s=0.0)


@pytest.mark.parametrize(
    ("clocks", "now", "last_token", "step"),
    [
        # before the first token: the first-token deadline, or sooner the idle span from now
        (ON, 100.0, None, Step(None, 105.0)),
        (ON._replace(idle_s=0.0), 100.0, None, Step(None, 110.0)),
        (ON, 109.99, None, Step(None, 110.0)),
        (ON, 110.0, None, Step(Outcome.FIRST_TOKEN_TIMEOUT, 110.0)),
        # after it: the idle deadline counts from the last token
        (ON, 120.0, 118.0, Step(None, 123.0)),
        (ON, 123.0, 118.0, Step(Outcome.IDLE_TIMEOUT, 123.0)),
        (ON._replace(idle_s=0.0), 150.0, 118.0, Step(None, 160.0)),
        # the total clock wins whenever it has run out, and bounds every wake
        (ON, 158.0, 157.0, Step(None, 160.0)),
        (ON, 160.0, 159.0, Step(Outcome.TOTAL_TIMEOUT, 160.0)),
        (ON, 170.0, None, Step(Outcome.TOTAL_TIMEOUT, 170.0)),
        # every clock off: nothing to wake for
        (OFF, 100.0, None, Step(None, math.inf)),
        (OFF, 1e9, 5.0, Step(None, math.inf)),
    ],
)
def test_the_watchdog_s_next_step(
    clocks: Clocks, now: float, last_token: float | None, step: Step
) -> None:
    assert next_step(clocks, now, 100.0, last_token) == step  # the request arrived at 100
