"""Environment variables as typed values: a parser takes the raw text of one variable (never
empty) and returns its value, or raises `Invalid` in words for an operator; `Reader` reads many,
noting every problem instead of stopping at the first. `config` reads the settings with them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar
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


class Reader:
    """Reads variables through their parsers, noting every problem instead of stopping at the
    first; a variable that is unset, empty or bad reads as its default."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.problems: dict[str, str] = {}

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
