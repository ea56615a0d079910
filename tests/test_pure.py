"""Pure pieces as tables: SSE framing, the upstream chunk parser, placeholders, settings."""

from __future__ import annotations

import orjson
import pytest

from service import sse
from service.chunks import ChunkParser, MalformedChunk, UpstreamReportedError
from service.config import DEMO_MODEL, SettingsError, from_env
from service.prompts import extract_placeholders, generate_messages
from tests.fake_upstream import chunk


@pytest.mark.parametrize(
    ("seq", "payload", "wire"),
    [
        (
            1,
            {"type": "start", "requestId": "r1"},
            b'id: 1\ndata: {"type":"start","requestId":"r1"}\n\n',
        ),
        (7, {"a": "\n\ndata: x"}, b'id: 7\ndata: {"a":"\\n\\ndata: x"}\n\n'),
        (2, {"a": "\r\n\u2028é"}, 'id: 2\ndata: {"a":"\\r\\n\u2028é"}\n\n'.encode()),
        (3, {"n": None, "l": [1, 2]}, b'id: 3\ndata: {"n":null,"l":[1,2]}\n\n'),
    ],
)
def test_event_frames(seq: int, payload: dict[str, object], wire: bytes) -> None:
    assert sse.event(seq, payload) == wire


def test_text_event_is_one_line_of_json_whatever_the_text() -> None:
    text = 'evil\n\ndata: {"type":"done"}\r\n\r\nid: 99\n'
    frame = sse.text_event(5, b'{"type":"content","delta":', text, b',"tokenCount":3}')
    head, data, end = frame.split(b"\n", 2)
    assert head == b"id: 5"
    assert end == b"\n"
    assert orjson.loads(data.removeprefix(b"data: ")) == {
        "type": "content",
        "delta": text,
        "tokenCount": 3,
    }
    assert sse.PING == b": ping\n\n"


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
