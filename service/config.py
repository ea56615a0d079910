"""Settings: one frozen value read once from the environment.

`from_env(mapping)` parses every variable it knows, collects every problem, and raises one
`SettingsError` naming all bad variables, so an operator fixes a deploy in one pass. Tests build
`Settings(...)` directly and never touch `os.environ`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from .access import parse_networks

LogFormat = Literal["json", "console"]
DEFAULT_MODEL = "gpt-4o-mini"
DEMO_MODEL = "demo-writer-1"
CHAT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 3301
    admin_port: int = 3300
    # Where the admin page sends API calls: None = the API's port on the page's own host when the
    # page is opened on ADMIN_PORT, else the page's origin (a proxy in front); "" = the page's
    # origin always; a URL = that API.
    admin_api_base: str | None = None
    listen_backlog: int = 4096

    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    openai_model: str = DEFAULT_MODEL
    azure_endpoint: str | None = None
    azure_api_key: str | None = field(default=None, repr=False)
    openai_api_version: str = "2024-10-21"
    allowed_models: tuple[str, ...] = ()
    upstream_max_retries: int = 3
    upstream_max_connections: int = 20_000
    upstream_connect_timeout_s: float = 10.0
    demo_tokens_per_s: float = 40.0

    heartbeat_interval_s: float = 15.0
    first_token_timeout_s: float = 120.0
    idle_timeout_s: float = 60.0
    max_stream_s: float = 600.0
    write_timeout_s: float = 30.0
    shutdown_drain_s: float = 25.0
    max_streams: int = 10_000

    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 10.0  # head received -> whole body read, else 408 (0 = off)
    header_timeout_s: float = 10.0  # first byte (or connection open) -> whole head (0 = off)
    prompt_max_chars: int = 32_000
    max_images: int = 16
    default_max_tokens: int = 2048
    max_tokens_limit: int = 16_384

    log_format: LogFormat = "json"
    log_level: str = "info"

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    cors_origins: tuple[str, ...] = ()  # empty: the admin page's own origins
    redis_url: str | None = field(default=None, repr=False)
    rate_limit_rpm: int = 120
    rate_limit_concurrent: int = 8
    rate_limit_tpm: int = 200_000
    rate_limit_redis_failure: Literal["open", "closed"] = "open"
    rate_limit_lease_s: float = 10.0
    rate_limit_charge_interval_s: float = 0.5

    chat_db_path: str = "data/conversations.db"  # SQLite; ignored when REDIS_URL is set
    chat_system_prompt: str = CHAT_SYSTEM_PROMPT
    chat_context_tokens: int = 8000  # system prompt + history + the new message, estimated
    chat_message_max_chars: int = 8000

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        if self.cors_origins:
            return self.cors_origins
        return (f"http://localhost:{self.admin_port}", f"http://127.0.0.1:{self.admin_port}")

    @property
    def uses_demo_upstream(self) -> bool:
        """No key and no base URL anywhere: the bundled demo upstream serves."""
        return not (
            self.openai_api_key or self.openai_base_url or self.azure_endpoint or self.azure_api_key
        )

    @property
    def uses_azure(self) -> bool:
        return self.azure_endpoint is not None

    @property
    def model_allowlist(self) -> frozenset[str]:
        """Models a request may name; the configured model is always allowed."""
        return frozenset((*self.allowed_models, self.openai_model))


class SettingsError(ValueError):
    """Every bad variable at once, one per line."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        lines = "\n".join(f"  {name}: {why}" for name, why in sorted(self.problems.items()))
        super().__init__(f"invalid settings:\n{lines}")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def _seconds(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number of seconds, 0 or more (0 turns it off)")
    return value


def _rate(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number")
    return value


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _url(raw: str) -> str:
    raw = raw.strip()
    if not raw.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    _no_credentials(raw)
    return raw.rstrip("/")


def _no_credentials(url: str) -> None:
    """Refuse `user:password@` in an HTTP URL (the SDK would send it nowhere useful, and the URL
    ends up in logs and errors). The messages never repeat the URL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError:
        raise ValueError("must be a valid http:// or https:// URL") from None
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials (user:password@); use the API key setting")
    if not parts.hostname:
        raise ValueError("must name a host")


def _api_base(raw: str) -> str:
    raw = raw.strip()
    if raw == "/":
        return ""  # same origin
    if not raw.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL, or / for the page's own origin")
    _no_credentials(raw)
    return raw.rstrip("/")


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _networks(raw: str) -> tuple[str, ...]:
    values = _csv(raw)
    parse_networks(values)
    return values


def _origins(raw: str) -> tuple[str, ...]:
    values = _csv(raw)
    for origin in values:
        if origin == "*":
            continue
        if not origin.startswith(("http://", "https://")):
            raise ValueError("must be origins like https://example.com")
        _no_credentials(origin)
    return tuple(o.rstrip("/") for o in values)


def _redis_url(raw: str) -> str:
    raw = raw.strip()
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return raw


def _failure(raw: str) -> str:
    if raw not in ("open", "closed"):
        raise ValueError("must be open or closed")
    return raw


def _log_format(raw: str) -> str:
    if raw not in ("json", "console"):
        raise ValueError("must be json or console")
    return raw


def _log_level(raw: str) -> str:
    level = raw.strip().lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError("must be debug, info, warning, error or critical")
    return level


def _ranged(parse: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    def check(raw: str) -> Any:
        value = parse(raw)
        if not low <= value <= high:
            raise ValueError(f"must be from {low:g} to {high:g}")
        return value

    return check


# environment variable -> (Settings field, parser)
_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "HOST": ("host", _text),
    "PORT": ("port", _port),
    "ADMIN_PORT": ("admin_port", _port),
    "ADMIN_API_BASE": ("admin_api_base", _api_base),
    "LISTEN_BACKLOG": ("listen_backlog", _ranged(int, 1, 65535)),
    "OPENAI_API_KEY": ("openai_api_key", _text),
    "OPENAI_BASE_URL": ("openai_base_url", _url),
    "OPENAI_MODEL": ("openai_model", _text),
    "AZURE_OPENAI_ENDPOINT": ("azure_endpoint", _url),
    "AZURE_OPENAI_API_KEY": ("azure_api_key", _text),
    "OPENAI_API_VERSION": ("openai_api_version", _text),
    "ALLOWED_MODELS": ("allowed_models", _csv),
    "UPSTREAM_MAX_RETRIES": ("upstream_max_retries", _ranged(int, 0, 10)),
    "UPSTREAM_MAX_CONNECTIONS": ("upstream_max_connections", _ranged(int, 1, 1_000_000)),
    "UPSTREAM_CONNECT_TIMEOUT_S": ("upstream_connect_timeout_s", _rate),
    "DEMO_TOKENS_PER_S": ("demo_tokens_per_s", _rate),
    "HEARTBEAT_INTERVAL_S": ("heartbeat_interval_s", _seconds),
    "FIRST_TOKEN_TIMEOUT_S": ("first_token_timeout_s", _seconds),
    "IDLE_TIMEOUT_S": ("idle_timeout_s", _seconds),
    "MAX_STREAM_S": ("max_stream_s", _seconds),
    "WRITE_TIMEOUT_S": ("write_timeout_s", _seconds),
    "SHUTDOWN_DRAIN_S": ("shutdown_drain_s", _seconds),
    "MAX_STREAMS": ("max_streams", _positive_int),
    "MAX_BODY_BYTES": ("max_body_bytes", _ranged(int, 1024, 1 << 30)),
    "BODY_TIMEOUT_S": ("body_timeout_s", _seconds),
    "HEADER_TIMEOUT_S": ("header_timeout_s", _seconds),
    "PROMPT_MAX_CHARS": ("prompt_max_chars", _ranged(int, 1, 10_000_000)),
    "MAX_IMAGES": ("max_images", _ranged(int, 0, 1000)),
    "DEFAULT_MAX_TOKENS": ("default_max_tokens", _ranged(int, 1, 1_000_000)),
    "MAX_TOKENS_LIMIT": ("max_tokens_limit", _ranged(int, 1, 1_000_000)),
    "API_KEYS": ("api_keys", _csv),
    "TRUSTED_PROXIES": ("trusted_proxies", _networks),
    "CORS_ORIGINS": ("cors_origins", _origins),
    "REDIS_URL": ("redis_url", _redis_url),
    "RATE_LIMIT_RPM": ("rate_limit_rpm", _positive_int),
    "RATE_LIMIT_CONCURRENT": ("rate_limit_concurrent", _positive_int),
    "RATE_LIMIT_TPM": ("rate_limit_tpm", _positive_int),
    "RATE_LIMIT_REDIS_FAILURE": ("rate_limit_redis_failure", _failure),
    "RATE_LIMIT_LEASE_S": ("rate_limit_lease_s", _ranged(float, 1, 3600)),
    "RATE_LIMIT_CHARGE_INTERVAL_S": ("rate_limit_charge_interval_s", _ranged(float, 0.01, 60)),
    "CHAT_DB_PATH": ("chat_db_path", _text),
    "CHAT_SYSTEM_PROMPT": ("chat_system_prompt", _text),
    "CHAT_CONTEXT_TOKENS": ("chat_context_tokens", _ranged(int, 256, 10_000_000)),
    "CHAT_MESSAGE_MAX_CHARS": ("chat_message_max_chars", _ranged(int, 1, 1_000_000)),
    "LOG_FORMAT": ("log_format", _log_format),
    "LOG_LEVEL": ("log_level", _log_level),
}


def from_env(env: Mapping[str, str]) -> Settings:
    """Build Settings from an environment mapping; raise SettingsError naming every bad one."""
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, (attr, parse) in _VARIABLES.items():
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[attr] = parse(raw)
        except ValueError as err:
            said = str(err)
            readable = "must" in said or "is not" in said
            problems[name] = said if readable else f"not understood ({raw!r})"
    if env.get("AZURE_OPENAI_ENDPOINT") and not (
        env.get("AZURE_OPENAI_API_KEY") or env.get("OPENAI_API_KEY")
    ):
        problems["AZURE_OPENAI_API_KEY"] = "required with AZURE_OPENAI_ENDPOINT"
    if problems:
        raise SettingsError(problems)
    settings = Settings(**values)
    limit, default = settings.max_tokens_limit, settings.default_max_tokens
    if default > limit:
        raise SettingsError({"DEFAULT_MAX_TOKENS": f"must not exceed MAX_TOKENS_LIMIT ({limit})"})
    # The newest message must always fit beside the system prompt (history fills what is left).
    floor = (len(settings.chat_system_prompt) + settings.chat_message_max_chars) // 4 + 16
    if settings.chat_context_tokens < floor:
        raise SettingsError(
            {"CHAT_CONTEXT_TOKENS": f"must be at least {floor} to fit CHAT_MESSAGE_MAX_CHARS"}
        )
    if settings.uses_demo_upstream and "OPENAI_MODEL" not in values:
        settings = dataclasses.replace(settings, openai_model=DEMO_MODEL)
    return settings
