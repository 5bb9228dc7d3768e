# notify-ws: one entry point for running, testing and measuring the gateway.
#   make test    install everything, start Kafka and PostgreSQL, lint, type-check, run every test
#   make run     start Kafka and PostgreSQL, migrate, run the gateway on :8001
#   make demo    the platform's scenario end to end on this machine, then stop everything
#   make demo-web   the same services and the live page in a browser, until Ctrl-C
#   make test-js    the JS client's tests (unit, and against the real gateway)
#   make bench   the benchmark of docs/performance.md (not part of make test)
#   make reliability   faults, load and bad input at full size; writes docs/reliability.md
#   make up / make down    start / stop the local Kafka, PostgreSQL and Redis

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCAL_DATABASE_URL := postgresql://notify:notify@127.0.0.1:$(or $(PG_PORT),5432)/notify
LOCAL_KAFKA := 127.0.0.1:$(or $(KAFKA_PORT),9092)

.PHONY: help venv up down migrate lint test test-unit test-integration test-js browser run demo demo-web bench reliability lock clean

help:
	@sed -n "2,10p" Makefile

$(BIN)/.installed: requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

venv: $(BIN)/.installed

up:
	scripts/postgres.sh start
	scripts/redis.sh start
	scripts/kafka.sh start

down:
	-scripts/kafka.sh stop
	-scripts/redis.sh stop
	-scripts/postgres.sh stop

migrate: venv
	DATABASE_URL=$${DATABASE_URL:-$(LOCAL_DATABASE_URL)} $(BIN)/alembic upgrade head

lint: venv
	scripts/lint-docker.sh
	$(BIN)/ruff check service migrations tests dev bench
	$(BIN)/ruff format --check service migrations tests dev bench
	$(BIN)/mypy service bench tests/support tests/unit

test: venv up lint browser
	$(BIN)/pytest -q tests
	$(MAKE) test-js

test-unit: venv
	$(BIN)/pytest -q tests/unit

test-integration: venv up browser
	$(BIN)/pytest -q tests/integration

# Debian's Chromium for the browser test (installed when missing; never a downloaded build).
browser:
	scripts/browser.sh

# Node 20 has a WebSocket behind a flag; Node 22 has it always.
NODE_WS_FLAG := $(shell node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null || echo --experimental-websocket)

test-js: venv up migrate
	KAFKA_BOOTSTRAP_SERVERS=$${KAFKA_BOOTSTRAP_SERVERS:-$(LOCAL_KAFKA)} \
	DATABASE_URL=$${DATABASE_URL:-$(LOCAL_DATABASE_URL)} \
	PYTHON=$(CURDIR)/$(BIN)/python \
	node $(NODE_WS_FLAG) --no-warnings=ExperimentalWarning --test --test-timeout=300000 clients/js/test/*.test.js

run: venv up migrate
	KAFKA_BOOTSTRAP_SERVERS=$${KAFKA_BOOTSTRAP_SERVERS:-$(LOCAL_KAFKA)} \
	DATABASE_URL=$${DATABASE_URL:-$(LOCAL_DATABASE_URL)} \
	AUTH_VERIFY_URL=$${AUTH_VERIFY_URL:-http://127.0.0.1:8000/api/v1/users/me} \
	$(BIN)/python -m service

demo: venv
	$(BIN)/python dev/demo.py

demo-web: venv
	$(BIN)/python dev/demo.py --web

# The reliability suite at the issue's sizes, then docs/reliability.md from its figures.
# It runs its own Kafka (19092/19093) and PostgreSQL (15432).
reliability: venv
	RELIABILITY_SCALE=full $(BIN)/pytest -q tests/reliability; status=$$?; \
	$(BIN)/python tests/reliability/report.py; exit $$status

$(BIN)/.bench-installed: $(BIN)/.installed bench/requirements.txt
	$(BIN)/pip install --quiet -r bench/requirements.txt
	touch $@

# make bench                 everything, defaults (~13 min with v2 and scale); make bench ARGS=--quick
# make bench ARGS="--peers --update-doc"   and Centrifugo beside it (~2-4 min more; Go builds it once)
# make bench ARGS="--only store,flush"   make bench ARGS="--only live --profile"
bench: $(BIN)/.bench-installed up
	KAFKA_BOOTSTRAP_SERVERS=$${KAFKA_BOOTSTRAP_SERVERS:-$(LOCAL_KAFKA)} \
	DATABASE_URL=$${DATABASE_URL:-$(LOCAL_DATABASE_URL)} \
	$(BIN)/python -m bench.run $(ARGS)

lock:
	rm -rf .cache/lock && $(PYTHON) -m venv .cache/lock/rt && .cache/lock/rt/bin/pip install -q .
	(echo "# Runtime dependencies, pinned: what the image installs. Regenerate with 'make lock'."; \
	 .cache/lock/rt/bin/pip freeze --all --exclude pip --exclude notify-ws) > requirements.lock
	$(PYTHON) -m venv .cache/lock/dev && .cache/lock/dev/bin/pip install -q '.[dev]'
	(echo "# Runtime and development dependencies, pinned: what 'make test' installs. Regenerate with 'make lock'."; \
	 .cache/lock/dev/bin/pip freeze --all --exclude pip --exclude notify-ws) > requirements-dev.lock

clean: down
	rm -rf $(VENV) .cache
