"""Python SSE readers, each written as its own documentation shows a user to write it.

Usage: python python_clients.py CLIENT '<job JSON>'; prints what it read as one JSON object:
`status`, `headers`, `data` (each event's raw data), `ids` (each event's id, where the client
gives one), `events` (each data parsed with a plain `json.loads`), `other` (lines a line reader
saw that were not `data: ` lines), `otherAt` (how many events had been read when each of them
came) and `error` (what stopped it, if anything).
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import httpx
import requests
import sseclient
from httpx_sse import aconnect_sse

Out = dict[str, Any]


def httpx_sse(job: dict[str, Any], out: Out) -> None:
    """httpx-sse's `aconnect_sse` (it sends `Accept: text/event-stream`)."""

    async def read() -> None:
        async with (
            httpx.AsyncClient(timeout=job["timeoutMs"] / 1000) as client,
            aconnect_sse(client, "POST", job["url"], json=job["body"]) as source,
        ):
            out["status"] = source.response.status_code
            out["headers"] = dict(source.response.headers)
            async for sse in source.aiter_sse():
                out["data"].append(sse.data)
                out["ids"].append(sse.id)
                out["events"].append(json.loads(sse.data))

    asyncio.run(asyncio.wait_for(read(), job["timeoutMs"] / 1000))


def sseclient_py(job: dict[str, Any], out: Out) -> None:
    """sseclient-py over a streamed `requests` answer, `Accept: text/event-stream` as its README."""
    headers = {"Accept": "text/event-stream"}
    timeout = job["timeoutMs"] / 1000
    with requests.post(
        job["url"], json=job["body"], headers=headers, stream=True, timeout=timeout
    ) as response:
        out["status"] = response.status_code
        out["headers"] = dict(response.headers)
        # as its README: the response itself (it iterates as bytes); the stub asks for an Iterator
        for event in sseclient.SSEClient(response).events():  # type: ignore[arg-type]
            out["data"].append(event.data)
            out["ids"].append(event.id)
            out["events"].append(json.loads(event.data))


def _lines(lines: Any, out: Out) -> None:
    """A curl-like reader: every `data: ` line is one event."""
    for line in lines:
        if line.startswith("data: "):
            out["data"].append(line[6:])
            out["events"].append(json.loads(line[6:]))
        else:
            out["other"].append(line)
            out["otherAt"].append(len(out["events"]))


def httpx_lines(job: dict[str, Any], out: Out) -> None:
    """httpx's `iter_lines`, no `Accept` of its own choosing (httpx sends `*/*`)."""
    with (
        httpx.Client(timeout=job["timeoutMs"] / 1000) as client,
        client.stream("POST", job["url"], json=job["body"]) as response,
    ):
        out["status"] = response.status_code
        out["headers"] = dict(response.headers)
        _lines(response.iter_lines(), out)


def requests_lines(job: dict[str, Any], out: Out) -> None:
    """requests' `iter_lines(decode_unicode=True)`, no `Accept` of its own choosing."""
    timeout = job["timeoutMs"] / 1000
    with requests.post(job["url"], json=job["body"], stream=True, timeout=timeout) as response:
        out["status"] = response.status_code
        out["headers"] = dict(response.headers)
        _lines(response.iter_lines(decode_unicode=True), out)


CLIENTS: dict[str, Callable[[dict[str, Any], Out], None]] = {
    "httpx-sse": httpx_sse,
    "sseclient-py": sseclient_py,
    "httpx-iter-lines": httpx_lines,
    "requests-iter-lines": requests_lines,
}


def main() -> None:
    client, job = CLIENTS[sys.argv[1]], json.loads(sys.argv[2])
    out: Out = {"status": None, "headers": {}, "data": [], "ids": [], "events": [], "error": None}
    out.update(other=[], otherAt=[])
    try:
        client(job, out)
    except Exception:
        out["error"] = traceback.format_exc()
    out["headers"] = {name.lower(): value for name, value in out["headers"].items()}
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()
