"""Settings from the environment: documented defaults, durations, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, Settings


def test_defaults_match_the_documented_ones() -> None:
    """With no variables set the gateway runs with the defaults the README promises."""
    s = Settings.from_env({})
    assert s.port == 8001
    assert s.workers == 1
    assert s.kafka_topic == "notification.send"
    assert s.kafka_group_id == "notify-ws"
    assert s.kafka_dlq_topic == "notification.send.dlq"
    assert s.auth_mode == "remote"
    assert s.auth_verify_url == "http://auth_service_api:8000/api/v1/users/me"
    assert s.auth_token_in == "bearer"
    assert s.backlog_ttl == 7 * 24 * 3600
    assert s.backlog_max_per_user == 1000
    assert s.retention_batch == 10_000
    assert s.max_connections_per_user == 10
    assert s.user_id_fields == ("id", "user_id", "uuid", "sub", "claims.sub", "user.id")
    assert s.auth_cache_refusals == 10_000
    assert s.auth_concurrency == 100
    assert s.max_unauthenticated == 1000
    assert s.max_unauthenticated_per_address == 20
    assert s.proxies_count == 0
    assert s.handshake_timeout == 10.0


def test_values_are_read_from_the_environment() -> None:
    """Variables an operator sets override the defaults."""
    s = Settings.from_env(
        {
            "NOTIFY_PORT": "9001",
            "KAFKA_TOPIC": "other.topic",
            "KAFKA_GROUP_ID": "g2",
            "MAX_CONNECTIONS_PER_USER": "3",
            "AUTH_USER_ID_FIELD": "data.account_id",
            "AUTH_VALID_STATUSES": "200, 202",
            "ALLOWED_ORIGINS": "https://cinema.example/, https://admin.example",
        }
    )
    assert s.port == 9001
    assert s.kafka_topic == "other.topic"
    assert s.kafka_group_id == "g2"
    assert s.max_connections_per_user == 3
    assert s.user_id_fields == ("data.account_id",)
    assert s.auth_valid_statuses == frozenset({200, 202})
    assert s.allowed_origins == frozenset({"https://cinema.example", "https://admin.example"})


@pytest.mark.parametrize(
    ("name", "raw", "seconds"),
    [
        ("AUTH_TIMEOUT", "500ms", 0.5),
        ("AUTH_CACHE_TTL", "5m", 300.0),
        ("BACKLOG_TTL", "7d", 7 * 86400.0),
        ("BACKLOG_TTL", "12h", 12 * 3600.0),
        ("WRITE_TIMEOUT", "2.5s", 2.5),
        ("SHUTDOWN_TIMEOUT", "30", 30.0),
        ("HANDSHAKE_TIMEOUT", "2s", 2.0),
    ],
)
def test_durations_accept_units(name: str, raw: str, seconds: float) -> None:
    """A duration may be written with a unit (ms, s, m, h, d) or as plain seconds."""
    s = Settings.from_env({name: raw})
    assert getattr(s, name.lower()) == pytest.approx(seconds)


def test_empty_dlq_topic_disables_dead_lettering() -> None:
    """KAFKA_DLQ_TOPIC set to empty turns the dead-letter topic off instead of failing."""
    assert Settings.from_env({"KAFKA_DLQ_TOPIC": ""}).kafka_dlq_topic == ""


def test_jwt_mode_with_a_secret_is_accepted() -> None:
    """AUTH_MODE=jwt with an HS256 secret is a valid configuration."""
    s = Settings.from_env({"AUTH_MODE": "JWT", "AUTH_JWT_SECRET": "s" * 32})
    assert s.auth_mode == "jwt"
    assert s.auth_jwt_algorithms == ("HS256",)


def test_jwt_mode_with_a_public_key_and_rs256_is_accepted() -> None:
    """AUTH_MODE=jwt with a public key and RS256 is a valid configuration."""
    s = Settings.from_env(
        {
            "AUTH_MODE": "jwt",
            "AUTH_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----...",
            "AUTH_JWT_ALGORITHMS": "RS256",
        }
    )
    assert s.auth_jwt_algorithms == ("RS256",)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"NOTIFY_PORT": "http"}, "NOTIFY_PORT"),
        ({"NOTIFY_PORT": "0"}, "NOTIFY_PORT"),
        ({"NOTIFY_PORT": "70000"}, "NOTIFY_PORT"),
        ({"AUTH_CLOSE_ON_EXPIRY": "maybe"}, "AUTH_CLOSE_ON_EXPIRY"),
        ({"AUTH_JWT_REQUIRE_ACCESS_TYPE": "2"}, "AUTH_JWT_REQUIRE_ACCESS_TYPE"),
        ({"NOTIFY_WORKERS": "2"}, "NOTIFY_WORKERS"),
        ({"AUTH_MODE": "jwt"}, "AUTH_JWT_SECRET"),
        ({"AUTH_MODE": "ldap"}, "AUTH_MODE"),
        (
            {"AUTH_MODE": "jwt", "AUTH_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----..."},
            "AUTH_JWT_ALGORITHMS",
        ),
        (
            {"AUTH_MODE": "jwt", "AUTH_JWT_SECRET": "s" * 32, "AUTH_JWT_ALGORITHMS": "RS256"},
            "AUTH_JWT_ALGORITHMS",
        ),
        ({"AUTH_JWT_ALGORITHMS": "none"}, "AUTH_JWT_ALGORITHMS"),
        ({"AUTH_TOKEN_IN": "header"}, "AUTH_TOKEN_NAME"),
        ({"AUTH_TOKEN_IN": "cookie"}, "AUTH_TOKEN_NAME"),
        ({"AUTH_TOKEN_IN": "pigeon"}, "AUTH_TOKEN_IN"),
        ({"AUTH_VERIFY_URL": "auth_service_api:8000/me"}, "AUTH_VERIFY_URL"),
        ({"AUTH_VALID_STATUSES": "ok"}, "AUTH_VALID_STATUSES"),
        ({"AUTH_VALID_STATUSES": "200,999"}, "AUTH_VALID_STATUSES"),
        ({"AUTH_BODY_CHECK": "is valid?"}, "AUTH_BODY_CHECK"),
        ({"AUTH_TIMEOUT": "0"}, "AUTH_TIMEOUT"),
        ({"BACKLOG_TTL": "a week"}, "BACKLOG_TTL"),
        ({"BACKLOG_TTL": "-1d"}, "BACKLOG_TTL"),
        ({"BACKLOG_MAX_PER_USER": "0"}, "BACKLOG_MAX_PER_USER"),
        ({"RETENTION_BATCH": "0"}, "RETENTION_BATCH"),
        ({"MAX_CONNECTIONS_PER_USER": "ten"}, "MAX_CONNECTIONS_PER_USER"),
        ({"KAFKA_TOPIC": " "}, "KAFKA_TOPIC"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"DATABASE_URL": "mysql://notify@db/notify"}, "DATABASE_URL"),
        ({"REDIS_URL": "redis://:hunter2@redis:port"}, "REDIS_URL"),
        ({"REDIS_URL": "http://redis:6379"}, "REDIS_URL"),
        ({"AUTH_CACHE_REFUSALS": "-1"}, "AUTH_CACHE_REFUSALS"),
        ({"AUTH_CONCURRENCY": "0"}, "AUTH_CONCURRENCY"),
        ({"MAX_UNAUTHENTICATED": "0"}, "MAX_UNAUTHENTICATED"),
        ({"MAX_UNAUTHENTICATED_PER_ADDRESS": "none"}, "MAX_UNAUTHENTICATED_PER_ADDRESS"),
        ({"PROXIES_COUNT": "11"}, "PROXIES_COUNT"),
        ({"HANDSHAKE_TIMEOUT": "0"}, "HANDSHAKE_TIMEOUT"),
    ],
)
def test_a_wrong_value_is_refused_naming_the_variable(env: dict[str, str], variable: str) -> None:
    """A wrong value stops the start with a message that names the variable to fix."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert variable in str(raised.value)


def test_database_url_error_never_shows_the_password() -> None:
    """A malformed DATABASE_URL is reported without repeating the password it holds."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"DATABASE_URL": "mysql://notify:Hunter2-secret@db:5432/notify"})
    assert "DATABASE_URL" in str(raised.value)
    assert "Hunter2-secret" not in str(raised.value)
    assert "Hunter2-secret" not in repr(raised.value.args)


def test_demo_page_is_off_by_default_and_validated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DEMO_PAGE is off unless asked; a bad value, or the page's files missing (an
    installation without the source checkout), stops the start naming DEMO_PAGE."""
    assert Settings.from_env({}).demo_page is False
    assert Settings.from_env({"DEMO_PAGE": "true"}).demo_page is True
    with pytest.raises(ConfigError, match="DEMO_PAGE"):
        Settings.from_env({"DEMO_PAGE": "maybe"})
    monkeypatch.setattr("service.config.DEMO_ROOT", tmp_path)
    with pytest.raises(ConfigError, match="DEMO_PAGE"):
        Settings.from_env({"DEMO_PAGE": "true"})
    assert Settings.from_env({"DEMO_PAGE": "false"}).demo_page is False
