"""The HTTP layer of the real process, spoken to with raw sockets: every error it answers, the
parser's own included, has the contract's JSON shape and echoes nothing of the request; the
request head has a deadline; `Server` names no versions; every log line is one JSON object."""

from __future__ import annotations

import gzip
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiohttp.compression_utils import HAS_BROTLI

from tests.process import ROOT, clean_env, free_port

CANARY = b"Canary7x"
HEAD_TIMEOUT_S = 1.0
JSON = b"Content-Type: application/json\r\n"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split(" ")[1]), headers, body, raw)


def exchange(port: int, data: bytes, *, seconds: float = 5.0) -> bytes:
    """Send `data`, then read until the server closes or one whole answer has arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + seconds
        raw = b""
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
            head, sep, body = raw.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
        return raw


class Process:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.log = tmp / "service.log"
        env = clean_env(
            {
                "PORT": str(self.port),
                "CHAT_DB_PATH": str(tmp / "conversations.db"),
                "HEADER_TIMEOUT_S": str(HEAD_TIMEOUT_S),
                "BODY_TIMEOUT_S": "1",
                "DEMO_TOKENS_PER_S": "2000",
            }
        )
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(  # the suite's other helpers are async; these are not
                [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                if parse(exchange(self.port, b"GET /health HTTP/1.0\r\n\r\n")).status == 200:
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(self.log.read_text()[-2000:]) from None
            time.sleep(0.05)  # bounded: waiting for the process to listen

    def log_lines(self) -> list[bytes]:
        return self.log.read_bytes().splitlines()

    def stop(self) -> int:
        self.proc.send_signal(2)
        return self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    process = Process(tmp_path_factory.mktemp("edge"))
    try:
        yield process
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(timeout=10)


def post(path: bytes, headers: bytes, body: bytes) -> bytes:
    length = b"Content-Length: %d\r\n" % len(body)
    return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers + length + b"\r\n" + body


GOOD = b'{"prompt": "hi", "maxTokens": 2}'
CASES: list[tuple[str, bytes, int, str]] = [
    ("bad-request-line", b"GET /health " + CANARY + b"\r\n\r\n", 400, "bad_request"),
    ("bad-method", b"G\x01T /" + CANARY + b" HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("bad-version", b"GET /" + CANARY + b" HTTP/9.9\r\n\r\n", 400, "bad_request"),
    (
        "bad-header-name",
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad " + CANARY + b": y\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "oversized-header",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + CANARY * 2000 + b"\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "too-many-headers",
        b"GET /health HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, CANARY) for i in range(200))
        + b"\r\n",
        400,
        "bad_request",
    ),
    (
        "bad-content-length",
        b"POST /api/ai/generate HTTP/1.1\r\nHost: x\r\nContent-Length: " + CANARY + b"\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "bad-chunked-encoding",
        b"POST /api/ai/generate HTTP/1.1\r\nHost: x\r\n" + JSON + b"Transfer-Encoding: chunked"
        b"\r\n\r\n" + CANARY + b"\r\n{}\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "unknown-expect",
        b"POST /api/ai/generate HTTP/1.1\r\nHost: x\r\n"
        + JSON
        + b"Expect: "
        + CANARY
        + b"\r\nContent-Length: 2\r\n\r\n{}",
        417,
        "bad_request",
    ),
    (
        "unknown-expect-unknown-path",
        b"GET /" + CANARY + b" HTTP/1.1\r\nHost: x\r\nExpect: " + CANARY + b"\r\n\r\n",
        417,
        "bad_request",
    ),
    (
        "not-gzip",
        post(b"/api/ai/generate", JSON + b"Content-Encoding: gzip\r\n", CANARY * 4),
        400,
        "bad_request",
    ),
    (
        "not-deflate",
        post(b"/api/ai/generate", JSON + b"Content-Encoding: deflate\r\n", CANARY * 4),
        400,
        "bad_request",
    ),
    (
        "unfinished-deflate",
        post(b"/api/ai/generate", JSON + b"Content-Encoding: deflate\r\n", b"{}"),
        400,
        "bad_request",
    ),
    (
        "unknown-coding",
        post(b"/api/ai/generate", JSON + b"Content-Encoding: " + CANARY + b"\r\n", GOOD),
        415,
        "unsupported_media_type",
    ),
    (
        "two-codings",
        post(b"/api/ai/generate", JSON + b"Content-Encoding: gzip, gzip\r\n", GOOD),
        415,
        "unsupported_media_type",
    ),
    (
        "unicode-digit-escaped",
        b"GET /api/ai/stream-probe?count=%C2%B2&x=" + CANARY + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "unicode-digit-raw",
        "GET /api/ai/stream-probe?count=٣ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        400,
        "bad_request",
    ),
    ("not-found", b"GET /" + CANARY + b" HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found"),
]
if not HAS_BROTLI:
    CASES.append(
        (
            "br-without-brotli",
            post(b"/api/ai/generate", JSON + b"Content-Encoding: br\r\n", CANARY * 4),
            415,
            "unsupported_media_type",
        )
    )


def assert_json_lines(served: Process) -> None:
    """Every line is one JSON object; none carries a traceback or a byte of the requests."""
    lines = served.log_lines()
    assert lines
    for line in lines:
        record = orjson.loads(line)
        assert isinstance(record, dict), line
        assert "exception" not in record, line
        assert CANARY.lower() not in line.lower()


def assert_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer.raw
    assert answer.headers["content-type"] == "application/json"
    error = orjson.loads(answer.body)
    assert list(error) == ["error"]
    assert list(error["error"]) == ["code", "message"]
    assert error["error"]["code"] == code
    assert error["error"]["message"]
    assert CANARY.lower() not in answer.raw.lower()
    assert answer.headers["server"] == "ai-stream-gateway"


@pytest.mark.parametrize(
    ("data", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_every_error_is_json_and_echoes_nothing(
    served: Process, data: bytes, status: int, code: str
) -> None:
    assert_error(parse(exchange(served.port, data)), status, code)
    assert_json_lines(served)


@pytest.mark.parametrize("body", [b"{}", b"3", CANARY])
def test_a_body_whose_coding_breaks_at_its_end_is_a_400_at_once(
    served: Process, body: bytes
) -> None:
    """The head and the body in two packets: the request is being handled when the body's
    coding turns out broken at its end (a deflate stream that never finishes)."""
    data = post(b"/api/ai/generate", JSON + b"Content-Encoding: deflate\r\n", body)
    head, body = data[: -len(body)], data[-len(body) :]
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head)
        time.sleep(0.05)  # shapes the wire (two packets); nothing waits on it
        started = time.monotonic()
        sock.sendall(body)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        waited = time.monotonic() - started
    assert_error(parse(raw), 400, "bad_request")
    assert waited < 0.5  # not the body deadline's 1 s
    assert_json_lines(served)


def test_a_good_request_still_works_and_names_no_versions(served: Process) -> None:
    answer = parse(exchange(served.port, post(b"/api/ai/generate", JSON, GOOD)))
    assert answer.status == 200
    assert orjson.loads(answer.body)["content"]
    assert answer.headers["server"] == "ai-stream-gateway"
    zipped = post(b"/api/ai/generate", JSON + b"Content-Encoding: gzip\r\n", gzip.compress(GOOD))
    assert parse(exchange(served.port, zipped)).status == 200


def test_a_head_that_does_not_arrive_in_time_is_answered_408(served: Process) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + CANARY)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        waited = time.monotonic() - started
    assert_error(parse(raw), 408, "request_timeout")
    assert HEAD_TIMEOUT_S - 0.1 <= waited <= HEAD_TIMEOUT_S + 1
    assert_json_lines(served)


def test_an_idle_new_connection_is_closed_at_the_head_deadline(served: Process) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        started = time.monotonic()
        assert sock.recv(65536) == b""
        assert time.monotonic() - started <= HEAD_TIMEOUT_S + 1


def test_a_keep_alive_connection_may_idle_past_the_head_deadline(served: Process) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(request)
        assert parse(sock.recv(65536)).status == 200
        sock.settimeout(HEAD_TIMEOUT_S * 2)  # idle for twice the head deadline: still open
        with pytest.raises(TimeoutError):
            sock.recv(65536)
        sock.sendall(request)
        assert parse(sock.recv(65536)).status == 200


def test_a_body_that_does_not_arrive_in_time_is_answered_408_and_the_connection_closed(
    served: Process,
) -> None:
    head = post(b"/api/ai/generate", JSON, b"")[: -len(b"Content-Length: 0\r\n\r\n")]
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(head + b"Content-Length: 100\r\n\r\n{" + CANARY)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        waited = time.monotonic() - started
    answer = parse(raw)
    assert_error(answer, 408, "request_timeout")
    assert answer.headers["connection"] == "close"
    assert 0.9 <= waited <= 2.0
    assert_json_lines(served)


def test_sigint_still_drains_and_every_log_line_is_json(served: Process) -> None:
    assert served.stop() == 0
    assert_json_lines(served)
