#!/usr/bin/env bash
# A private Redis for development and tests: installed from Debian's packages when
# missing, kept under .cache/redis, listening on loopback only.
#
#   scripts/redis.sh start|stop|status|url|cli
#
# Knobs: REDIS_PORT (6379), REDIS_CACHE (<repo>/.cache/redis).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REDIS_PORT=${REDIS_PORT:-6379}
REDIS_CACHE=${REDIS_CACHE:-$ROOT/.cache/redis}
PIDFILE=$REDIS_CACHE/redis.pid

usage() { echo "usage: $0 start|stop|status|url|cli" >&2; exit 2; }

url() { echo "redis://127.0.0.1:$REDIS_PORT/0"; }

install_server() {
    command -v redis-server >/dev/null && return 0
    echo "redis: installing the server from Debian packages"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
    # The package may start a system instance on 6379; ours is separate and stopped by us only.
    $sudo service redis-server stop >/dev/null 2>&1 || true
}

is_running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
    install_server
    mkdir -p "$REDIS_CACHE"
    if is_running; then
        echo "redis: already running at $(url)"
        return 0
    fi
    # No persistence: pub/sub needs none, and tests want a clean slate.
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes \
        --daemonize yes --pidfile "$PIDFILE" --dir "$REDIS_CACHE" \
        --logfile "$REDIS_CACHE/redis.log" --save "" --appendonly no >/dev/null
    for _ in $(seq 1 50); do
        redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && { echo "redis: ready at $(url)"; return 0; }
        sleep 0.1
    done
    echo "redis: did not become ready; see $REDIS_CACHE/redis.log" >&2
    return 1
}

stop() {
    if is_running; then
        kill "$(cat "$PIDFILE")"
        for _ in $(seq 1 50); do is_running || break; sleep 0.1; done
        rm -f "$PIDFILE"
        echo "redis: stopped"
    else
        echo "redis: not running"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) if is_running; then echo "redis: running at $(url)"; else echo "redis: stopped"; exit 1; fi ;;
    url) url ;;
    cli) shift; redis-cli -p "$REDIS_PORT" "$@" ;;
    *) usage ;;
esac
