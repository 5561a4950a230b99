"""``Settings.from_env``: ``SERVICE_*`` variables, converted and checked at start-up, errors naming the variable.

The authentication rules are tested with the rest of auth (tests/integration/test_auth.py), the demo
switch with the schema limits (tests/integration/test_schema_limits.py).
"""

from __future__ import annotations

import re

import pytest

from service.settings import Settings, SettingsError, is_loopback


def test_no_variables_give_the_embedded_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings().database_url.startswith("sqlite+aiosqlite:///")  # `just serve` needs no server
    assert Settings().redis_url is None


def test_values_are_converted_from_their_text() -> None:
    settings = Settings.from_env(
        {
            "SERVICE_PORT": "9000",
            "SERVICE_RUN_RETENTION_S": "30",
            "SERVICE_DEMO": "false",
            "SERVICE_DEFAULT_MODEL": "openai/gpt",
            "SERVICE_LOG_LEVEL": "debug",
            "SERVICE_REDIS_URL": "redis://127.0.0.1:6379/0",
        }
    )
    assert (settings.port, settings.run_retention_s, settings.demo) == (9000, 30.0, False)
    assert isinstance(settings.run_retention_s, float)
    assert (settings.default_model, settings.log_level, settings.redis_url) == (
        "openai/gpt",
        "debug",
        "redis://127.0.0.1:6379/0",
    )


def test_lists_are_comma_separated_with_blanks_dropped() -> None:
    settings = Settings.from_env(
        {
            "SERVICE_ALLOWED_ORIGINS": " https://a.example , ,https://b.example,",
            "SERVICE_ALLOWED_HOSTS": "*.example.com",
        }
    )
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.allowed_hosts == ("*.example.com",)


def test_only_service_variables_are_read_and_the_test_suites_own_are_not() -> None:
    env = {"PORT": "1", "SERVICE_TEST_REDIS_URL": "redis://elsewhere", "SERVICEPORT": "2", "SERVICE_PORT": "3"}
    assert Settings.from_env(env) == Settings(port=3)


def test_the_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_SSE_RETRY_MS", "1500")
    assert Settings.from_env().sse_retry_ms == 1500


def test_a_misspelt_name_stops_start_up_naming_it() -> None:
    with pytest.raises(SettingsError, match="unknown setting SERVICE_RETENTION_S"):
        Settings.from_env({"SERVICE_RETENTION_S": "30"})


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("SERVICE_PORT", "eighty", "SERVICE_PORT: Expected `int`"),
        ("SERVICE_LOG_LEVEL", "loud", "SERVICE_LOG_LEVEL: Invalid enum value 'loud'"),
        ("SERVICE_DEMO", "maybe", "SERVICE_DEMO: Expected `bool | null`"),
        ("SERVICE_RUN_RETENTION_S", "0", "SERVICE_RUN_RETENTION_S must be > 0"),
        ("SERVICE_MAX_TOOL_ROUNDS", "-1", "SERVICE_MAX_TOOL_ROUNDS must be > 0"),
        ("SERVICE_SSE_RETRY_MS", "999", "SERVICE_SSE_RETRY_MS must be within 1000..60000"),
        ("SERVICE_SSE_RETRY_MS", "60001", "SERVICE_SSE_RETRY_MS must be within 1000..60000"),
        ("SERVICE_TOKEN_BUDGET", "-5", "SERVICE_RATE_LIMIT_PER_MINUTE and SERVICE_TOKEN_BUDGET cannot be negative"),
        ("SERVICE_RATE_LIMIT_PER_MINUTE", "-1", "SERVICE_RATE_LIMIT_PER_MINUTE and SERVICE_TOKEN_BUDGET cannot"),
        ("SERVICE_MODELS_CACHE_S", "0", "SERVICE_MODELS_CACHE_S must be > 0"),
        ("SERVICE_DEFAULT_MODEL", "openai/*", "SERVICE_DEFAULT_MODEL=openai/* is a wildcard, not a model"),
    ],
)
def test_a_bad_value_stops_start_up_naming_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError, match=f"^invalid setting: {re.escape(says)}"):
        Settings.from_env({name: value})


NEGATIVE = [
    "SERVICE_UPSTREAM_MAX_RETRIES",
    "SERVICE_DEMO_TOKEN_DELAY_MS",
    "SERVICE_SHUTDOWN_GRACE_S",
    "SERVICE_FINAL_WRITE_RETRY_S",
]


@pytest.mark.parametrize("name", NEGATIVE)
def test_a_negative_retry_count_delay_or_grace_period_stops_start_up(name: str) -> None:
    with pytest.raises(SettingsError, match="cannot be negative"):
        Settings.from_env({name: "-1"})


@pytest.mark.parametrize("name", NEGATIVE)
def test_a_negative_retry_count_delay_or_grace_period_is_named(name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: "-1"})


def test_the_edges_of_the_ranges_are_accepted() -> None:
    settings = Settings.from_env(
        {"SERVICE_SSE_RETRY_MS": "1000", "SERVICE_UPSTREAM_MAX_RETRIES": "0", "SERVICE_RATE_LIMIT_PER_MINUTE": "0"}
    )
    assert (settings.sse_retry_ms, settings.upstream_max_retries, settings.rate_limit_per_minute) == (1000, 0, 0)
    assert Settings.from_env({"SERVICE_SSE_RETRY_MS": "60000"}).sse_retry_ms == 60000


def test_jwt_with_redis_needs_a_stream_token_secret_shared_by_the_instances() -> None:
    env = {
        "SERVICE_AUTH": "jwt",
        "SERVICE_JWT_SECRET": "s" * 32,
        "SERVICE_JWT_AUDIENCE": "a",
        "SERVICE_REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    with pytest.raises(SettingsError, match="SERVICE_STREAM_TOKEN_SECRET"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "SERVICE_STREAM_TOKEN_SECRET": "t" * 32}).stream_token_secret == "t" * 32


@pytest.mark.parametrize("key", ["SERVICE_JWKS_URL", "SERVICE_JWT_PUBLIC_KEY"])
def test_a_public_key_without_an_algorithm_means_rs256(key: str) -> None:
    env = {"SERVICE_AUTH": "jwt", "SERVICE_JWT_AUDIENCE": "a", key: "https://id.example.com/jwks.json"}
    assert Settings.from_env(env).algorithm == "RS256"  # was refused: the check took HS256 for the default


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),  # all of 127/8
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),  # every interface
        ("::", False),
        ("192.168.1.2", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
