"""JWT keys from a JWKS endpoint: every way the endpoint can fail is a close code, never a crash.

A real HTTP server on loopback serves the key set, or a broken one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.auth import (
    AuthUnavailable,
    CachedAuthenticator,
    InvalidToken,
    JwtAuthenticator,
)
from service.config import Settings
from service.metrics import Metrics

USER = "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: Any, kid: str) -> dict[str, Any]:
    document = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**document, "kid": kid, "use": "sig", "alg": "RS256"}


def token(kid: str = "k1", key: Any = KEY, alg: str = "RS256") -> str:
    claims = {"sub": USER, "exp": int(time.time()) + 600}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


class KeySetServer:
    """Serves ``body`` with ``status`` after ``delay`` seconds at ``/jwks``."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes = json.dumps({"keys": [jwk(KEY, "k1")]}).encode()
        self.delay = 0.0
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                server.requests += 1
                time.sleep(server.delay)
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/jwks"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def jwks() -> Iterator[KeySetServer]:
    server = KeySetServer()
    yield server
    server.close()


def authenticator(url: str, **env: str) -> JwtAuthenticator:
    return JwtAuthenticator(
        Settings.from_env(
            {"AUTH_MODE": "jwt", "AUTH_JWT_JWKS_URL": url, "AUTH_JWT_ALGORITHMS": "RS256", **env}
        )
    )


async def test_a_token_signed_by_a_key_of_the_set_is_accepted(jwks: KeySetServer) -> None:
    """The baseline: the key named by ``kid`` verifies the token."""
    auth = authenticator(jwks.url)
    assert (await auth.identify(token())).user_id == USER
    await auth.close()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_endpoint_is_unavailable() -> None:
    """Nothing listening at the JWKS URL: 4503, retry later."""
    auth = authenticator(f"http://127.0.0.1:{unused_port()}/jwks")
    with pytest.raises(AuthUnavailable):
        await auth.identify(token())
    await auth.close()


async def test_a_slow_endpoint_is_unavailable_within_auth_timeout(jwks: KeySetServer) -> None:
    """A JWKS endpoint slower than AUTH_TIMEOUT: 4503 after about AUTH_TIMEOUT, not 30 s."""
    jwks.delay = 3.0
    auth = authenticator(jwks.url, AUTH_TIMEOUT="300ms")
    started = time.monotonic()
    with pytest.raises(AuthUnavailable):
        await auth.identify(token())
    assert time.monotonic() - started < 2.5  # PyJWT's own default would be 30 s
    await auth.close()


BROKEN_SETS = {
    "server error": (500, b'{"detail": "oops"}'),
    "not JSON": (200, b"<html>maintenance</html>"),
    "not UTF-8": (200, b"\xff\xfe\x00{"),
    "not an object": (200, b"[1, 2, 3]"),
    "no keys field": (200, b"{}"),
    "empty key set": (200, b'{"keys": []}'),
    "keys not a list": (200, b'{"keys": "k1"}'),
    "unusable key": (200, b'{"keys": [{"kty": "nonsense", "kid": "k1"}]}'),
    "keys without kid": (200, json.dumps({"keys": [{**jwk(KEY, "k1"), "kid": None}]}).encode()),
    "truncated": (200, b'{"keys": [{"kty": "RSA", "kid": "k1", "n": "'),
}


@pytest.mark.parametrize("broken", list(BROKEN_SETS))
async def test_a_broken_key_set_is_unavailable(jwks: KeySetServer, broken: str) -> None:
    """Whatever the endpoint answers instead of a key set is 4503, never a crash."""
    jwks.status, jwks.body = BROKEN_SETS[broken]
    auth = authenticator(jwks.url)
    with pytest.raises(AuthUnavailable):
        await auth.identify(token())
    await auth.close()


async def test_a_token_naming_no_key_of_the_set_is_invalid(jwks: KeySetServer) -> None:
    """An unknown ``kid`` is the token's fault: 4401 (and at most one refetch of the set)."""
    auth = authenticator(jwks.url)
    for kid in ("k2", "k3", "k4"):
        with pytest.raises(InvalidToken):
            await auth.identify(token(kid))
    assert jwks.requests <= 2
    await auth.close()


async def test_a_key_of_the_wrong_type_is_invalid(jwks: KeySetServer) -> None:
    """A ``kid`` whose key cannot verify the token's algorithm is refused with 4401."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    jwks.body = json.dumps({"keys": [jwk(KEY, "k1"), {**ec_jwk, "kid": "ec"}]}).encode()
    auth = authenticator(jwks.url)
    with pytest.raises(InvalidToken):
        await auth.identify(token("ec"))  # RS256 token, EC key
    with pytest.raises(InvalidToken):
        await auth.identify(token("ec", key=ec_key, alg="ES256"))  # algorithm not allowed
    await auth.close()


async def test_behind_the_cache_every_failure_is_a_close_code(jwks: KeySetServer) -> None:
    """Through the cache, as the endpoint uses it: each failure is 4401 or 4503, in turn."""
    jwks.status, jwks.body = BROKEN_SETS["not JSON"]
    auth = CachedAuthenticator(authenticator(jwks.url), Metrics(), ttl=30, size=100, timeout=1.0)
    with pytest.raises(AuthUnavailable):
        await auth.identify(token())
    jwks.status, jwks.body = 200, json.dumps({"keys": [jwk(KEY, "k1")]}).encode()
    identity = await auth.identify(token())
    assert identity.user_id == USER
    assert identity.expires_at == pytest.approx(time.time() + 600, abs=5)
    await auth.close()


async def test_a_key_of_the_set_held_is_used_without_asking_again(jwks: KeySetServer) -> None:
    """Once the set is fetched, tokens naming its keys are checked in place, with no request."""
    auth = authenticator(jwks.url)
    first = token()
    assert auth.identify_now(first) is None  # nothing held yet: the fetching path decides
    assert (await auth.identify(first)).user_id == USER
    for _ in range(3):
        identity = auth.identify_now(token())
        assert identity is not None and identity.user_id == USER
    assert jwks.requests == 1
    await auth.close()


async def test_a_key_dropped_from_the_set_is_refused_once_the_set_held_expires(
    jwks: KeySetServer,
) -> None:
    """A rotated-out key is not trusted from memory past the set's lifespan: 4401 after refetch."""
    auth = authenticator(jwks.url)
    assert (await auth.identify(token())).user_id == USER
    assert auth._jwks is not None and auth._jwks.jwk_set_cache is not None
    auth._jwks.jwk_set_cache.lifespan = 0.01  # as if its 5 minutes had passed
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks.body = json.dumps({"keys": [jwk(other, "k2")]}).encode()
    time.sleep(0.05)
    assert auth.identify_now(token()) is None
    with pytest.raises(InvalidToken):
        await auth.identify(token())
    assert jwks.requests >= 2
    await auth.close()


async def test_an_hmac_token_naming_an_rsa_key_is_refused(jwks: KeySetServer) -> None:
    """Even with HS256 allowed, the RSA key of a ``kid`` is never used as an HMAC secret."""
    strict = authenticator(jwks.url)
    auth = JwtAuthenticator(replace(strict._settings, auth_jwt_algorithms=("RS256", "HS256")))
    assert (await auth.identify(token())).user_id == USER  # the set is now held
    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"sub": USER, "exp": int(time.time()) + 600}
    forged = jwt.encode(claims, "x" * 32, algorithm="HS256", headers={"kid": "k1"})
    head, body, _ = forged.split(".")
    digest = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{head}.{body}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"
    with pytest.raises(InvalidToken):
        auth.identify_now(forged)
    with pytest.raises(InvalidToken):
        await auth.identify(forged)
    await auth.close()


async def test_a_token_without_kid_takes_the_fetching_path(jwks: KeySetServer) -> None:
    """A token naming no key is never matched in place; the fetching path refuses it (4401)."""
    auth = authenticator(jwks.url)
    assert (await auth.identify(token())).user_id == USER
    claims = {"sub": USER, "exp": int(time.time()) + 600}
    anonymous = jwt.encode(claims, KEY, algorithm="RS256")
    assert auth.identify_now(anonymous) is None
    with pytest.raises(InvalidToken):
        await auth.identify(anonymous)
    await auth.close()
