"""The admin app itself: what it serves, with which types and headers, and what the page is told."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

from service.admin import STATIC, create_admin_app
from service.config import Settings, SettingsError, from_env

MODULES = ("app.js", "generate.js", "chat.js", "aiStream.js", "markdown.js", "ops.js")
VENDORED = "vendor/markdown-it.min.mjs"  # markdown-it's browser ES module build, as published


async def test_index_loads_its_module_and_styles_from_this_origin(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_admin_app(Settings()))
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert '<script type="module" src="static/app.js"></script>' in html
    assert '<link rel="stylesheet" href="static/admin.css">' in html
    assert "http" not in html.replace("https://example.com/photo.jpg", "")  # nothing from elsewhere
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "'unsafe-inline'" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("name", [*MODULES, VENDORED, "admin.css"])
async def test_static_files_are_served_with_types_a_browser_accepts(
    aiohttp_client: Any, name: str
) -> None:
    client = await aiohttp_client(create_admin_app(Settings()))
    resp = await client.get(f"/static/{name}")
    assert resp.status == 200
    scripts = ("text/javascript", "application/javascript")
    assert resp.content_type in (("text/css",) if name.endswith(".css") else scripts)
    assert await resp.read() == (STATIC / name).read_bytes()
    assert resp.headers["Cache-Control"] == "no-cache"


async def test_model_text_can_make_the_page_load_no_image_from_elsewhere(
    aiohttp_client: Any,
) -> None:
    client = await aiohttp_client(create_admin_app(Settings()))
    resp = await client.get("/")
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in resp.headers["Content-Security-Policy"].split(";")
    )
    assert policy["img-src"] == "'self'"
    assert policy["default-src"] == "'self'"
    assert policy["style-src"] == "'self'"


def test_markdown_it_is_vendored_with_its_licences() -> None:
    """The version the README names, and the licences of markdown-it and what its build bundles."""
    first = (STATIC / VENDORED).read_text().splitlines()[0]
    assert (
        first == "/*! markdown-it 15.0.3 https://github.com/markdown-it/markdown-it @license MIT */"
    )
    digest = hashlib.sha256((STATIC / VENDORED).read_bytes()).hexdigest()
    assert digest == "d5432491790141da046b1197353705db03264f40b5727f3b4b591f5aba193e30"
    licence = (STATIC / "vendor" / "markdown-it.LICENSE").read_text()
    assert licence.startswith("markdown-it 15.0.3 ")
    bundled = re.findall(r"^Bundled in the build above: (\S+)$", licence, re.MULTILINE)
    assert [name.rsplit("-", 1)[0] for name in bundled] == [
        "entities",
        "linkify-it",
        "mdurl",
        "punycode.js",
        "uc.micro",
    ]


async def test_static_does_not_leave_its_folder(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_admin_app(Settings()))
    for path in ("/static/../__init__.py", "/static/%2e%2e/__init__.py", "/static/nope.js"):
        resp = await client.get(path)
        assert resp.status in (403, 404), path


def test_modules_import_only_each_other() -> None:
    """No CDN and no build step: every import is a relative path to a file that exists."""
    for name in MODULES:
        for line in (STATIC / name).read_text().splitlines():
            if line.startswith("import ") and " from " in line:
                target = line.rsplit(" from ", 1)[1].strip(' ";')
                assert target.startswith("./"), line
                assert (STATIC / target[2:]).is_file(), line


async def test_config_tells_the_page_where_the_api_is_and_its_limits(
    aiohttp_client: Any,
) -> None:
    settings = Settings(
        port=4401,
        admin_port=4400,
        openai_model="m1",
        allowed_models=("m2",),
        api_keys=("sk-secret-1",),
        default_max_tokens=500,
        max_tokens_limit=900,
    )
    client = await aiohttp_client(create_admin_app(settings))
    resp = await client.get("/config.json")
    assert resp.status == 200
    body = await resp.json()
    assert body == {
        "apiBase": None,
        "apiPort": 4401,
        "adminPort": 4400,
        "model": "m1",
        "models": ["m1", "m2"],
        "defaultMaxTokens": 500,
        "maxTokensLimit": 900,
        "authRequired": True,
    }
    assert "sk-secret-1" not in await resp.text()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("/", ""), ("https://api.example.com/", "https://api.example.com"), (None, None)],
)
def test_admin_api_base_setting(raw: str | None, expected: str | None) -> None:
    env = {} if raw is None else {"ADMIN_API_BASE": raw}
    assert from_env(env).admin_api_base == expected


def test_admin_api_base_rejects_what_is_not_a_base() -> None:
    with pytest.raises(SettingsError) as err:
        from_env({"ADMIN_API_BASE": "api.example.com"})
    assert set(err.value.problems) == {"ADMIN_API_BASE"}


async def test_every_answer_carries_the_whole_policy(aiohttp_client: Any) -> None:
    """Each directive pinned (nothing inline, no eval, no frames, no forms, no <base>), on the
    page, static files, the ops JSON, its 401 and the app's own 404 alike."""
    settings = Settings(api_keys=("sk-policy",), admin_metrics_urls=("http://127.0.0.1:9",))
    client = await aiohttp_client(create_admin_app(settings))
    for path, status in [
        ("/", 200),
        ("/static/markdown.js", 200),
        ("/admin/api/ops", 401),
        ("/nowhere", 404),
    ]:
        resp = await client.get(path)
        assert resp.status == status, path
        policy = dict(
            directive.strip().split(" ", 1)
            for directive in resp.headers["Content-Security-Policy"].split(";")
        )
        assert policy == {
            "default-src": "'self'",
            "script-src": "'self'",
            "style-src": "'self'",
            "img-src": "'self'",
            "connect-src": "'self' http: https:",
            "object-src": "'none'",
            "base-uri": "'none'",
            "form-action": "'none'",
            "frame-ancestors": "'none'",
        }, path
        assert resp.headers["X-Content-Type-Options"] == "nosniff", path
        assert resp.headers["Referrer-Policy"] == "no-referrer", path
