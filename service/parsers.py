"""Environment variables as typed values: a parser takes the raw text of one variable (never
empty) and returns its value, or raises `Invalid` in words for an operator; `Reader` reads many,
noting every problem instead of stopping at the first. `config` reads the settings with them."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .limits.access import parse_networks

T = TypeVar("T")
N = TypeVar("N", int, float)
W = TypeVar("W", bound=str)
Parser = Callable[[str], T]


class Invalid(Exception):
    """A parser's refusal of a value, in words for an operator (never repeating a value that could
    be a secret)."""


def integer(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise Invalid("must be a whole number") from None


def number(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise Invalid("must be a number") from None


def count(raw: str) -> int:
    value = integer(raw)
    if value < 0:
        raise Invalid("must be 0 or more")
    return value


def port(raw: str) -> int:
    value = integer(raw)
    if not 0 <= value <= 65535:
        raise Invalid("must be a port number from 0 to 65535")
    return value


def seconds(raw: str) -> float:
    value = number(raw)
    if not 0 <= value < math.inf:  # NaN fails too
        raise Invalid("must be a finite number of seconds, 0 or more (0 turns it off)")
    return value


def rate(raw: str) -> float:
    value = number(raw)
    if not 0 < value < math.inf:
        raise Invalid("must be a positive number")
    return value


def between(parse: Parser[N], low: N, high: N) -> Parser[N]:
    def check(raw: str) -> N:
        value = parse(raw)
        if not low <= value <= high:  # NaN fails too
            raise Invalid(f"must be from {low} to {high}")
        return value

    return check


def one_of(words: tuple[W, ...]) -> Parser[W]:
    def check(raw: str) -> W:
        for word in words:
            if raw == word:
                return word
        *rest, last = words
        raise Invalid(f"must be {', '.join(rest)} or {last}")

    return check


def text(raw: str) -> str:
    if not raw.strip():
        raise Invalid("must not be empty")
    return raw.strip()


def url(raw: str) -> str:
    raw = raw.strip()
    if not raw.startswith(("http://", "https://")):
        raise Invalid("must be an http:// or https:// URL")
    _no_credentials(raw)
    return raw.rstrip("/")


def _no_credentials(url: str) -> None:
    """Refuse `user:password@` in an HTTP URL (the SDK would send it nowhere useful, and the URL
    ends up in logs and errors)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError:
        raise Invalid("must be a valid http:// or https:// URL") from None
    if "@" in parts.netloc:
        raise Invalid("must not contain credentials (user:password@); use the API key setting")
    if not parts.hostname:
        raise Invalid("must name a host")


def api_base(raw: str) -> str:
    raw = raw.strip()
    if raw == "/":
        return ""  # same origin
    if not raw.startswith(("http://", "https://")):
        raise Invalid("must be an http:// or https:// URL, or / for the page's own origin")
    _no_credentials(raw)
    return raw.rstrip("/")


def csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def networks(raw: str) -> tuple[str, ...]:
    values = csv(raw)
    for value in values:  # an address is no secret: the bad one is named
        try:
            parse_networks([value])
        except ValueError:
            raise Invalid(f"{value!r} is not an address or CIDR") from None
    return values


def origins(raw: str) -> tuple[str, ...]:
    values = csv(raw)
    for origin in values:
        if origin == "*":
            continue
        if not origin.startswith(("http://", "https://")):
            raise Invalid("must be origins like https://example.com")
        _no_credentials(origin)
    return tuple(o.rstrip("/") for o in values)


def redis_url(raw: str) -> str:
    raw = raw.strip()
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise Invalid("must be a redis://, rediss:// or unix:// URL")
    return raw


@dataclass(frozen=True, slots=True)
class UpstreamServer:
    """One model server of `UPSTREAMS`: OpenAI-shaped (`base_url`) or Azure-shaped
    (`azure_endpoint` and `api_version`); `models` maps a client's model to the server's model or
    Azure deployment (empty: every model, under the client's name)."""

    name: str
    base_url: str | None = None
    azure_endpoint: str | None = None
    api_version: str | None = None
    api_key: str | None = field(default=None, repr=False)
    models: tuple[tuple[str, str], ...] = ()

    def serves(self, model: str) -> str | None:
        """The server's name for a client's `model`, or None when it does not serve it."""
        if not self.models:
            return model
        return dict(self.models).get(model)


_SERVER_KEYS = frozenset(
    ("name", "base_url", "azure_endpoint", "api_version", "api_key_env", "models")
)


def _server(item: Any, env: Mapping[str, str], seen: set[str]) -> UpstreamServer:
    if not isinstance(item, dict):
        raise Invalid("each server must be a JSON object")
    unknown = sorted(set(item) - _SERVER_KEYS)
    if unknown:
        raise Invalid(f"unknown server field {unknown[0]!r}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise Invalid("each server needs a name (1 to 64 characters)")
    if name in seen:
        raise Invalid(f"server name {name!r} is used twice")
    seen.add(name)
    base, azure, version = item.get("base_url"), item.get("azure_endpoint"), item.get("api_version")
    if (base is None) == (azure is None):
        raise Invalid(f"server {name!r} needs one of base_url or azure_endpoint")
    if azure is not None and not isinstance(version, str):
        raise Invalid(f"server {name!r} needs api_version beside azure_endpoint")
    if base is not None and version is not None:
        raise Invalid(f"server {name!r}: api_version goes with azure_endpoint only")
    key_env = item.get("api_key_env")
    key = None
    if key_env is not None:
        if not isinstance(key_env, str) or not env.get(key_env):
            raise Invalid(f"server {name!r}: api_key_env must name a set environment variable")
        key = env[key_env]
    models = item.get("models", {})
    if not isinstance(models, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in models.items()
    ):
        raise Invalid(f"server {name!r}: models must map model names to model names")
    try:
        return UpstreamServer(
            name=name,
            base_url=url(base) if base is not None else None,
            azure_endpoint=url(azure) if azure is not None else None,
            api_version=version,
            api_key=key,
            models=tuple(models.items()),
        )
    except Invalid as err:
        raise Invalid(f"server {name!r}: {err}") from None


def upstreams(env: Mapping[str, str]) -> Parser[tuple[UpstreamServer, ...]]:
    """`UPSTREAMS`: a JSON list of servers; keys are read from the variables they name."""

    def check(raw: str) -> tuple[UpstreamServer, ...]:
        try:
            items = json.loads(raw)
        except ValueError:
            raise Invalid("must be a JSON list of servers") from None
        if not isinstance(items, list) or not items:
            raise Invalid("must be a non-empty JSON list of servers")
        seen: set[str] = set()
        return tuple(_server(item, env, seen) for item in items)

    return check


class Reader:
    """Reads variables through their parsers, noting every problem instead of stopping at the
    first; a variable that is unset, empty or bad reads as its default."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.problems: dict[str, str] = {}

    @property
    def env(self) -> Mapping[str, str]:
        return self._env

    def given(self, name: str) -> bool:
        return bool(self._env.get(name))

    def __call__(self, name: str, parse: Parser[T], default: T) -> T:
        raw = self._env.get(name)
        if not raw:
            return default
        try:
            return parse(raw)
        except Invalid as err:
            self.problems[name] = str(err)
            return default
