"""Settings of the gateway, read once from the environment and validated at start.

Every variable, its default and its meaning is listed in the README. No other
module reads ``os.environ``: the settings object is passed explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .resp import Address

T = TypeVar("T")

DEFAULT_USER_ID_FIELDS = ("id", "user_id", "uuid", "sub", "claims.sub", "user.id")
TOKEN_PLACEMENTS = ("bearer", "header", "cookie", "json", "query")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The live demo page and the JS client it loads, served with DEMO_PAGE=true. They are in
# a source checkout (clients/js), not in the image.
DEMO_ROOT = Path(__file__).resolve().parents[1] / "clients" / "js"


class ConfigError(ValueError):
    """A variable has a value the gateway cannot run with; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway can be told, with the defaults of the README."""

    host: str = "0.0.0.0"
    port: int = 8001
    workers: int = 1

    kafka_bootstrap_servers: str = "kafka-0:9092"
    kafka_topic: str = "notification.send"
    kafka_group_id: str = "notify-ws"
    kafka_dlq_topic: str = "notification.send.dlq"
    kafka_max_batch: int = 5000
    kafka_dlq_timeout: float = 30.0
    # Records fetched whose batches are not settled yet (written, acknowledged, stored or
    # dead-lettered): past it the consumer waits for the oldest before fetching more.
    kafka_max_in_flight: int = 20_000
    # Delivery status events (service.status); empty: none are produced.
    status_topic: str = ""

    database_url: str = "postgresql://notify:notify@127.0.0.1:5432/notify"
    database_pool_size: int = 10

    auth_mode: str = "remote"
    auth_verify_url: str = "http://auth_service_api:8000/api/v1/users/me"
    auth_method: str = "GET"
    auth_token_in: str = "bearer"  # noqa: S105 (where the token goes, not a token)
    auth_token_name: str = ""
    auth_valid_statuses: frozenset[int] = field(default_factory=frozenset)
    auth_user_id_field: str = ""
    auth_body_check: str = ""
    auth_timeout: float = 3.0
    auth_cache_ttl: float = 30.0
    auth_cache_size: int = 100_000
    auth_cache_refusals: int = 10_000
    auth_concurrency: int = 100
    auth_jwt_secret: str = ""
    auth_jwt_public_key: str = ""
    auth_jwt_jwks_url: str = ""
    auth_jwt_algorithms: tuple[str, ...] = ("HS256",)
    auth_jwt_user_id_claim: str = "sub"
    auth_jwt_issuer: str = ""
    auth_jwt_audience: str = ""
    auth_jwt_require_access_type: bool = False
    auth_close_on_expiry: bool = True

    backlog_ttl: float = 7 * 24 * 3600.0
    backlog_max_per_user: int = 1000
    backlog_cleanup_interval: float = 60.0
    retention_batch: int = 10_000
    # The per-user cap: a whole capped backlog is one page, one statement.
    flush_batch: int = 1000

    max_connections_per_user: int = 10
    max_connections: int = 100_000
    max_unauthenticated: int = 1000
    max_unauthenticated_per_address: int = 20
    proxies_count: int = 0
    handshake_timeout: float = 10.0
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    send_queue_size: int = 1000
    write_timeout: float = 10.0
    # v2: how long a written notification waits for its client's ack before it is stored.
    ack_wait: float = 2.0
    max_client_frame: int = 4096
    client_frame_rate: int = 20
    ping_interval: float = 20.0
    ping_timeout: float = 20.0

    shutdown_timeout: float = 10.0
    log_level: str = "INFO"
    demo_page: bool = False

    redis_url: str = ""
    redis_channel_prefix: str = "user:"

    @property
    def user_id_fields(self) -> tuple[str, ...]:
        """Where the remote auth answer holds the user id, in the order tried."""
        if self.auth_user_id_field:
            return (self.auth_user_id_field,)
        return DEFAULT_USER_ID_FIELDS

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from environment variables.

        Raises:
            ConfigError: a value is malformed or out of range; the message names
                the variable and never repeats a secret.
        """
        r = _Reader(env)
        d = cls()
        settings = cls(
            host=r.text("NOTIFY_HOST", d.host),
            port=r.integer("NOTIFY_PORT", d.port, 1, 65535),
            workers=r.integer("NOTIFY_WORKERS", d.workers, 1, 1024),
            kafka_bootstrap_servers=r.text("KAFKA_BOOTSTRAP_SERVERS", d.kafka_bootstrap_servers),
            kafka_topic=r.text("KAFKA_TOPIC", d.kafka_topic),
            kafka_group_id=r.text("KAFKA_GROUP_ID", d.kafka_group_id),
            kafka_dlq_topic=r.text("KAFKA_DLQ_TOPIC", d.kafka_dlq_topic, allow_empty=True),
            kafka_max_batch=r.integer("KAFKA_MAX_BATCH", d.kafka_max_batch, 1, 100_000),
            kafka_dlq_timeout=r.seconds("KAFKA_DLQ_TIMEOUT", d.kafka_dlq_timeout, minimum=0.1),
            kafka_max_in_flight=r.integer(
                "KAFKA_MAX_IN_FLIGHT", d.kafka_max_in_flight, 1, 10_000_000
            ),
            status_topic=r.text("STATUS_TOPIC", d.status_topic, allow_empty=True),
            database_url=r.dsn("DATABASE_URL", d.database_url),
            database_pool_size=r.integer("DATABASE_POOL_SIZE", d.database_pool_size, 2, 1000),
            auth_mode=r.choice("AUTH_MODE", d.auth_mode, ("remote", "jwt")),
            auth_verify_url=r.url("AUTH_VERIFY_URL", d.auth_verify_url),
            auth_method=r.choice("AUTH_METHOD", d.auth_method, ("GET", "POST")),
            auth_token_in=r.choice("AUTH_TOKEN_IN", d.auth_token_in, TOKEN_PLACEMENTS),
            auth_token_name=r.text("AUTH_TOKEN_NAME", d.auth_token_name, allow_empty=True),
            auth_valid_statuses=r.statuses("AUTH_VALID_STATUSES"),
            auth_user_id_field=r.text("AUTH_USER_ID_FIELD", "", allow_empty=True),
            auth_body_check=r.body_check("AUTH_BODY_CHECK"),
            auth_timeout=r.seconds("AUTH_TIMEOUT", d.auth_timeout, minimum=0.01),
            auth_cache_ttl=r.seconds("AUTH_CACHE_TTL", d.auth_cache_ttl),
            auth_cache_size=r.integer("AUTH_CACHE_SIZE", d.auth_cache_size, 0, 10_000_000),
            auth_cache_refusals=r.integer(
                "AUTH_CACHE_REFUSALS", d.auth_cache_refusals, 0, 10_000_000
            ),
            auth_concurrency=r.integer("AUTH_CONCURRENCY", d.auth_concurrency, 1, 10_000),
            auth_jwt_secret=r.text("AUTH_JWT_SECRET", "", allow_empty=True),
            auth_jwt_public_key=r.text("AUTH_JWT_PUBLIC_KEY", "", allow_empty=True),
            auth_jwt_jwks_url=r.text("AUTH_JWT_JWKS_URL", "", allow_empty=True),
            auth_jwt_algorithms=r.algorithms("AUTH_JWT_ALGORITHMS", d.auth_jwt_algorithms),
            auth_jwt_user_id_claim=r.text("AUTH_JWT_USER_ID_CLAIM", d.auth_jwt_user_id_claim),
            auth_jwt_issuer=r.text("AUTH_JWT_ISSUER", "", allow_empty=True),
            auth_jwt_audience=r.text("AUTH_JWT_AUDIENCE", "", allow_empty=True),
            auth_jwt_require_access_type=r.boolean("AUTH_JWT_REQUIRE_ACCESS_TYPE", False),
            auth_close_on_expiry=r.boolean("AUTH_CLOSE_ON_EXPIRY", d.auth_close_on_expiry),
            backlog_ttl=r.seconds("BACKLOG_TTL", d.backlog_ttl, minimum=1),
            backlog_max_per_user=r.integer(
                "BACKLOG_MAX_PER_USER", d.backlog_max_per_user, 1, 10**7
            ),
            backlog_cleanup_interval=r.seconds(
                "BACKLOG_CLEANUP_INTERVAL", d.backlog_cleanup_interval, minimum=0.1
            ),
            retention_batch=r.integer("RETENTION_BATCH", d.retention_batch, 1, 1_000_000),
            flush_batch=r.integer("FLUSH_BATCH", d.flush_batch, 1, 10_000),
            max_connections_per_user=r.integer(
                "MAX_CONNECTIONS_PER_USER", d.max_connections_per_user, 1, 100_000
            ),
            max_connections=r.integer("MAX_CONNECTIONS", d.max_connections, 1, 10_000_000),
            max_unauthenticated=r.integer(
                "MAX_UNAUTHENTICATED", d.max_unauthenticated, 1, 1_000_000
            ),
            max_unauthenticated_per_address=r.integer(
                "MAX_UNAUTHENTICATED_PER_ADDRESS", d.max_unauthenticated_per_address, 1, 1_000_000
            ),
            proxies_count=r.integer("PROXIES_COUNT", d.proxies_count, 0, 10),
            handshake_timeout=r.seconds("HANDSHAKE_TIMEOUT", d.handshake_timeout, minimum=0.1),
            allowed_origins=r.origins("ALLOWED_ORIGINS"),
            send_queue_size=r.integer("SEND_QUEUE_SIZE", d.send_queue_size, 1, 1_000_000),
            write_timeout=r.seconds("WRITE_TIMEOUT", d.write_timeout, minimum=0.1),
            ack_wait=r.seconds("ACK_WAIT", d.ack_wait, minimum=0.01),
            max_client_frame=r.integer("MAX_CLIENT_FRAME", d.max_client_frame, 125, 2**24),
            client_frame_rate=r.integer("CLIENT_FRAME_RATE", d.client_frame_rate, 1, 100_000),
            ping_interval=r.seconds("PING_INTERVAL", d.ping_interval, minimum=0.1),
            ping_timeout=r.seconds("PING_TIMEOUT", d.ping_timeout, minimum=0.1),
            shutdown_timeout=r.seconds("SHUTDOWN_TIMEOUT", d.shutdown_timeout, minimum=0.1),
            log_level=r.choice("LOG_LEVEL", d.log_level, LOG_LEVELS),
            demo_page=r.boolean("DEMO_PAGE", d.demo_page),
            redis_url=r.redis("REDIS_URL"),
            redis_channel_prefix=r.text("REDIS_CHANNEL_PREFIX", d.redis_channel_prefix),
        )
        settings._check_combinations()
        return settings

    def _check_combinations(self) -> None:
        if self.workers != 1 and not self.redis_url:
            raise ConfigError(
                "NOTIFY_WORKERS: more than 1 needs REDIS_URL; without Redis a message "
                "consumed by one process cannot reach a user connected to another "
                "(see README, 'Scaling')"
            )
        if self.auth_mode == "jwt":
            keys = [self.auth_jwt_secret, self.auth_jwt_public_key, self.auth_jwt_jwks_url]
            if sum(1 for key in keys if key) != 1:
                raise ConfigError(
                    "AUTH_MODE=jwt needs exactly one of AUTH_JWT_SECRET, AUTH_JWT_PUBLIC_KEY, "
                    "AUTH_JWT_JWKS_URL"
                )
            symmetric = all(alg.startswith("HS") for alg in self.auth_jwt_algorithms)
            if self.auth_jwt_secret and not symmetric:
                raise ConfigError("AUTH_JWT_ALGORITHMS: a secret works only with HS256/HS384/HS512")
            if not self.auth_jwt_secret and any(
                a.startswith("HS") for a in self.auth_jwt_algorithms
            ):
                raise ConfigError(
                    "AUTH_JWT_ALGORITHMS: HS* algorithms need AUTH_JWT_SECRET, not a public key"
                )
        if self.demo_page and not (DEMO_ROOT / "demo" / "index.html").is_file():
            raise ConfigError(
                "DEMO_PAGE: the page is served from a source checkout (clients/js), "
                "which this installation does not have; the image does not ship it"
            )
        if self.auth_token_in in ("header", "cookie", "json", "query") and not self.auth_token_name:
            raise ConfigError(f"AUTH_TOKEN_NAME: required when AUTH_TOKEN_IN={self.auth_token_in}")


@dataclass(frozen=True, slots=True)
class KafkaTarget:
    """Where notifications go: the only settings ``python -m service send`` needs.

    Read like :class:`Settings` reads them (same variables, defaults and errors), but
    without validating the rest: a producer run beside a gateway's environment must not
    fail on a setting it never uses.
    """

    bootstrap_servers: str
    topic: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KafkaTarget:
        """``KAFKA_BOOTSTRAP_SERVERS`` and ``KAFKA_TOPIC``; raises :class:`ConfigError`."""
        r = _Reader(env)
        d = Settings()
        return cls(
            bootstrap_servers=r.text("KAFKA_BOOTSTRAP_SERVERS", d.kafka_bootstrap_servers),
            topic=r.text("KAFKA_TOPIC", d.kafka_topic),
        )


class _Reader:
    """Parses one variable at a time, naming it in every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None:
            return None
        return value.strip()

    def _parse(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self._raw(name)
        if raw is None or raw == "":
            return default
        return parse(raw)

    def text(self, name: str, default: str, *, allow_empty: bool = False) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if not raw and not allow_empty:
            raise ConfigError(f"{name}: must not be empty")
        return raw

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        def parse(raw: str) -> int:
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
            if not low <= value <= high:
                raise ConfigError(f"{name}: must be between {low} and {high}, got {value}")
            return value

        return self._parse(name, default, parse)

    def seconds(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        def parse(raw: str) -> float:
            match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", raw)
            if match is None:
                raise ConfigError(
                    f"{name}: expected a duration (30, 2.5s, 500ms, 5m, 12h, 7d), got {raw!r}"
                )
            unit = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
            value = float(match.group(1)) * unit
            if value < minimum:
                raise ConfigError(f"{name}: must be at least {minimum} s, got {raw!r}")
            return value

        return self._parse(name, default, parse)

    def boolean(self, name: str, default: bool) -> bool:
        def parse(raw: str) -> bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}: expected true or false, got {raw!r}")

        return self._parse(name, default, parse)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(raw: str) -> str:
            for choice in choices:
                if raw.lower() == choice.lower():
                    return choice
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")

        return self._parse(name, default, parse)

    def url(self, name: str, default: str) -> str:
        def parse(raw: str) -> str:
            if not re.match(r"https?://[^/\s]+", raw):
                raise ConfigError(f"{name}: expected an http:// or https:// URL")
            return raw

        return self._parse(name, default, parse)

    def dsn(self, name: str, default: str) -> str:
        def parse(raw: str) -> str:
            if not re.match(r"postgres(ql)?://", raw):
                # The DSN holds a password: never echo it.
                raise ConfigError(f"{name}: expected a postgresql:// URL")
            return raw

        return self._parse(name, default, parse)

    def redis(self, name: str) -> str:
        def parse(raw: str) -> str:
            try:
                Address.parse(raw)
            except ValueError as exc:
                # The URL may hold a password: the message never echoes it.
                raise ConfigError(f"{name}: {exc}") from None
            return raw

        return self._parse(name, "", parse)

    def statuses(self, name: str) -> frozenset[int]:
        def parse(raw: str) -> frozenset[int]:
            try:
                codes = frozenset(int(part) for part in raw.split(",") if part.strip())
            except ValueError:
                raise ConfigError(f"{name}: expected HTTP status codes such as 200,202") from None
            if not codes or any(not 100 <= code <= 599 for code in codes):
                raise ConfigError(f"{name}: expected HTTP status codes such as 200,202")
            return codes

        return self._parse(name, frozenset(), parse)

    def body_check(self, name: str) -> str:
        def parse(raw: str) -> str:
            if not re.fullmatch(r"[\w.]+(\s*==\s*\S+)?", raw):
                raise ConfigError(
                    f"{name}: expected a field (is_valid) or field==value (status==valid)"
                )
            return raw

        return self._parse(name, "", parse)

    def algorithms(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        known = {
            "HS256",
            "HS384",
            "HS512",
            "RS256",
            "RS384",
            "RS512",
            "ES256",
            "ES384",
            "ES512",
            "PS256",
            "PS384",
            "PS512",
            "EdDSA",
        }

        def parse(raw: str) -> tuple[str, ...]:
            algs = tuple(part.strip() for part in raw.split(",") if part.strip())
            unknown = [alg for alg in algs if alg not in known]
            if not algs or unknown:
                raise ConfigError(
                    f"{name}: unknown algorithm(s) {unknown}; use e.g. HS256 or RS256"
                )
            return algs

        return self._parse(name, default, parse)

    def origins(self, name: str) -> frozenset[str]:
        def parse(raw: str) -> frozenset[str]:
            return frozenset(part.strip().rstrip("/") for part in raw.split(",") if part.strip())

        return self._parse(name, frozenset(), parse)
