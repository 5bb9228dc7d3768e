"""The deploy files (Dockerfile, .dockerignore, docker-compose*.yml) against the README.

No Docker engine is needed: the files are parsed and checked for the facts the
platform's scenario depends on, and ``scripts/lint-docker.sh`` lints them.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.config import Settings
from service.limits import FD_MARGIN

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCALE_FILE = ROOT / "docker-compose.scale.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
LINT_SCRIPT = ROOT / "scripts" / "lint-docker.sh"
CONFIG_SOURCE = ROOT / "service" / "config.py"

GATEWAY = "notify-ws"
KAFKA = "kafka-0"
KAFKA_BIN = "/opt/bitnami/kafka/bin"
SHARED_NETWORK = "tv-shared-network"


# ---- helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as plain data."""
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services of docker-compose.yml by name."""
    result = compose.get("services")
    assert isinstance(result, dict)
    return result


def _environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) for item in raw)
        return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}
    return {str(key): str(value) for key, value in raw.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def _words(value: Any) -> str:
    """A command, entrypoint or healthcheck test as one string, whichever form it has."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)


def _networks(service: dict[str, Any]) -> set[str]:
    raw = service.get("networks") or []
    return set(raw)


def _image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else ""


def _config_variables() -> set[str]:
    """Names of the environment variables that service/config.py reads."""
    source = CONFIG_SOURCE.read_text(encoding="utf-8")
    names = set(re.findall(r'\b\w+\.\w+\(\s*"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)"', source))
    assert {"DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "AUTH_VERIFY_URL"} <= names
    return names


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile as ``(INSTRUCTION, arguments)``, continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _base_image() -> str:
    """The Python base image, with ``ARG`` defaults substituted."""
    instructions = _dockerfile_instructions()
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
    first_from = next(rest for keyword, rest in instructions if keyword == "FROM")
    image = first_from.split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


# ---- docker-compose.yml --------------------------------------------------------------


def test_compose_has_the_services_of_the_scenario(services: dict[str, dict[str, Any]]) -> None:
    """Kafka, PostgreSQL, the one-shot migration and the gateway are all services."""
    assert {KAFKA, "postgres", "migrate", GATEWAY} <= set(services)


def test_gateway_publishes_port_8001(services: dict[str, dict[str, Any]]) -> None:
    """The gateway's port 8001 is published as 8001 on the host."""
    ports = [str(port) for port in services[GATEWAY].get("ports", [])]
    assert "8001:8001" in ports


def test_shared_network_is_external_and_joined_by_the_gateway(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """tv-shared-network is external and the gateway is on it and on its own network."""
    networks = compose.get("networks") or {}
    assert networks.get(SHARED_NETWORK, {}).get("external") is True
    assert _networks(services[GATEWAY]) >= {SHARED_NETWORK, "notify_network"}


def test_only_the_gateway_joins_the_shared_network(services: dict[str, dict[str, Any]]) -> None:
    """Kafka, PostgreSQL and the migration stay off the platform-wide network."""
    others = [name for name, svc in services.items() if SHARED_NETWORK in _networks(svc)]
    assert others == [GATEWAY]


def test_kafka_is_a_single_kraft_node_under_bitnamilegacy(
    services: dict[str, dict[str, Any]],
) -> None:
    """kafka-0 runs a pinned bitnamilegacy image as a KRaft controller+broker at kafka-0:9092."""
    kafka = services[KAFKA]
    assert kafka["image"].startswith("bitnamilegacy/kafka:")
    assert _image_tag(kafka["image"]) not in ("", "latest")
    env = _environment(kafka)
    assert set(env["KAFKA_CFG_PROCESS_ROLES"].split(",")) == {"controller", "broker"}
    assert env["KAFKA_CFG_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_CFG_NODE_ID']}@kafka-0:9093"
    assert set(env["KAFKA_CFG_LISTENERS"].split(",")) == {
        "PLAINTEXT://:9092",
        "CONTROLLER://:9093",
    }
    assert env["KAFKA_CFG_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka-0:9092"
    assert env["KAFKA_CFG_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert env["KAFKA_CFG_AUTO_CREATE_TOPICS_ENABLE"] == "true"


def test_kafka_healthcheck_lists_topics_with_the_bitnami_tools(
    services: dict[str, dict[str, Any]],
) -> None:
    """kafka-0 is healthy once kafka-topics.sh from /opt/bitnami/kafka/bin lists topics."""
    test = _words(services[KAFKA]["healthcheck"]["test"])
    assert f"{KAFKA_BIN}/kafka-topics.sh" in test
    assert "--bootstrap-server kafka-0:9092" in test
    assert "--list" in test


def test_kafka_init_creates_the_input_and_dead_letter_topics(
    services: dict[str, dict[str, Any]],
) -> None:
    """A one-shot on the same image creates notification.send with 3 partitions and its DLQ."""
    init = services["kafka-init"]
    assert init["image"] == services[KAFKA]["image"]
    assert _depends_on(init) == {KAFKA: "service_healthy"}
    script = _words(init.get("entrypoint")) + " " + _words(init.get("command"))
    commands = [part for part in re.split(r"&&|;|\n", script) if "--create" in part]
    created = {}
    for command in commands:
        words = shlex.split(command)
        assert words[0].startswith(KAFKA_BIN) or f"{KAFKA_BIN}/kafka-topics.sh" in words
        topic = words[words.index("--topic") + 1]
        partitions = words[words.index("--partitions") + 1] if "--partitions" in words else None
        created[topic] = partitions
    assert created.get("notification.send") == "3"
    assert "notification.send.dlq" in created
    assert str(init.get("restart", "no")) == "no"


def test_postgres_has_a_volume_the_notify_account_and_pg_isready(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    """PostgreSQL keeps its data in a named volume, with user, password and db all notify."""
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert _image_tag(postgres["image"]) not in ("", "latest")
    env = _environment(postgres)
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]) == ("notify",) * 3
    assert "pg_isready" in _words(postgres["healthcheck"]["test"])
    volumes = [str(volume).split(":", 1)[0] for volume in postgres.get("volumes", [])]
    assert any(volume in (compose.get("volumes") or {}) for volume in volumes)


def test_migrate_runs_alembic_upgrade_head_from_the_gateway_image(
    services: dict[str, dict[str, Any]],
) -> None:
    """migrate, built like the gateway, runs `alembic upgrade head` once PostgreSQL is healthy."""
    migrate, gateway = services["migrate"], services[GATEWAY]
    command = _words(migrate.get("entrypoint")) + " " + _words(migrate.get("command"))
    assert "alembic upgrade head" in command
    assert migrate["build"] == gateway["build"]
    assert _depends_on(migrate).get("postgres") == "service_healthy"
    assert _environment(migrate)["DATABASE_URL"] == _environment(gateway)["DATABASE_URL"]
    assert str(migrate.get("restart", "no")) == "no"


def test_gateway_waits_for_the_migration_kafka_and_postgres(
    services: dict[str, dict[str, Any]],
) -> None:
    """The gateway starts after a successful migration, a healthy Kafka and a healthy PostgreSQL."""
    depends = _depends_on(services[GATEWAY])
    assert depends["migrate"] == "service_completed_successfully"
    assert depends["postgres"] == "service_healthy"
    assert (
        depends.get(KAFKA) == "service_healthy"
        or depends.get("kafka-init") == "service_completed_successfully"
    )


def test_gateway_points_at_the_compose_kafka_postgres_and_auth_service(
    services: dict[str, dict[str, Any]],
) -> None:
    """The gateway uses kafka-0:9092, the postgres service and the auth service auth_service_api."""
    env = _environment(services[GATEWAY])
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka-0:9092"
    assert env["DATABASE_URL"] == "postgresql://notify:notify@postgres:5432/notify"
    auth = urlsplit(env["AUTH_VERIFY_URL"])
    assert auth.hostname == "auth_service_api"
    assert env["AUTH_VERIFY_URL"] == "http://auth_service_api:8000/api/v1/users/me"


def test_every_gateway_variable_is_read_by_the_settings(
    services: dict[str, dict[str, Any]],
) -> None:
    """Every variable compose sets on the gateway's image is one that service/config.py reads."""
    known = _config_variables()
    for name in (GATEWAY, "migrate"):
        unknown = set(_environment(services[name])) - known
        assert not unknown, f"{name} sets variables the gateway never reads: {sorted(unknown)}"


def test_gateway_is_checked_restarted_and_kept_to_one_replica(
    services: dict[str, dict[str, Any]],
) -> None:
    """The gateway is health-checked on /health/ready, restarted unless stopped, and not scaled."""
    gateway = services[GATEWAY]
    assert "/health/ready" in _words(gateway["healthcheck"]["test"])
    assert gateway["restart"] == "unless-stopped"
    assert gateway.get("deploy", {}).get("replicas", 1) == 1
    assert gateway["build"] in (".", {"context": ".", "dockerfile": "Dockerfile"})


def test_compose_names_the_seed_producer_command_target(
    services: dict[str, dict[str, Any]],
) -> None:
    """The seed's `docker compose exec kafka-0 .../kafka-console-producer.sh` finds its service."""
    kafka = services[KAFKA]
    assert "PLAINTEXT://kafka-0:9092" in _environment(kafka)["KAFKA_CFG_ADVERTISED_LISTENERS"]
    assert kafka.get("hostname", KAFKA) == KAFKA
    assert kafka.get("deploy", {}).get("replicas", 1) == 1
    assert "/opt/bitnami/kafka/bin/" in _words(kafka["healthcheck"]["test"])


def test_gateway_may_open_a_descriptor_per_connection(
    services: dict[str, dict[str, Any]],
) -> None:
    """The gateway's open-file limit holds MAX_CONNECTIONS sockets plus its own descriptors."""
    nofile = services[GATEWAY]["ulimits"]["nofile"]
    needed = Settings().max_connections + FD_MARGIN
    assert int(nofile["soft"]) >= needed
    assert int(nofile["hard"]) >= needed


# ---- docker-compose.scale.yml: the load balancer ------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's ``!reset`` / ``!override`` tags (taken as plain values)."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_sequence(node)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_scalar(node)
        ),
    )


@pytest.fixture(scope="module")
def scale() -> dict[str, Any]:
    data = yaml.load(SCALE_FILE.read_text(encoding="utf-8"), Loader=_ComposeLoader)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def nginx(scale: dict[str, Any]) -> str:
    """The load balancer's nginx.conf as nginx reads it: ``$$`` unescaped, comments dropped."""
    lb = scale["services"]["notify-lb"]
    (config,) = lb["configs"]
    assert config["target"] == "/etc/nginx/nginx.conf"  # the whole file: events{} included
    text = scale["configs"][config["source"]]["content"].replace("$$", "$")
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _directives(nginx: str, name: str) -> list[str]:
    """The arguments of every ``name ...;`` directive, however many lines each spans."""
    return [m.strip() for m in re.findall(rf"(?:^|[;{{}}\s]){name}\s+([^;{{}}]*);", nginx)]


def _one_number(nginx: str, name: str) -> int:
    (value,) = _directives(nginx, name)
    assert value.isdigit(), f"{name} {value}: a number, so that the capacity can be checked"
    return int(value)


def test_load_balancer_logs_no_query_string(nginx: str) -> None:
    """The token travels in ?token=: no log line of nginx may hold the query string."""
    formats = {}
    for arguments in _directives(nginx, "log_format"):
        name, _, body = arguments.partition(" ")
        variables = set(re.findall(r"\$(\w+)", body))
        leaking = {v for v in variables if v in _QUERY_VARIABLES or v.startswith("arg_")}
        assert not leaking, f"log_format {name} logs {sorted(leaking)}"
        formats[name] = body
    access_logs = _directives(nginx, "access_log")
    # Without an access_log nginx writes the 'combined' format, $request and all.
    assert access_logs
    for arguments in access_logs:
        words = arguments.split()
        assert words == ["off"] or (len(words) >= 2 and words[1] in formats), arguments
    # The error log quotes the request line on every request-level message (error, warn...).
    (error_log,) = _directives(nginx, "error_log")
    assert error_log.split()[-1] in ("crit", "alert", "emerg")


_QUERY_VARIABLES = {"request", "request_uri", "args", "query_string", "is_args"}


def test_load_balancer_has_room_for_every_gateway_connection(
    scale: dict[str, Any], nginx: str
) -> None:
    """Two connections per WebSocket (client and gateway) for every gateway at MAX_CONNECTIONS."""
    replicas = int(scale["services"][GATEWAY]["deploy"]["replicas"])
    websockets = replicas * Settings().max_connections
    workers = _one_number(nginx, "worker_processes")
    per_worker = _one_number(nginx, "worker_connections")
    assert workers * per_worker >= 2 * websockets
    rlimit = _one_number(nginx, "worker_rlimit_nofile")
    assert rlimit >= per_worker
    nofile = scale["services"]["notify-lb"]["ulimits"]["nofile"]
    assert int(nofile["hard"]) >= rlimit  # nginx cannot raise a worker's limit past it


def test_load_balancer_does_not_publish_metrics(nginx: str) -> None:
    """/metrics (and anything under it) is answered 404 by nginx, never proxied."""
    blocks = re.findall(r"location\s+(\^~|=)?\s*(/metrics\S*)\s*\{([^}]*)\}", nginx)
    assert any(
        modifier == "^~" and path == "/metrics" and re.search(r"return\s+404|deny\s+all", body)
        for modifier, path, body in blocks
    ), blocks


# ---- Dockerfile and .dockerignore -----------------------------------------------------


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python_311() -> None:
    """The Dockerfile has at least two stages, on a slim Python 3.11 image pinned by tag."""
    froms = [rest for keyword, rest in _dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) >= 2
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", _base_image())


def test_dockerfile_installs_the_lock_then_the_package_in_a_venv() -> None:
    """The builder installs requirements.lock, then the package itself without dependencies."""
    runs = [rest for keyword, rest in _dockerfile_instructions() if keyword == "RUN"]
    assert any("venv" in run for run in runs)
    lock = next(i for i, run in enumerate(runs) if "-r requirements.lock" in run)
    package = next(i for i, run in enumerate(runs) if re.search(r"--no-deps\b.*\s\.$", run))
    assert lock < package


def test_dockerfile_runs_the_gateway_as_a_non_root_user() -> None:
    """The final stage switches to a user that is not root before it starts the gateway."""
    users = [rest for keyword, rest in _final_stage() if keyword == "USER"]
    assert users, "the final stage never sets USER"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0")


def test_dockerfile_exposes_8001_with_a_python_healthcheck_on_live() -> None:
    """The image exposes 8001 and checks /health/live with Python (slim has no curl)."""
    final = _final_stage()
    exposed = {port for keyword, rest in final if keyword == "EXPOSE" for port in rest.split()}
    assert "8001" in exposed or "8001/tcp" in exposed
    checks = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "http://127.0.0.1:8001/health/live" in checks[0]
    assert "python" in checks[0]
    assert "curl" not in checks[0]


def test_dockerfile_starts_python_m_service_unbuffered() -> None:
    """The image runs `python -m service` with PYTHONUNBUFFERED=1."""
    final = _final_stage()
    start = " ".join(rest for keyword, rest in final if keyword in ("ENTRYPOINT", "CMD"))
    assert re.search(r'python"?,?\s*"?-m"?,?\s*"?service\b', start)
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)


def test_dockerfile_copies_only_the_runtime_files() -> None:
    """The image gets the venv, service/, migrations/, alembic.ini; never dev/, tests/, bench/."""
    copies = [rest for keyword, rest in _dockerfile_instructions() if keyword in ("COPY", "ADD")]
    sources = [
        word.rstrip("/")
        for rest in copies
        for word in rest.split()[:-1]
        if not word.startswith("--")
    ]
    for forbidden in ("dev", "tests", "bench", "docs", "."):
        assert forbidden not in sources, f"the Dockerfile copies {forbidden}"
    final = " ".join(rest for keyword, rest in _final_stage() if keyword == "COPY")
    for needed in ("service/", "migrations/", "alembic.ini", "--from=builder /opt/venv"):
        assert needed in final


def test_dockerignore_keeps_the_context_small_and_clean() -> None:
    """.dockerignore leaves out VCS, venvs, caches, tests, benchmarks, dev tools and docs."""
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    required = {".git", ".venv", ".cache", "tests", "bench", "dev", "docs"}
    assert required <= entries
    assert {"**/__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"} <= entries
    for kept in ("service", "migrations", "alembic.ini", "requirements.lock", "pyproject.toml"):
        assert kept not in entries and f"!{kept}" not in entries


# ---- the linter ------------------------------------------------------------------------


def _lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(LINT_SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_lint_script_passes_on_the_deploy_files() -> None:
    """scripts/lint-docker.sh (hadolint and `docker compose config`) finds no problem."""
    result = _lint()
    output = result.stdout + result.stderr
    if "hadolint unavailable" in output:
        pytest.skip(f"hadolint could not be obtained: {output.strip()}")
    assert result.returncode == 0, output


def test_lint_script_fails_on_a_bad_dockerfile_and_compose_file(tmp_path: Path) -> None:
    """scripts/lint-docker.sh exits non-zero when the files it checks have problems."""
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:latest\nCMD python -m service\n", encoding="utf-8")
    result = _lint(str(dockerfile), str(COMPOSE_FILE))
    output = result.stdout + result.stderr
    if "hadolint unavailable" in output:
        pytest.skip(f"hadolint could not be obtained: {output.strip()}")
    assert result.returncode == 1, output
    assert "DL3007" in output

    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text("services:\n  a:\n    image: x\n    portz: [1]\n", encoding="utf-8")
    result = _lint(str(DOCKERFILE), str(compose_file))
    output = result.stdout + result.stderr
    if "docker compose unavailable" in output:
        return
    assert result.returncode == 1, output
