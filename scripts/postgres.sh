#!/usr/bin/env bash
# A private PostgreSQL cluster for development and tests: installed from Debian's
# packages when missing, kept under .cache/postgres, listening on loopback only.
#
#   scripts/postgres.sh start|stop|status|dsn|psql|reset|where
#
# Knobs: PG_PORT (5432), PG_DB (notify), PG_USER (notify), PG_PASSWORD (notify),
#        PG_CACHE (<repo>/.cache/postgres).
#
# As root, the server runs as the package's `postgres` user, which must reach the
# cluster's directory. A checkout inside a home directory (0700, such as /root) is out
# of its reach: then the cluster lives in the postgres user's home instead, under
# notify-ws/<checkout name>-<hash of PG_CACHE>, so two checkouts never share one.
# `scripts/postgres.sh where` prints the directory in use.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_PORT=${PG_PORT:-5432}
PG_DB=${PG_DB:-notify}
PG_USER=${PG_USER:-notify}
PG_PASSWORD=${PG_PASSWORD:-notify}
PG_CACHE=$(realpath -m "${PG_CACHE:-$ROOT/.cache/postgres}")

usage() { echo "usage: $0 start|stop|status|dsn|psql|reset|where" >&2; exit 2; }

dsn() { echo "postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"; }

bindir() {
    # The newest installed server version wins.
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

install_server() {
    [ -n "$(bindir)" ] && [ -x "$(bindir)/initdb" ] && return 0
    echo "postgres: installing the server from Debian packages"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
}

# PostgreSQL refuses to run as root; as root we run it as the package's postgres user
# (from /: the current directory may be out of its reach, and every path here is absolute).
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# Where the cluster lives: PG_CACHE, unless the postgres user cannot reach it (see above).
place_cluster() {
    HOME_DIR=$PG_CACHE
    if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1; then
        mkdir -p "$PG_CACHE"
        if ! runuser -u postgres -- test -x "$PG_CACHE" 2>/dev/null; then
            local base digest
            base=$(getent passwd postgres | cut -d: -f6)
            digest=$(printf '%s' "$PG_CACHE" | sha256sum | cut -c1-12)
            HOME_DIR=$base/notify-ws/$(basename "$ROOT")-$digest
            mkdir -p "$HOME_DIR"
            chown postgres: "$base/notify-ws" "$HOME_DIR"
        fi
    fi
    DATA=$HOME_DIR/data
    RUN=$HOME_DIR/run
    LOG=$HOME_DIR/postgres.log
}

is_running() { [ -f "$DATA/postmaster.pid" ] && as_owner "$(bindir)/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

init_cluster() {
    [ -f "$DATA/PG_VERSION" ] && return 0
    mkdir -p "$HOME_DIR" "$RUN"
    [ "$(id -u)" -eq 0 ] && chown -R postgres: "$HOME_DIR"
    as_owner "$(bindir)/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 >/dev/null
    # Tuned for a throwaway test cluster: durability is not the point here.
    cat >>"$DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$RUN'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
}

wait_ready() {
    for _ in $(seq 1 60); do
        as_owner "$(bindir)/pg_isready" -q -h "$RUN" -p "$PG_PORT" && return 0
        sleep 0.5
    done
    echo "postgres: did not become ready; see $LOG" >&2
    return 1
}

psql_admin() { as_owner "$(bindir)/../bin/psql" -h "$RUN" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }

create_role_and_db() {
    if [ -z "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'" postgres)" ]; then
        psql_admin -c "CREATE ROLE \"$PG_USER\" LOGIN PASSWORD '$PG_PASSWORD' CREATEDB" postgres
    fi
    if [ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" postgres)" ]; then
        psql_admin -c "CREATE DATABASE \"$PG_DB\" OWNER \"$PG_USER\"" postgres
    fi
}

start() {
    install_server
    place_cluster
    init_cluster
    if is_running; then
        echo "postgres: already running"
    else
        if (exec 3<>"/dev/tcp/127.0.0.1/$PG_PORT") 2>/dev/null; then
            echo "postgres: port $PG_PORT is taken by another server; set PG_PORT" >&2
            exit 1
        fi
        as_owner "$(bindir)/pg_ctl" -D "$DATA" -l "$LOG" -o "-p $PG_PORT" -w -t 60 start >/dev/null
    fi
    wait_ready
    create_role_and_db
    echo "postgres: ready at $(dsn)"
}

stop() {
    if [ -n "$(bindir)" ] && is_running; then
        as_owner "$(bindir)/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null
        echo "postgres: stopped"
    else
        echo "postgres: not running"
    fi
}

status() {
    if [ -n "$(bindir)" ] && is_running; then echo "postgres: running at $(dsn)"; else echo "postgres: stopped"; return 1; fi
}

# stop/status/reset need the same place; before the server is installed there is none.
[ "${1:-}" = start ] || place_cluster

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    dsn) dsn ;;
    psql) shift; PGPASSWORD=$PG_PASSWORD psql -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$PG_DB" "$@" ;;
    reset) stop; rm -rf "$DATA" ;;
    where) echo "$HOME_DIR" ;;
    *) usage ;;
esac
