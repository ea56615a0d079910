"""Settings: one frozen value read once from the environment.

The variables come in groups, each a frozen dataclass read by its own typed parser:
`ServerSettings` (where the processes listen), `UpstreamSettings` (the model server),
`ClockSettings` (every deadline), `RequestSettings` (what one request may ask for),
`AccessSettings` (who may call), `LimitSettings`, `StoreSettings` (where state lives),
`ChatSettings`, `ResumeSettings` (streams that outlive their connection) and `LogSettings`.
`Settings` is all of them at once (it inherits each group), so
tests build it flat, `Settings(port=0, ...)`, and code that needs one slice takes just that type.

`from_env(mapping)` reads every group's variables with the typed parsers of `parsers` (each
returns a value or raises `Invalid` in words for an operator), then judges the `RULES` that span
variables, and raises one `SettingsError` naming every problem, so an operator fixes a deploy in
one pass. A rule is not judged while one of its variables is bad on its own (a default would
stand in for it). Tests build `Settings(...)` directly and never touch `os.environ`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from . import parsers as parse

LogFormat = Literal["json", "console"]
RedisFailure = Literal["open", "closed"]
DEFAULT_MODEL = "gpt-4o-mini"
DEMO_MODEL = "demo-writer-1"
CHAT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("json", "console")
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
REDIS_FAILURES: Final[tuple[RedisFailure, ...]] = ("open", "closed")
# Linux's ceiling for TCP_KEEPIDLE, the keep-alive idle time of client connections (`tcp`): above
# it the kernel refuses the connection options, and a vanished reader goes unnoticed.
MAX_KEEPIDLE_S: Final = 32767
# TCP_USER_TIMEOUT is a 32-bit count of milliseconds.
MAX_USER_TIMEOUT_S: Final = (2**31 - 1) // 1000


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 3301
    admin_port: int = 3300
    # Where the admin page sends API calls: None = the API's port on the page's own host when the
    # page is opened on ADMIN_PORT, else the page's origin (a proxy in front); "" = the page's
    # origin always; a URL = that API.
    admin_api_base: str | None = None
    listen_backlog: int = 4096
    # The operations view (`admin.ops`): the API instances whose /metrics the admin app reads
    # (empty = the local API, http://HOST:PORT) and how often.
    admin_metrics_urls: tuple[str, ...] = ()
    admin_metrics_interval_s: float = 5.0


@dataclass(frozen=True, kw_only=True)
class UpstreamSettings:
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
    # Failover (`failover`): the ordered servers; empty = the single upstream above.
    upstreams: tuple[parse.UpstreamServer, ...] = ()
    upstream_failure_threshold: int = 3
    upstream_cooldown_s: float = 30.0
    upstream_attempt_first_byte_s: float = 30.0

    @property
    def uses_demo_upstream(self) -> bool:
        """No key and no base URL anywhere: the bundled demo upstream serves."""
        return not (
            self.upstreams
            or self.openai_api_key
            or self.openai_base_url
            or self.azure_endpoint
            or self.azure_api_key
        )

    @property
    def uses_azure(self) -> bool:
        return self.azure_endpoint is not None

    @property
    def model_allowlist(self) -> frozenset[str]:
        """Models a request may name; the configured model is always allowed."""
        return frozenset((*self.allowed_models, self.openai_model))


@dataclass(frozen=True, kw_only=True)
class ClockSettings:
    heartbeat_interval_s: float = 15.0
    first_token_timeout_s: float = 120.0
    idle_timeout_s: float = 60.0
    max_stream_s: float = 600.0
    write_timeout_s: float = 30.0
    shutdown_drain_s: float = 25.0
    body_timeout_s: float = 10.0  # head received -> whole body read, else 408 (0 = off)
    header_timeout_s: float = 10.0  # first byte (or connection open) -> whole head (0 = off)
    stream_flush_ms: int = 0  # deltas read within it are joined into one frame (0 = each read's)


@dataclass(frozen=True, kw_only=True)
class RequestSettings:
    max_body_bytes: int = 4 * 1024 * 1024
    prompt_max_chars: int = 32_000
    max_images: int = 16
    default_max_tokens: int = 2048
    max_tokens_limit: int = 16_384


@dataclass(frozen=True, kw_only=True)
class AccessSettings:
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    cors_origins: tuple[str, ...] = ()  # empty: the admin page's own origins


@dataclass(frozen=True, kw_only=True)
class LimitSettings:
    max_streams: int = 10_000
    rate_limit_rpm: int = 120
    rate_limit_concurrent: int = 8
    rate_limit_tpm: int = 200_000
    rate_limit_redis_failure: RedisFailure = "open"
    rate_limit_lease_s: float = 10.0
    rate_limit_charge_interval_s: float = 0.5


@dataclass(frozen=True, kw_only=True)
class StoreSettings:
    redis_url: str | None = field(default=None, repr=False)  # limits and conversations
    chat_db_path: str = "data/conversations.db"  # SQLite; ignored when REDIS_URL is set


@dataclass(frozen=True, kw_only=True)
class ChatSettings:
    chat_system_prompt: str = CHAT_SYSTEM_PROMPT
    chat_context_tokens: int = 8000  # system prompt + history + the new message, estimated
    chat_message_max_chars: int = 8000
    checkpoint_s: float = 1.0  # an open answer's text saved this often; 0 = only at its end


@dataclass(frozen=True, kw_only=True)
class ResumeSettings:
    resume_grace_s: float = 30.0  # a native stream's generation with no reader goes on (0 = not)
    resume_ttl_s: float = 300.0  # a finished stream stays readable (0 = not kept)
    resume_max_readers: int = 4  # readers of one stream at once
    resume_keep_mb: float = 64.0  # finished streams' event bytes kept in all; oldest dropped first
    resume_flush_ms: int = 50  # how often new events are appended to Redis (shared streams)
    resume_lease_s: float = 3.0  # a producer's lease in Redis: readers learn of its death in this

    @property
    def resume_keep_bytes(self) -> int:
        return int(self.resume_keep_mb * 1024 * 1024)


@dataclass(frozen=True, kw_only=True)
class LogSettings:
    log_format: LogFormat = "json"
    log_level: str = "info"


@dataclass(frozen=True, kw_only=True)
class Settings(
    LogSettings,
    ResumeSettings,
    ChatSettings,
    StoreSettings,
    LimitSettings,
    AccessSettings,
    RequestSettings,
    ClockSettings,
    UpstreamSettings,
    ServerSettings,
):
    """Every group at once (fields in the order of the bases from the last: server first)."""

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        if self.cors_origins:
            return self.cors_origins
        return (f"http://localhost:{self.admin_port}", f"http://127.0.0.1:{self.admin_port}")


class SettingsError(ValueError):
    """Every bad variable at once, one per line."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        lines = "\n".join(f"  {name}: {why}" for name, why in sorted(self.problems.items()))
        super().__init__(f"invalid settings:\n{lines}")


def _write_timeout(raw: str) -> float:
    value = parse.seconds(raw)
    if value > MAX_USER_TIMEOUT_S:
        raise parse.Invalid(f"must be at most {MAX_USER_TIMEOUT_S} s (the TCP user timeout)")
    return value


def _base_urls(raw: str) -> tuple[str, ...]:
    """Comma-separated http(s) base URLs, each as `parse.url` takes it (no credentials)."""
    urls = tuple(parse.url(part) for part in parse.csv(raw))
    if not urls:
        raise parse.Invalid("must name at least one http:// or https:// URL")
    return urls


def _level(raw: str) -> str:
    return parse.one_of(LOG_LEVELS)(raw.strip().lower())


# One parser per group. Each reads its variables with the group's own defaults.


def _server(read: parse.Reader) -> ServerSettings:
    d = ServerSettings()
    return ServerSettings(
        host=read("HOST", parse.text, d.host),
        port=read("PORT", parse.port, d.port),
        admin_port=read("ADMIN_PORT", parse.port, d.admin_port),
        admin_api_base=read("ADMIN_API_BASE", parse.api_base, d.admin_api_base),
        listen_backlog=read(
            "LISTEN_BACKLOG", parse.between(parse.integer, 1, 65535), d.listen_backlog
        ),
        admin_metrics_urls=read("ADMIN_METRICS_URLS", _base_urls, d.admin_metrics_urls),
        admin_metrics_interval_s=read(
            "ADMIN_METRICS_INTERVAL_S",
            parse.between(parse.number, 0.1, 60.0),
            d.admin_metrics_interval_s,
        ),
    )


def _upstream(read: parse.Reader) -> UpstreamSettings:
    d = UpstreamSettings()
    upstream = UpstreamSettings(
        openai_api_key=read("OPENAI_API_KEY", parse.text, d.openai_api_key),
        openai_base_url=read("OPENAI_BASE_URL", parse.url, d.openai_base_url),
        openai_model=read("OPENAI_MODEL", parse.text, d.openai_model),
        azure_endpoint=read("AZURE_OPENAI_ENDPOINT", parse.url, d.azure_endpoint),
        azure_api_key=read("AZURE_OPENAI_API_KEY", parse.text, d.azure_api_key),
        openai_api_version=read("OPENAI_API_VERSION", parse.text, d.openai_api_version),
        allowed_models=read("ALLOWED_MODELS", parse.csv, d.allowed_models),
        upstream_max_retries=read(
            "UPSTREAM_MAX_RETRIES", parse.between(parse.integer, 0, 10), d.upstream_max_retries
        ),
        upstream_max_connections=read(
            "UPSTREAM_MAX_CONNECTIONS",
            parse.between(parse.integer, 1, 1_000_000),
            d.upstream_max_connections,
        ),
        upstream_connect_timeout_s=read(
            "UPSTREAM_CONNECT_TIMEOUT_S", parse.rate, d.upstream_connect_timeout_s
        ),
        demo_tokens_per_s=read("DEMO_TOKENS_PER_S", parse.rate, d.demo_tokens_per_s),
        upstreams=read("UPSTREAMS", parse.upstreams(read.env), d.upstreams),
        upstream_failure_threshold=read(
            "UPSTREAM_FAILURE_THRESHOLD",
            parse.between(parse.integer, 1, 1000),
            d.upstream_failure_threshold,
        ),
        upstream_cooldown_s=read("UPSTREAM_COOLDOWN_S", parse.seconds, d.upstream_cooldown_s),
        upstream_attempt_first_byte_s=read(
            "UPSTREAM_ATTEMPT_FIRST_BYTE_S", parse.seconds, d.upstream_attempt_first_byte_s
        ),
    )
    if upstream.uses_demo_upstream and not read.given("OPENAI_MODEL"):
        upstream = dataclasses.replace(upstream, openai_model=DEMO_MODEL)
    return upstream


def _clocks(read: parse.Reader) -> ClockSettings:
    d = ClockSettings()
    return ClockSettings(
        heartbeat_interval_s=read("HEARTBEAT_INTERVAL_S", parse.seconds, d.heartbeat_interval_s),
        first_token_timeout_s=read("FIRST_TOKEN_TIMEOUT_S", parse.seconds, d.first_token_timeout_s),
        idle_timeout_s=read("IDLE_TIMEOUT_S", parse.seconds, d.idle_timeout_s),
        max_stream_s=read("MAX_STREAM_S", parse.seconds, d.max_stream_s),
        write_timeout_s=read("WRITE_TIMEOUT_S", _write_timeout, d.write_timeout_s),
        shutdown_drain_s=read("SHUTDOWN_DRAIN_S", parse.seconds, d.shutdown_drain_s),
        body_timeout_s=read("BODY_TIMEOUT_S", parse.seconds, d.body_timeout_s),
        header_timeout_s=read("HEADER_TIMEOUT_S", parse.seconds, d.header_timeout_s),
        stream_flush_ms=read(
            "STREAM_FLUSH_MS", parse.between(parse.integer, 0, 1000), d.stream_flush_ms
        ),
    )


def _requests(read: parse.Reader) -> RequestSettings:
    d = RequestSettings()
    tokens = parse.between(parse.integer, 1, 1_000_000)
    return RequestSettings(
        max_body_bytes=read(
            "MAX_BODY_BYTES", parse.between(parse.integer, 1024, 1 << 30), d.max_body_bytes
        ),
        prompt_max_chars=read(
            "PROMPT_MAX_CHARS", parse.between(parse.integer, 1, 10_000_000), d.prompt_max_chars
        ),
        max_images=read("MAX_IMAGES", parse.between(parse.integer, 0, 1000), d.max_images),
        default_max_tokens=read("DEFAULT_MAX_TOKENS", tokens, d.default_max_tokens),
        max_tokens_limit=read("MAX_TOKENS_LIMIT", tokens, d.max_tokens_limit),
    )


def _access(read: parse.Reader) -> AccessSettings:
    d = AccessSettings()
    return AccessSettings(
        api_keys=read("API_KEYS", parse.csv, d.api_keys),
        trusted_proxies=read("TRUSTED_PROXIES", parse.networks, d.trusted_proxies),
        cors_origins=read("CORS_ORIGINS", parse.origins, d.cors_origins),
    )


def _limits(read: parse.Reader) -> LimitSettings:
    d = LimitSettings()
    return LimitSettings(
        max_streams=read("MAX_STREAMS", parse.count, d.max_streams),
        rate_limit_rpm=read("RATE_LIMIT_RPM", parse.count, d.rate_limit_rpm),
        rate_limit_concurrent=read("RATE_LIMIT_CONCURRENT", parse.count, d.rate_limit_concurrent),
        rate_limit_tpm=read("RATE_LIMIT_TPM", parse.count, d.rate_limit_tpm),
        rate_limit_redis_failure=read(
            "RATE_LIMIT_REDIS_FAILURE", parse.one_of(REDIS_FAILURES), d.rate_limit_redis_failure
        ),
        rate_limit_lease_s=read(
            "RATE_LIMIT_LEASE_S", parse.between(parse.number, 1, 3600), d.rate_limit_lease_s
        ),
        rate_limit_charge_interval_s=read(
            "RATE_LIMIT_CHARGE_INTERVAL_S",
            parse.between(parse.number, 0.01, 60),
            d.rate_limit_charge_interval_s,
        ),
    )


def _stores(read: parse.Reader) -> StoreSettings:
    d = StoreSettings()
    return StoreSettings(
        redis_url=read("REDIS_URL", parse.redis_url, d.redis_url),
        chat_db_path=read("CHAT_DB_PATH", parse.text, d.chat_db_path),
    )


def _chat(read: parse.Reader) -> ChatSettings:
    d = ChatSettings()
    return ChatSettings(
        chat_system_prompt=read("CHAT_SYSTEM_PROMPT", parse.text, d.chat_system_prompt),
        chat_context_tokens=read(
            "CHAT_CONTEXT_TOKENS",
            parse.between(parse.integer, 256, 10_000_000),
            d.chat_context_tokens,
        ),
        chat_message_max_chars=read(
            "CHAT_MESSAGE_MAX_CHARS",
            parse.between(parse.integer, 1, 1_000_000),
            d.chat_message_max_chars,
        ),
        checkpoint_s=read("CHECKPOINT_S", parse.seconds, d.checkpoint_s),
    )


def _resume(read: parse.Reader) -> ResumeSettings:
    d = ResumeSettings()
    return ResumeSettings(
        resume_grace_s=read("RESUME_GRACE_S", parse.seconds, d.resume_grace_s),
        resume_ttl_s=read("RESUME_TTL_S", parse.seconds, d.resume_ttl_s),
        resume_max_readers=read(
            "RESUME_MAX_READERS", parse.between(parse.integer, 1, 1000), d.resume_max_readers
        ),
        resume_keep_mb=read(
            "RESUME_KEEP_MB", parse.between(parse.number, 0.0, 1_000_000.0), d.resume_keep_mb
        ),
        resume_flush_ms=read(
            "RESUME_FLUSH_MS", parse.between(parse.integer, 1, 60_000), d.resume_flush_ms
        ),
        resume_lease_s=read(
            "RESUME_LEASE_S", parse.between(parse.number, 0.1, 600.0), d.resume_lease_s
        ),
    )


def _logging(read: parse.Reader) -> LogSettings:
    d = LogSettings()
    return LogSettings(
        log_format=read("LOG_FORMAT", parse.one_of(LOG_FORMATS), d.log_format),
        log_level=read("LOG_LEVEL", _level, d.log_level),
    )


# Rules that span variables. Each says what is wrong (None: nothing) about parsed values.


def _one_upstream(u: UpstreamSettings) -> str | None:
    if u.openai_base_url and u.azure_endpoint:
        return "must not be set beside AZURE_OPENAI_ENDPOINT (one upstream or the other)"
    return None


def _one_form(u: UpstreamSettings) -> str | None:
    if u.upstreams and (u.openai_base_url or u.azure_endpoint):
        return (
            "must not be set beside OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT "
            "(name every server in UPSTREAMS, or use the single-upstream variables)"
        )
    return None


def _azure_key(u: UpstreamSettings) -> str | None:
    if u.azure_endpoint and not (u.azure_api_key or u.openai_api_key):
        return "required with AZURE_OPENAI_ENDPOINT"
    return None


def _default_tokens(r: RequestSettings) -> str | None:
    if r.default_max_tokens > r.max_tokens_limit:
        return f"must not exceed MAX_TOKENS_LIMIT ({r.max_tokens_limit})"
    return None


def _context_fits(c: ChatSettings) -> str | None:
    """The newest message must always fit beside the system prompt (history fills the rest)."""
    floor = (len(c.chat_system_prompt) + c.chat_message_max_chars) // 4 + 16
    if c.chat_context_tokens < floor:
        return f"must be at least {floor} to fit CHAT_MESSAGE_MAX_CHARS"
    return None


def _flush_renews_lease(s: Settings) -> str | None:
    """With shared streams, the producer's lease is renewed by its flusher, every `lease / 3` at
    the first flush after that (`shared_streams` note 2): a flush interval longer than a third
    of the lease would let a live producer's lease lapse and its readers be told it died."""
    limit = s.resume_lease_s * 1000 / 3
    if s.redis_url and s.resume_flush_ms > limit:
        return f"must be at most a third of RESUME_LEASE_S ({limit:g} ms) with REDIS_URL"
    return None


# With write timeouts on, client connections idle one heartbeat interval (the write timeout when
# heartbeats are off) before keep-alive probes start (`tcp.peer_options`).


def _heartbeat_keepalive(c: ClockSettings) -> str | None:
    if c.write_timeout_s and c.heartbeat_interval_s > MAX_KEEPIDLE_S:
        return f"must be at most {MAX_KEEPIDLE_S} s while WRITE_TIMEOUT_S is on (TCP keep-alive)"
    return None


def _write_keepalive(c: ClockSettings) -> str | None:
    if not c.heartbeat_interval_s and c.write_timeout_s > MAX_KEEPIDLE_S:
        return (
            f"must be at most {MAX_KEEPIDLE_S} s while HEARTBEAT_INTERVAL_S is 0 (TCP keep-alive)"
        )
    return None


@dataclass(frozen=True, slots=True)
class Rule:
    """`check` judges `variables` together; a problem is reported under `variables[0]`."""

    variables: tuple[str, ...]
    check: Callable[[Settings], str | None]


RULES: Final[tuple[Rule, ...]] = (
    Rule(("OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT"), _one_upstream),
    Rule(("UPSTREAMS", "OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT"), _one_form),
    Rule(("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "OPENAI_API_KEY"), _azure_key),
    Rule(("DEFAULT_MAX_TOKENS", "MAX_TOKENS_LIMIT"), _default_tokens),
    Rule(("CHAT_CONTEXT_TOKENS", "CHAT_MESSAGE_MAX_CHARS", "CHAT_SYSTEM_PROMPT"), _context_fits),
    Rule(("RESUME_FLUSH_MS", "RESUME_LEASE_S", "REDIS_URL"), _flush_renews_lease),
    Rule(("HEARTBEAT_INTERVAL_S", "WRITE_TIMEOUT_S"), _heartbeat_keepalive),
    Rule(("WRITE_TIMEOUT_S", "HEARTBEAT_INTERVAL_S"), _write_keepalive),
)


def problems_of(settings: Settings, bad: frozenset[str] = frozenset()) -> dict[str, str]:
    """What the rules find wrong with `settings`, skipping rules that involve a `bad` variable."""
    found: dict[str, str] = {}
    for rule in RULES:
        if bad.isdisjoint(rule.variables) and (why := rule.check(settings)) is not None:
            found.setdefault(rule.variables[0], why)
    return found


def from_env(env: Mapping[str, str]) -> Settings:
    """Build Settings from an environment mapping; raise SettingsError naming every problem."""
    read = parse.Reader(env)
    settings = Settings(
        **vars(_server(read)),
        **vars(_upstream(read)),
        **vars(_clocks(read)),
        **vars(_requests(read)),
        **vars(_access(read)),
        **vars(_limits(read)),
        **vars(_stores(read)),
        **vars(_chat(read)),
        **vars(_resume(read)),
        **vars(_logging(read)),
    )
    problems = read.problems | problems_of(settings, frozenset(read.problems))
    if problems:
        raise SettingsError(problems)
    return settings
