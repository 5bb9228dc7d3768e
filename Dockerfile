# notify-ws: the WebSocket push gateway, one process on port 8001.
#
#   docker build -t notify-ws .
#   docker run --rm -p 8001:8001 -e DATABASE_URL=... -e KAFKA_BOOTSTRAP_SERVERS=... notify-ws
#
# The same image runs the migrations: `docker run ... notify-ws alembic upgrade head`
# (docker-compose.yml does that in its one-shot `migrate` service).
# Only service/, migrations/ and alembic.ini reach the final image; dev/, tests/ and
# bench/ never do (see also .dockerignore).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: a virtual environment with the pinned dependencies and the package ----
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# `pip freeze` leaves setuptools out of requirements.lock, but sanic needs
# setuptools>=70.1 at run time and the venv of Python 3.11 comes with 65.5:
# pin it here (the version the development venv has) so that a rebuild never
# picks whatever is newest. A later pin in requirements.lock simply replaces it.
ARG SETUPTOOLS_VERSION=84.2.1
RUN pip install --no-cache-dir "setuptools==${SETUPTOOLS_VERSION}"

# Dependencies first, so editing the code does not re-download them.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

# Then the package itself, against exactly those dependencies (README.md* is
# optional: pyproject.toml names it, the build only warns if it is absent).
COPY pyproject.toml README.md* ./
COPY service/ service/
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

# ---- runtime: the venv, the code, the migrations; no compiler, no pip cache, no root ----
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --system --gid 10001 notify \
    && useradd --system --no-log-init --uid 10001 --gid notify \
        --home-dir /app --shell /usr/sbin/nologin notify

WORKDIR /app

COPY --from=builder /opt/venv /opt/venv
COPY service/ service/
COPY migrations/ migrations/
COPY alembic.ini ./

# Files stay owned by root: the gateway only reads them. A numeric user, so that
# Kubernetes' runAsNonRoot can check it.
USER 10001:10001

EXPOSE 8001

# No curl in the slim image: ask the liveness endpoint with the standard library.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8001/health/live', timeout=2).status == 200 else 1)"]

# CMD rather than ENTRYPOINT, so `alembic upgrade head` runs from the same image.
CMD ["python", "-m", "service"]
