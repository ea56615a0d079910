"""Settings as tables: each variable's parser, each refusal's words, and the rules that span
variables, all reported at once."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from service.config import (
    AccessSettings,
    ChatSettings,
    ClockSettings,
    LimitSettings,
    LogSettings,
    RequestSettings,
    ResumeSettings,
    ServerSettings,
    Settings,
    SettingsError,
    StoreSettings,
    UpstreamSettings,
    from_env,
    problems_of,
)
from service.parsers import UpstreamServer

GROUPS = (
    ServerSettings,
    UpstreamSettings,
    ClockSettings,
    RequestSettings,
    AccessSettings,
    LimitSettings,
    StoreSettings,
    ChatSettings,
    LogSettings,
    ResumeSettings,
)

SECONDS = "must be a finite number of seconds, 0 or more (0 turns it off)"
CREDENTIALS = "must not contain credentials (user:password@); use the API key setting"
ONE_UPSTREAM = "must not be set beside AZURE_OPENAI_ENDPOINT (one upstream or the other)"
KEEPALIVE_HEARTBEAT = "must be at most 32767 s while WRITE_TIMEOUT_S is on (TCP keep-alive)"
KEEPALIVE_WRITE = "must be at most 32767 s while HEARTBEAT_INTERVAL_S is 0 (TCP keep-alive)"

# A value other than the default for every variable, and the field it lands in as read.
EVERY_VARIABLE: dict[str, tuple[str, str, Any]] = {
    "HOST": (" 0.0.0.0 ", "host", "0.0.0.0"),
    "PORT": ("0", "port", 0),
    "ADMIN_PORT": ("65535", "admin_port", 65535),
    "ADMIN_API_BASE": ("/", "admin_api_base", ""),
    "LISTEN_BACKLOG": ("1", "listen_backlog", 1),
    "ADMIN_METRICS_URLS": (
        " http://10.0.0.1:3301/, https://api.example.com ",
        "admin_metrics_urls",
        ("http://10.0.0.1:3301", "https://api.example.com"),
    ),
    "ADMIN_METRICS_INTERVAL_S": ("0.5", "admin_metrics_interval_s", 0.5),
    "OPENAI_API_KEY": ("sk-k", "openai_api_key", "sk-k"),
    "OPENAI_BASE_URL": ("http://127.0.0.1:8000/v1/", "openai_base_url", "http://127.0.0.1:8000/v1"),
    "OPENAI_MODEL": ("m", "openai_model", "m"),
    "AZURE_OPENAI_API_KEY": ("az", "azure_api_key", "az"),
    "OPENAI_API_VERSION": ("2025-01-01", "openai_api_version", "2025-01-01"),
    "ALLOWED_MODELS": ("a, b,", "allowed_models", ("a", "b")),
    "UPSTREAM_MAX_RETRIES": ("10", "upstream_max_retries", 10),
    "UPSTREAM_MAX_CONNECTIONS": ("1", "upstream_max_connections", 1),
    "UPSTREAM_CONNECT_TIMEOUT_S": ("0.5", "upstream_connect_timeout_s", 0.5),
    "DEMO_TOKENS_PER_S": ("2000", "demo_tokens_per_s", 2000.0),
    "UPSTREAM_FAILURE_THRESHOLD": ("1", "upstream_failure_threshold", 1),
    "UPSTREAM_COOLDOWN_S": ("0.5", "upstream_cooldown_s", 0.5),
    "UPSTREAM_ATTEMPT_FIRST_BYTE_S": ("0", "upstream_attempt_first_byte_s", 0.0),
    "HEARTBEAT_INTERVAL_S": ("0", "heartbeat_interval_s", 0.0),
    "FIRST_TOKEN_TIMEOUT_S": ("1.5", "first_token_timeout_s", 1.5),
    "IDLE_TIMEOUT_S": ("0", "idle_timeout_s", 0.0),
    "MAX_STREAM_S": ("30.5", "max_stream_s", 30.5),
    "WRITE_TIMEOUT_S": ("32767", "write_timeout_s", 32767.0),
    "SHUTDOWN_DRAIN_S": ("3", "shutdown_drain_s", 3.0),
    "BODY_TIMEOUT_S": ("2.5", "body_timeout_s", 2.5),
    "HEADER_TIMEOUT_S": ("0", "header_timeout_s", 0.0),
    "MAX_BODY_BYTES": ("1024", "max_body_bytes", 1024),
    "PROMPT_MAX_CHARS": ("1", "prompt_max_chars", 1),
    "MAX_IMAGES": ("0", "max_images", 0),
    "DEFAULT_MAX_TOKENS": ("1", "default_max_tokens", 1),
    "MAX_TOKENS_LIMIT": ("1000000", "max_tokens_limit", 1_000_000),
    "API_KEYS": ("k1,k2", "api_keys", ("k1", "k2")),
    "TRUSTED_PROXIES": ("10.0.0.0/8, ::1", "trusted_proxies", ("10.0.0.0/8", "::1")),
    "CORS_ORIGINS": ("https://a.example/, *", "cors_origins", ("https://a.example", "*")),
    "MAX_STREAMS": ("0", "max_streams", 0),
    "RATE_LIMIT_RPM": ("0", "rate_limit_rpm", 0),
    "RATE_LIMIT_CONCURRENT": ("1", "rate_limit_concurrent", 1),
    "RATE_LIMIT_TPM": ("7", "rate_limit_tpm", 7),
    "RATE_LIMIT_REDIS_FAILURE": ("closed", "rate_limit_redis_failure", "closed"),
    "RATE_LIMIT_LEASE_S": ("1", "rate_limit_lease_s", 1.0),
    "RATE_LIMIT_CHARGE_INTERVAL_S": ("60", "rate_limit_charge_interval_s", 60.0),
    "REDIS_URL": ("unix:///run/redis.sock", "redis_url", "unix:///run/redis.sock"),
    "CHAT_DB_PATH": (":memory:", "chat_db_path", ":memory:"),
    "CHAT_SYSTEM_PROMPT": ("Be brief.", "chat_system_prompt", "Be brief."),
    "CHAT_CONTEXT_TOKENS": ("300", "chat_context_tokens", 300),
    "CHAT_MESSAGE_MAX_CHARS": ("100", "chat_message_max_chars", 100),
    "CHECKPOINT_S": ("0.25", "checkpoint_s", 0.25),
    "RESUME_GRACE_S": ("0", "resume_grace_s", 0.0),
    "STREAM_FLUSH_MS": ("20", "stream_flush_ms", 20),
    "RESUME_TTL_S": ("0.5", "resume_ttl_s", 0.5),
    "RESUME_MAX_READERS": ("2", "resume_max_readers", 2),
    "RESUME_KEEP_MB": ("0.25", "resume_keep_mb", 0.25),
    "RESUME_FLUSH_MS": ("10", "resume_flush_ms", 10),
    "RESUME_LEASE_S": ("0.5", "resume_lease_s", 0.5),
    "LOG_FORMAT": ("console", "log_format", "console"),
    "LOG_LEVEL": (" WARNING ", "log_level", "warning"),
}


def test_settings_is_every_group_built_flat() -> None:
    settings = Settings(port=1, heartbeat_interval_s=2, rate_limit_rpm=3)
    for group in GROUPS:
        assert isinstance(settings, group)
    names = [f.name for group in GROUPS for f in dataclasses.fields(group)]
    assert len(names) == len(set(names))  # no field in two groups
    assert set(names) == {f.name for f in dataclasses.fields(Settings)}
    assert dataclasses.replace(settings, port=4).port == 4


def test_every_variable_lands_in_its_field_and_every_field_has_one() -> None:
    settings = from_env({name: raw for name, (raw, _, _) in EVERY_VARIABLE.items()})
    assert {name: getattr(settings, attr) for name, (_, attr, _) in EVERY_VARIABLE.items()} == {
        name: value for name, (_, _, value) in EVERY_VARIABLE.items()
    }
    # AZURE_OPENAI_ENDPOINT is refused beside OPENAI_BASE_URL: read on its own
    azure = from_env({"AZURE_OPENAI_ENDPOINT": "https://a.example/", "OPENAI_API_KEY": "k"})
    assert (azure.azure_endpoint, azure.uses_azure) == ("https://a.example", True)
    # UPSTREAMS is refused beside either: read on its own
    servers = from_env({"UPSTREAMS": '[{"name": "a", "base_url": "http://h/v1"}]'}).upstreams
    assert servers == (UpstreamServer(name="a", base_url="http://h/v1"),)
    read = {attr for _, attr, _ in EVERY_VARIABLE.values()} | {"azure_endpoint", "upstreams"}
    assert read == {f.name for f in dataclasses.fields(Settings)}


@pytest.mark.parametrize(
    ("name", "raw", "why"),
    [
        ("PORT", "http", "must be a whole number"),
        ("PORT", "65536", "must be a port number from 0 to 65535"),
        ("PORT", "1.5", "must be a whole number"),
        ("LISTEN_BACKLOG", "0", "must be from 1 to 65535"),
        ("ADMIN_METRICS_URLS", "http://a:3301, https://u:p@b.example", CREDENTIALS),
        ("ADMIN_METRICS_URLS", "a.example:3301", "must be an http:// or https:// URL"),
        ("ADMIN_METRICS_URLS", " , ", "must name at least one http:// or https:// URL"),
        ("ADMIN_METRICS_INTERVAL_S", "0.05", "must be from 0.1 to 60.0"),
        ("HOST", "   ", "must not be empty"),
        ("MAX_STREAMS", "-5", "must be 0 or more"),
        ("MAX_STREAMS", "sk-secret", "must be a whole number"),
        ("HEARTBEAT_INTERVAL_S", "-1", SECONDS),
        ("IDLE_TIMEOUT_S", "nan", SECONDS),
        ("MAX_STREAM_S", "inf", SECONDS),
        ("MAX_STREAM_S", "ten", "must be a number"),
        ("WRITE_TIMEOUT_S", "2147484", "must be at most 2147483 s (the TCP user timeout)"),
        ("DEMO_TOKENS_PER_S", "0", "must be a positive number"),
        ("UPSTREAM_MAX_RETRIES", "99", "must be from 0 to 10"),
        ("RATE_LIMIT_LEASE_S", "nan", "must be from 1 to 3600"),
        ("RATE_LIMIT_CHARGE_INTERVAL_S", "0.001", "must be from 0.01 to 60"),
        ("RESUME_GRACE_S", "-1", SECONDS),
        ("STREAM_FLUSH_MS", "1001", "must be from 0 to 1000"),
        ("STREAM_FLUSH_MS", "2.5", "must be a whole number"),
        ("RESUME_MAX_READERS", "0", "must be from 1 to 1000"),
        ("RESUME_KEEP_MB", "-1", "must be from 0.0 to 1000000.0"),
        ("RESUME_FLUSH_MS", "0", "must be from 1 to 60000"),
        ("RESUME_LEASE_S", "0", "must be from 0.1 to 600.0"),
        ("OPENAI_BASE_URL", "ftp://x", "must be an http:// or https:// URL"),
        ("AZURE_OPENAI_ENDPOINT", "https://k@a.example", CREDENTIALS),
        ("OPENAI_BASE_URL", "http:///v1", "must name a host"),
        ("OPENAI_BASE_URL", "http://x:port/v1", "must be a valid http:// or https:// URL"),
        (
            "ADMIN_API_BASE",
            "api.example.com",
            "must be an http:// or https:// URL, or / for the page's own origin",
        ),
        ("CORS_ORIGINS", "a.example", "must be origins like https://example.com"),
        ("TRUSTED_PROXIES", "10.0.0.1, proxy", "'proxy' is not an address or CIDR"),
        ("REDIS_URL", "localhost:6379", "must be a redis://, rediss:// or unix:// URL"),
        ("RATE_LIMIT_REDIS_FAILURE", "Open", "must be open or closed"),
        ("LOG_FORMAT", "xml", "must be json or console"),
        ("LOG_LEVEL", "loud", "must be debug, info, warning, error or critical"),
        ("CHAT_CONTEXT_TOKENS", "255", "must be from 256 to 10000000"),
    ],
)
def test_a_bad_value_is_named_in_words(name: str, raw: str, why: str) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env({name: raw})
    assert caught.value.problems == {name: why}


@pytest.mark.parametrize(
    ("env", "problems"),
    [
        (
            {
                "OPENAI_BASE_URL": "http://127.0.0.1:8000/v1",
                "AZURE_OPENAI_ENDPOINT": "https://a.example",
                "AZURE_OPENAI_API_KEY": "k",
            },
            {"OPENAI_BASE_URL": ONE_UPSTREAM},
        ),
        (
            {"AZURE_OPENAI_ENDPOINT": "https://a.example"},
            {"AZURE_OPENAI_API_KEY": "required with AZURE_OPENAI_ENDPOINT"},
        ),
        ({"AZURE_OPENAI_ENDPOINT": "https://a.example", "OPENAI_API_KEY": "k"}, {}),
        (
            {"MAX_TOKENS_LIMIT": "100"},
            {"DEFAULT_MAX_TOKENS": "must not exceed MAX_TOKENS_LIMIT (100)"},
        ),
        ({"MAX_TOKENS_LIMIT": "100", "DEFAULT_MAX_TOKENS": "100"}, {}),
        (
            {"CHAT_MESSAGE_MAX_CHARS": "40000"},
            {"CHAT_CONTEXT_TOKENS": "must be at least 10030 to fit CHAT_MESSAGE_MAX_CHARS"},
        ),
        (
            {
                "CHAT_CONTEXT_TOKENS": "300",
                "CHAT_SYSTEM_PROMPT": "x" * 1000,
                "CHAT_MESSAGE_MAX_CHARS": "100",
            },
            {},
        ),
        (
            {
                "CHAT_CONTEXT_TOKENS": "300",
                "CHAT_SYSTEM_PROMPT": "x" * 1100,
                "CHAT_MESSAGE_MAX_CHARS": "100",
            },
            {"CHAT_CONTEXT_TOKENS": "must be at least 316 to fit CHAT_MESSAGE_MAX_CHARS"},
        ),
        (
            {"HEARTBEAT_INTERVAL_S": "32768"},
            {"HEARTBEAT_INTERVAL_S": KEEPALIVE_HEARTBEAT},
        ),
        ({"HEARTBEAT_INTERVAL_S": "32768", "WRITE_TIMEOUT_S": "0"}, {}),
        (
            {"REDIS_URL": "redis://127.0.0.1:6379/0", "RESUME_FLUSH_MS": "1001"},
            {
                "RESUME_FLUSH_MS": (
                    "must be at most a third of RESUME_LEASE_S (1000 ms) with REDIS_URL"
                )
            },
        ),
        ({"REDIS_URL": "redis://127.0.0.1:6379/0", "RESUME_FLUSH_MS": "1000"}, {}),
        ({"RESUME_FLUSH_MS": "5000"}, {}),  # no shared streams, no lease
        (
            {
                "REDIS_URL": "redis://127.0.0.1:6379/0",
                "RESUME_FLUSH_MS": "5000",
                "RESUME_LEASE_S": "15",
            },
            {},
        ),
        (
            {"HEARTBEAT_INTERVAL_S": "0", "WRITE_TIMEOUT_S": "40000"},
            {"WRITE_TIMEOUT_S": KEEPALIVE_WRITE},
        ),
        ({"HEARTBEAT_INTERVAL_S": "15", "WRITE_TIMEOUT_S": "40000"}, {}),
        # a rule is not judged on a variable that is bad on its own: its default stands in for it
        (
            {"MAX_TOKENS_LIMIT": "100", "DEFAULT_MAX_TOKENS": "lots"},
            {"DEFAULT_MAX_TOKENS": "must be a whole number"},
        ),
        (
            {"HEARTBEAT_INTERVAL_S": "-1", "WRITE_TIMEOUT_S": "40000"},
            {"HEARTBEAT_INTERVAL_S": SECONDS},
        ),
        (
            {
                "OPENAI_BASE_URL": "http://u:p@x/v1",
                "AZURE_OPENAI_ENDPOINT": "https://a.example",
                "AZURE_OPENAI_API_KEY": "k",
            },
            {"OPENAI_BASE_URL": CREDENTIALS},
        ),
    ],
)
def test_rules_that_span_variables(env: dict[str, str], problems: dict[str, str]) -> None:
    if not problems:
        from_env(env)
        return
    with pytest.raises(SettingsError) as caught:
        from_env(env)
    assert caught.value.problems == problems


@pytest.mark.parametrize(
    ("settings", "problems"),
    [
        (Settings(), set()),
        (
            Settings(openai_base_url="http://a/v1", azure_endpoint="https://b"),
            {"OPENAI_BASE_URL", "AZURE_OPENAI_API_KEY"},
        ),
        (Settings(default_max_tokens=10, max_tokens_limit=9), {"DEFAULT_MAX_TOKENS"}),
        (Settings(chat_context_tokens=256), {"CHAT_CONTEXT_TOKENS"}),
        (Settings(heartbeat_interval_s=1e5, write_timeout_s=1), {"HEARTBEAT_INTERVAL_S"}),
        (Settings(heartbeat_interval_s=0, write_timeout_s=1e5), {"WRITE_TIMEOUT_S"}),
    ],
)
def test_rules_judge_values(settings: Settings, problems: set[str]) -> None:
    assert set(problems_of(settings)) == problems


def test_parse_and_rule_problems_come_together() -> None:
    env = {
        "PORT": "http",
        "LOG_LEVEL": "loud",
        "MAX_TOKENS_LIMIT": "100",
        "OPENAI_BASE_URL": "http://127.0.0.1:8000/v1",
        "AZURE_OPENAI_ENDPOINT": "https://a.example",
    }
    with pytest.raises(SettingsError) as caught:
        from_env(env)
    assert set(caught.value.problems) == {
        "PORT",
        "LOG_LEVEL",
        "DEFAULT_MAX_TOKENS",
        "OPENAI_BASE_URL",
        "AZURE_OPENAI_API_KEY",
    }
    assert str(caught.value).splitlines()[1:] == [
        f"  {name}: {why}" for name, why in sorted(caught.value.problems.items())
    ]


def test_upstreams_is_an_ordered_list_of_servers_with_keys_read_from_the_variables_named() -> None:
    raw = (
        '[{"name": "openai", "base_url": "https://api.example/v1/", "api_key_env": "KEY_A",'
        ' "models": {"gpt-4o": "gpt-4o-2024-08-06"}},'
        ' {"name": "azure", "azure_endpoint": "https://r.example/", "api_version": "2024-10-21",'
        ' "api_key_env": "KEY_B", "models": {"gpt-4o": "my-deployment"}}]'
    )
    settings = from_env({"UPSTREAMS": raw, "KEY_A": "sk-a", "KEY_B": "az-b"})
    first, second = settings.upstreams
    assert (first.name, first.base_url, first.api_key) == (
        "openai",
        "https://api.example/v1",
        "sk-a",
    )
    assert (second.azure_endpoint, second.api_version, second.api_key) == (
        "https://r.example",
        "2024-10-21",
        "az-b",
    )
    assert (second.serves("gpt-4o"), second.serves("other")) == ("my-deployment", None)
    assert UpstreamServer(name="any", base_url="http://h").serves("other") == "other"
    assert "sk-a" not in repr(settings)
    assert "az-b" not in repr(settings)
    assert not settings.uses_demo_upstream


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("{}", "must be a non-empty JSON list of servers"),
        ("[", "must be a JSON list of servers"),
        ('[{"base_url": "http://h"}]', "each server needs a name (1 to 64 characters)"),
        ('[{"name": "a"}]', "server 'a' needs one of base_url or azure_endpoint"),
        (
            '[{"name": "a", "azure_endpoint": "https://r"}]',
            "server 'a' needs api_version beside azure_endpoint",
        ),
        (
            '[{"name": "a", "base_url": "http://h"}, {"name": "a", "base_url": "http://i"}]',
            "server name 'a' is used twice",
        ),
        (
            '[{"name": "a", "base_url": "http://h", "api_key_env": "NOT_SET"}]',
            "server 'a': api_key_env must name a set environment variable",
        ),
        (
            '[{"name": "a", "base_url": "ftp://h"}]',
            "server 'a': must be an http:// or https:// URL",
        ),
        ('[{"name": "a", "base_url": "http://h", "key": "sk"}]', "unknown server field 'key'"),
        (
            '[{"name": "a", "base_url": "http://h", "models": {"m": 1}}]',
            "server 'a': models must map model names to model names",
        ),
    ],
)
def test_a_bad_upstreams_list_is_refused_in_words(raw: str, why: str) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env({"UPSTREAMS": raw})
    assert caught.value.problems == {"UPSTREAMS": why}


@pytest.mark.parametrize("single", ["OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT"])
def test_upstreams_beside_a_single_upstream_is_refused(single: str) -> None:
    env = {"UPSTREAMS": '[{"name": "a", "base_url": "http://h"}]', single: "https://x.example"}
    with pytest.raises(SettingsError) as caught:
        from_env({**env, "OPENAI_API_KEY": "k"})
    assert caught.value.problems == {
        "UPSTREAMS": "must not be set beside OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT "
        "(name every server in UPSTREAMS, or use the single-upstream variables)"
    }
