"""A scripted server shaped like Azure OpenAI, on a real loopback socket: the same scripts as
`fake_upstream` (queue, steps, `seen`), served the way Azure serves them.

- The deployment is in the path, `/openai/deployments/{deployment}/chat/completions`, and recorded
  in `deployments`; `GET /openai/models` answers readiness.
- Every request must carry the `api-version` query (400 otherwise) and the `api-key` header with
  the server's key (401 otherwise), as Azure answers them.
- A stream's first chunk has empty `choices`, an empty `model`, `id` and `object`, and
  `prompt_filter_results`; every later chunk's choices carry `content_filter_results`, and chunks
  name the model behind the deployment (`answered_model`), not the deployment.
- `Finish("content_filter")` is the finish Azure sends when its filter stops an answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from tests.fake_upstream import FakeUpstream, Step

API_VERSION = "2024-10-21"
AZURE_KEY = "azure-key-0451"
AZURE_MODEL = "gpt-4o-2024-11-20"  # what Azure's chunks name: the model behind the deployment
SAFE = {"filtered": False, "severity": "safe"}
FILTERS = dict.fromkeys(("hate", "self_harm", "sexual", "violence"), SAFE)
PROMPT_FILTER = {
    "choices": [],
    "created": 0,
    "id": "",
    "model": "",
    "object": "",
    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTERS}],
}


class AzureUpstream(FakeUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.answered_model = AZURE_MODEL
        self.deployments: list[str] = []

    @property
    def endpoint(self) -> str:
        """The `azure_endpoint` a client is configured with."""
        return self.url.removesuffix("/v1")

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._azure)
        app.router.add_get("/openai/models", self._azure_models)

    def prelude(self) -> bytes:
        return b"data: " + orjson.dumps(PROMPT_FILTER) + b"\n\n"

    @staticmethod
    def _refusal(request: web.Request) -> web.Response | None:
        if request.query.get("api-version") != API_VERSION:
            body = {"error": {"code": "404", "message": "Resource not found"}}
            return web.json_response(body, status=400)
        if request.headers.get("api-key") != AZURE_KEY:
            body = {"error": {"code": "401", "message": "Access denied due to invalid key."}}
            return web.json_response(body, status=401)
        return None

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        self.deployments.append(request.match_info["deployment"])
        return await self._completions(request)

    async def _azure_models(self, request: web.Request) -> web.Response:
        return self._refusal(request) or await self._models(request)

    @staticmethod
    def _encode(step: Step, model: str) -> bytes:
        data = FakeUpstream._encode(step, model)
        if not data.startswith(b"data: {"):
            return data
        body: dict[str, Any] = orjson.loads(data[6:])
        for choice in body.get("choices", ()):
            choice["content_filter_results"] = FILTERS if choice.get("delta") else {}
        return b"data: " + orjson.dumps(body) + b"\n\n"


@contextlib.asynccontextmanager
async def running_azure() -> AsyncIterator[AzureUpstream]:
    fake = AzureUpstream()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
