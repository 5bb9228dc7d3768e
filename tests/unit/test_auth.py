"""Token checks: the remote auth service, local JWTs, and the cache in front of either."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import hmac
import json
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import service.auth
from service.auth import (
    AuthUnavailable,
    CachedAuthenticator,
    Identity,
    InvalidToken,
    JwtAuthenticator,
    RemoteAuthenticator,
    Unauthenticated,
    address_key,
)
from service.config import Settings
from service.metrics import Metrics

USER = "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce"
TOKEN = "opaque-token-Zq8xv3Kp0wQz"
SECRET = "a-test-secret-that-is-long-enough-for-hs256"

Handler = Callable[[httpx.Request], httpx.Response]


def answer(status: int = 200, body: Any = None) -> Handler:
    """A stand-in auth service that always gives the same answer."""
    payload = {"id": USER} if body is None else body

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=payload)

    return handle


async def identify(handler: Handler, token: str = TOKEN, **env: str) -> Identity:
    """Check ``token`` against the stand-in with settings from ``env``."""
    settings = Settings.from_env(env)
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    authenticator = RemoteAuthenticator(settings, client)
    try:
        return await authenticator.identify(token)
    finally:
        await authenticator.close()


def assert_secret_free(exc: BaseException, token: str = TOKEN) -> None:
    """Neither the message nor a printed traceback of ``exc`` holds the token."""
    assert token not in str(exc)
    assert token not in repr(exc)
    assert token not in "".join(traceback.format_exception(exc))


# --- remote: statuses --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 202])
async def test_remote_success_statuses_accept_the_token(status: int) -> None:
    """The auth service answering 200 or 202 lets the client in as the user it names."""
    assert await identify(answer(status)) == Identity(USER, None)


@pytest.mark.parametrize("status", [401, 403, 422])
async def test_remote_refusals_mean_invalid_token(status: int) -> None:
    """401, 403 and 422 tell the client to get a new token (4401), not to retry."""
    with pytest.raises(InvalidToken) as raised:
        await identify(answer(status, {"detail": "Could not validate credentials"}))
    assert_secret_free(raised.value)


@pytest.mark.parametrize("status", [500, 503, 404, 302])
async def test_remote_other_statuses_mean_unavailable(status: int) -> None:
    """Any other answer means "retry later" (4503), never "your token is bad"."""
    with pytest.raises(AuthUnavailable) as raised:
        await identify(answer(status, {"detail": "oops"}))
    assert_secret_free(raised.value)


def raising(exc_type: type[httpx.TransportError]) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc_type(f"failed talking to {request.url} with {request.headers}", request=request)

    return handle


@pytest.mark.parametrize(
    "exc_type", [httpx.ReadTimeout, httpx.ConnectTimeout, httpx.ConnectError, httpx.ReadError]
)
@pytest.mark.parametrize("placement", ["bearer", "query"])
async def test_remote_timeout_or_refused_connection_means_unavailable(
    exc_type: type[httpx.TransportError], placement: str
) -> None:
    """An auth service that times out or cannot be reached is "retry later", token not leaked."""
    with pytest.raises(AuthUnavailable) as raised:
        await identify(raising(exc_type), AUTH_TOKEN_IN=placement, AUTH_TOKEN_NAME="token")
    assert_secret_free(raised.value)


async def test_remote_answer_that_is_not_json_means_unavailable() -> None:
    """A 200 with an HTML page (a misrouted proxy, say) is "retry later", not a login."""

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>hello</html>")

    with pytest.raises(AuthUnavailable):
        await identify(handle)


async def test_remote_answer_without_user_id_means_unavailable() -> None:
    """A success answer that names no user lets nobody in."""
    with pytest.raises(AuthUnavailable):
        await identify(answer(200, {"email": "a@example.com"}))


async def test_configured_valid_statuses_are_honoured() -> None:
    """With AUTH_VALID_STATUSES=200 a 202 no longer counts as a valid token."""
    assert await identify(answer(200), AUTH_VALID_STATUSES="200") == Identity(USER)
    with pytest.raises(AuthUnavailable):
        await identify(answer(202), AUTH_VALID_STATUSES="200")


# --- remote: user id ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"id": USER},
        {"user_id": USER},
        {"uuid": USER},
        {"sub": USER},
        {"claims": {"sub": USER}},
        {"user": {"id": USER}},
        {"user": {"id": USER.upper()}, "email": "a@example.com"},
    ],
)
async def test_user_id_is_found_in_common_answer_shapes(body: dict[str, Any]) -> None:
    """The user id is found whichever common field the auth service puts it in."""
    assert (await identify(answer(200, body))).user_id == USER


async def test_user_id_fields_are_tried_in_documented_order() -> None:
    """When several fields are present, ``id`` wins over ``sub``."""
    body = {"sub": "from-sub", "claims": {"sub": "from-claims"}, "id": USER}
    assert (await identify(answer(200, body))).user_id == USER


async def test_numeric_user_id_becomes_text() -> None:
    """A numeric user id is accepted and compared as text."""
    assert (await identify(answer(200, {"id": 42}))).user_id == "42"


async def test_configured_user_id_field_is_used_alone() -> None:
    """AUTH_USER_ID_FIELD picks the field; the common ones are then ignored."""
    body = {"id": "row-7", "data": {"account_id": USER}}
    identity = await identify(answer(200, body), AUTH_USER_ID_FIELD="data.account_id")
    assert identity.user_id == USER
    with pytest.raises(AuthUnavailable):
        await identify(answer(200, {"id": USER}), AUTH_USER_ID_FIELD="data.account_id")


# --- remote: body check ------------------------------------------------------------------------


async def test_body_check_is_valid_field() -> None:
    """With AUTH_BODY_CHECK=is_valid a 200 that says is_valid=false is an invalid token."""
    ok = await identify(answer(200, {"is_valid": True, "id": USER}), AUTH_BODY_CHECK="is_valid")
    assert ok.user_id == USER
    for body in ({"is_valid": False, "id": USER}, {"id": USER}):
        with pytest.raises(InvalidToken):
            await identify(answer(200, body), AUTH_BODY_CHECK="is_valid")


async def test_body_check_status_equals_valid() -> None:
    """With AUTH_BODY_CHECK=status==valid only an answer saying "valid" lets the client in."""
    good = {"status": "valid", "user_id": USER}
    assert (await identify(answer(200, good), AUTH_BODY_CHECK="status==valid")).user_id == USER
    with pytest.raises(InvalidToken):
        await identify(
            answer(200, {"status": "expired", "user_id": USER}), AUTH_BODY_CHECK="status==valid"
        )


async def test_body_check_against_a_json_boolean() -> None:
    """AUTH_BODY_CHECK=is_valid==true accepts an answer whose is_valid is JSON true."""
    identity = await identify(
        answer(200, {"is_valid": True, "id": USER}), AUTH_BODY_CHECK="is_valid==true"
    )
    assert identity.user_id == USER


# --- remote: where the token goes ----------------------------------------------------------------


def recording(seen: list[httpx.Request]) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": USER})

    return handle


async def test_token_goes_in_the_bearer_header_by_default() -> None:
    """By default the auth service gets ``GET`` on its URL with ``Authorization: Bearer``."""
    seen: list[httpx.Request] = []
    await identify(recording(seen))
    (request,) = seen
    assert request.method == "GET"
    assert str(request.url) == "http://auth_service_api:8000/api/v1/users/me"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


async def test_token_in_another_header() -> None:
    """AUTH_TOKEN_IN=header sends the bare token in the named header."""
    seen: list[httpx.Request] = []
    await identify(recording(seen), AUTH_TOKEN_IN="header", AUTH_TOKEN_NAME="X-Auth-Token")
    assert seen[0].headers["x-auth-token"] == TOKEN
    assert "authorization" not in seen[0].headers


async def test_token_in_a_cookie() -> None:
    """AUTH_TOKEN_IN=cookie sends the token as the named cookie."""
    seen: list[httpx.Request] = []
    await identify(recording(seen), AUTH_TOKEN_IN="cookie", AUTH_TOKEN_NAME="access_token")
    assert seen[0].headers["cookie"] == f"access_token={TOKEN}"


async def test_token_in_a_json_body() -> None:
    """AUTH_TOKEN_IN=json with POST sends ``{"<name>": token}`` to the configured URL."""
    seen: list[httpx.Request] = []
    await identify(
        recording(seen),
        AUTH_TOKEN_IN="json",
        AUTH_TOKEN_NAME="token",
        AUTH_METHOD="POST",
        AUTH_VERIFY_URL="http://auth.local:9000/api/v1/auth/verify",
    )
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == "http://auth.local:9000/api/v1/auth/verify"
    assert json.loads(request.content) == {"token": TOKEN}


async def test_token_in_the_query() -> None:
    """AUTH_TOKEN_IN=query sends the token as the named query parameter."""
    seen: list[httpx.Request] = []
    await identify(recording(seen), AUTH_TOKEN_IN="query", AUTH_TOKEN_NAME="access_token")
    assert seen[0].url.params["access_token"] == TOKEN


async def test_jwt_shaped_token_carries_its_expiry() -> None:
    """A JWT checked remotely still ends the connection at its ``exp``."""
    exp = int(time.time()) + 600
    token = jwt.encode({"sub": USER, "exp": exp}, SECRET, algorithm="HS256")
    assert await identify(answer(200), token) == Identity(USER, float(exp))


async def test_token_with_non_ascii_characters_is_invalid() -> None:
    """A token with characters no header can carry is refused as invalid (4401)."""
    with pytest.raises(InvalidToken):
        await identify(answer(200), "tökén-ü")


# --- jwt -------------------------------------------------------------------------------------


def jwt_auth(**env: str) -> JwtAuthenticator:
    return JwtAuthenticator(Settings.from_env({"AUTH_MODE": "jwt", **env}))


def hs_token(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, secret, algorithm="HS256")


async def assert_refused(authenticator: JwtAuthenticator, token: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as raised:
        await authenticator.identify(token)
    assert_secret_free(raised.value, token)
    return raised.value


async def test_jwt_valid_hs256_token() -> None:
    """A correctly signed, unexpired HS256 token identifies its ``sub`` until its ``exp``."""
    exp = int(time.time()) + 600
    token = hs_token({"sub": USER.upper(), "exp": exp})
    assert await jwt_auth(AUTH_JWT_SECRET=SECRET).identify(token) == Identity(USER, float(exp))


async def test_jwt_expired_token_is_refused() -> None:
    """An expired token is refused so the client knows to refresh it."""
    token = hs_token({"sub": USER, "exp": int(time.time()) - 60})
    error = await assert_refused(jwt_auth(AUTH_JWT_SECRET=SECRET), token)
    assert error.reason == "token expired"


async def test_jwt_token_without_expiry_is_refused() -> None:
    """A token that never expires is not accepted."""
    token = jwt.encode({"sub": USER}, SECRET, algorithm="HS256")
    await assert_refused(jwt_auth(AUTH_JWT_SECRET=SECRET), token)


async def test_jwt_wrong_signature_is_refused() -> None:
    """A token signed with another key is refused."""
    token = hs_token({"sub": USER}, secret="another-secret-that-is-also-long-enough")
    await assert_refused(jwt_auth(AUTH_JWT_SECRET=SECRET), token)


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.bm90LWpzb24.c2ln"])
async def test_jwt_garbage_is_refused(token: str) -> None:
    """Something that is not a JWT at all is an invalid token, not a crash."""
    await assert_refused(jwt_auth(AUTH_JWT_SECRET=SECRET), token)


async def test_jwt_unsigned_token_is_refused() -> None:
    """A token with ``alg: none`` is refused."""
    token = jwt.encode(
        {"sub": USER, "exp": int(time.time()) + 600},
        None,  # type: ignore[arg-type]  # an unsigned token, on purpose
        algorithm="none",
    )
    await assert_refused(jwt_auth(AUTH_JWT_SECRET=SECRET), token)


async def test_jwt_issuer_is_checked_when_configured() -> None:
    """With AUTH_JWT_ISSUER set, a token from another issuer (or none) is refused."""
    auth = jwt_auth(AUTH_JWT_SECRET=SECRET, AUTH_JWT_ISSUER="auth-service")
    assert (await auth.identify(hs_token({"sub": USER, "iss": "auth-service"}))).user_id == USER
    await assert_refused(auth, hs_token({"sub": USER, "iss": "someone-else"}))
    await assert_refused(auth, hs_token({"sub": USER}))


async def test_jwt_audience_is_checked_when_configured() -> None:
    """With AUTH_JWT_AUDIENCE set, a token for another audience is refused."""
    auth = jwt_auth(AUTH_JWT_SECRET=SECRET, AUTH_JWT_AUDIENCE="notify")
    assert (await auth.identify(hs_token({"sub": USER, "aud": "notify"}))).user_id == USER
    await assert_refused(auth, hs_token({"sub": USER, "aud": "billing"}))


async def test_jwt_without_user_claim_is_refused() -> None:
    """A token that names no user is refused."""
    await assert_refused(jwt_auth(AUTH_JWT_SECRET=SECRET), hs_token({"name": "alice"}))


async def test_jwt_custom_user_claim() -> None:
    """AUTH_JWT_USER_ID_CLAIM picks which claim holds the user id."""
    auth = jwt_auth(AUTH_JWT_SECRET=SECRET, AUTH_JWT_USER_ID_CLAIM="user_id")
    assert (await auth.identify(hs_token({"user_id": USER, "sub": "x"}))).user_id == USER


async def test_jwt_access_type_is_required_when_configured() -> None:
    """With AUTH_JWT_REQUIRE_ACCESS_TYPE a refresh token cannot open a connection."""
    strict = jwt_auth(AUTH_JWT_SECRET=SECRET, AUTH_JWT_REQUIRE_ACCESS_TYPE="true")
    assert (await strict.identify(hs_token({"sub": USER, "type": "access"}))).user_id == USER
    await assert_refused(strict, hs_token({"sub": USER, "type": "refresh"}))
    await assert_refused(strict, hs_token({"sub": USER}))
    lenient = jwt_auth(AUTH_JWT_SECRET=SECRET)
    assert (await lenient.identify(hs_token({"sub": USER, "type": "refresh"}))).user_id == USER


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def test_jwt_rs256_with_a_public_key() -> None:
    """An RS256 token signed by the auth service's key is accepted; one by another key is not."""
    key, other = rsa_key(), rsa_key()
    auth = jwt_auth(AUTH_JWT_PUBLIC_KEY=public_pem(key), AUTH_JWT_ALGORITHMS="RS256")
    claims = {"sub": USER, "exp": int(time.time()) + 600}
    assert (await auth.identify(jwt.encode(claims, key, algorithm="RS256"))).user_id == USER
    await assert_refused(auth, jwt.encode(claims, other, algorithm="RS256"))
    await assert_refused(auth, hs_token({"sub": USER}))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmac_token(header: dict[str, Any], claims: dict[str, Any] | str, secret: bytes) -> str:
    """A token signed with HMAC-SHA256 over any header and claims (or JSON text) it is given."""
    payload = claims if isinstance(claims, str) else json.dumps(claims)
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(payload.encode())}"
    digest = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(digest)}"


def soon() -> int:
    return int(time.time()) + 600


async def test_jwt_hmac_token_signed_with_the_public_key_is_refused() -> None:
    """A token that says HS256 and is signed with the RSA public key as secret gets nowhere.

    Even when the algorithm list names both (which the settings refuse), each algorithm
    verifies only with a key prepared for it: the PEM is never an HMAC secret.
    """
    pem = public_pem(rsa_key())
    forged = hmac_token({"alg": "HS256", "typ": "JWT"}, {"sub": USER, "exp": soon()}, pem.encode())
    auth = jwt_auth(AUTH_JWT_PUBLIC_KEY=pem, AUTH_JWT_ALGORITHMS="RS256")
    await assert_refused(auth, forged)
    both = JwtAuthenticator(replace(auth._settings, auth_jwt_algorithms=("RS256", "HS256")))
    await assert_refused(both, forged)
    with pytest.raises(InvalidToken):
        both.identify_now(forged)


async def test_jwt_algorithm_outside_the_configured_list_is_refused() -> None:
    """A token signed with the right secret under another HMAC algorithm is refused."""
    secret = SECRET * 2  # long enough for HS512
    token = jwt.encode({"sub": USER, "exp": soon()}, secret, algorithm="HS512")
    await assert_refused(jwt_auth(AUTH_JWT_SECRET=secret), token)
    lenient = jwt_auth(AUTH_JWT_SECRET=secret, AUTH_JWT_ALGORITHMS="HS256,HS512")
    assert (await lenient.identify(token)).user_id == USER


async def test_jwt_unsigned_token_is_refused_even_with_none_configured() -> None:
    """``alg: none`` is never accepted, whatever the algorithm list holds."""
    auth = jwt_auth(AUTH_JWT_SECRET=SECRET)
    unsigned = JwtAuthenticator(replace(auth._settings, auth_jwt_algorithms=("HS256", "none")))
    token = jwt.encode(
        {"sub": USER, "exp": soon()},
        None,  # type: ignore[arg-type]  # an unsigned token, on purpose
        algorithm="none",
    )
    await assert_refused(unsigned, token)
    await assert_refused(unsigned, token + b64(b"x"))


async def test_jwt_not_before_in_the_future_is_refused() -> None:
    """A token not valid yet (``nbf`` past the 5 s leeway) is refused; one valid now is not."""
    auth = jwt_auth(AUTH_JWT_SECRET=SECRET)
    now = int(time.time())
    await assert_refused(auth, hs_token({"sub": USER, "nbf": now + 60}))
    await assert_refused(auth, hs_token({"sub": USER, "nbf": "soon"}))
    assert (await auth.identify(hs_token({"sub": USER, "nbf": now - 60}))).user_id == USER
    assert (await auth.identify(hs_token({"sub": USER, "nbf": now + 2}))).user_id == USER


async def test_jwt_issued_in_the_future_is_refused() -> None:
    """A token whose ``iat`` is past the leeway, or not a number, is refused."""
    auth = jwt_auth(AUTH_JWT_SECRET=SECRET)
    await assert_refused(auth, hs_token({"sub": USER, "iat": int(time.time()) + 60}))
    await assert_refused(auth, hs_token({"sub": USER, "iat": "yesterday"}))
    assert (await auth.identify(hs_token({"sub": USER, "iat": int(time.time())}))).user_id == USER


@pytest.mark.parametrize("exp", ['"2099-01-01"', "true", "null", "[1]", "1e400"])
async def test_jwt_expiry_that_is_not_a_time_is_refused(exp: str) -> None:
    """``exp`` must be a finite number: a string, a boolean, null or infinity is refused."""
    claims = f'{{"sub": "{USER}", "exp": {exp}}}'
    token = hmac_token({"alg": "HS256"}, claims, SECRET.encode())
    await assert_refused(jwt_auth(AUTH_JWT_SECRET=SECRET), token)


async def test_jwt_expired_within_leeway_is_still_accepted_beyond_is_not() -> None:
    """Clocks may differ by 5 s: a token expired 2 s ago passes, one expired 10 s ago does not."""
    auth = jwt_auth(AUTH_JWT_SECRET=SECRET)
    now = int(time.time())
    assert (await auth.identify(hs_token({"sub": USER, "exp": now - 2}))).user_id == USER
    error = await assert_refused(auth, hs_token({"sub": USER, "exp": now - 10}))
    assert error.reason == "token expired"


async def test_jwt_audience_in_a_list_or_missing() -> None:
    """With AUTH_JWT_AUDIENCE, a token listing it among others passes; one without ``aud`` not."""
    auth = jwt_auth(AUTH_JWT_SECRET=SECRET, AUTH_JWT_AUDIENCE="notify")
    assert (await auth.identify(hs_token({"sub": USER, "aud": ["billing", "notify"]}))).user_id
    await assert_refused(auth, hs_token({"sub": USER}))
    await assert_refused(auth, hs_token({"sub": USER, "aud": ["billing", 7]}))
    lenient = jwt_auth(AUTH_JWT_SECRET=SECRET)
    assert (await lenient.identify(hs_token({"sub": USER, "aud": "billing"}))).user_id == USER


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "HS256", "crit": ["exp"], "exp": 1},
        {"alg": "HS256", "b64": False, "crit": ["b64"]},
        {"alg": "HS256", "kid": 7},
        {"alg": ["HS256"]},
        {"typ": "JWT"},
    ],
)
async def test_jwt_header_we_cannot_honour_is_refused(header: dict[str, Any]) -> None:
    """A critical extension, a non-text ``kid``, or a missing or odd ``alg``: refused."""
    token = hmac_token(header, {"sub": USER, "exp": soon()}, SECRET.encode())
    await assert_refused(jwt_auth(AUTH_JWT_SECRET=SECRET), token)


@pytest.mark.parametrize("damage", ["pad", "space", "plus", "extra segment", "no signature"])
async def test_jwt_damaged_encoding_is_refused(damage: str) -> None:
    """A valid token with characters outside base64url, or the wrong number of parts: refused."""
    token = hs_token({"sub": USER})
    head, body, signature = token.split(".")
    damaged = {
        "pad": f"{head}.{body}=.{signature}",
        "space": f"{head}. {body}.{signature}",
        "plus": f"{head}.{body}.{signature[:-1]}+",
        "extra segment": f"{token}.{signature}",
        "no signature": f"{head}.{body}.",
    }[damage]
    await assert_refused(jwt_auth(AUTH_JWT_SECRET=SECRET), damaged)


@pytest.mark.parametrize("claim", ["sub", "jti"])
async def test_jwt_subject_or_id_that_is_not_text_is_refused(claim: str) -> None:
    """``sub`` and ``jti`` must be strings when present, as PyJWT requires."""
    await assert_refused(jwt_auth(AUTH_JWT_SECRET=SECRET), hs_token({"sub": USER, claim: 42}))


async def test_jwt_local_check_needs_no_await() -> None:
    """With a fixed key, ``identify_now`` answers at once and refuses as ``identify`` does."""
    auth = jwt_auth(AUTH_JWT_SECRET=SECRET)
    exp = soon()
    assert auth.identify_now(hs_token({"sub": USER, "exp": exp})) == Identity(USER, float(exp))
    expired = hs_token({"sub": USER, "exp": int(time.time()) - 60})
    with pytest.raises(InvalidToken) as raised:
        auth.identify_now(expired)
    assert raised.value.reason == "token expired"
    assert_secret_free(raised.value, expired)


# --- cache -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(
        service.auth, "time", SimpleNamespace(time=fake.time, perf_counter=fake.perf_counter)
    )
    return fake


class Inner:
    """An authenticator that counts its calls and gives a fixed answer, optionally held."""

    def __init__(self, result: Identity | Exception) -> None:
        self.result = result
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def identify(self, token: str) -> Identity:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    async def close(self) -> None:
        self.closed = True


def cached(inner: Inner, *, ttl: float = 30.0, size: int = 100) -> CachedAuthenticator:
    return CachedAuthenticator(inner, Metrics(), ttl=ttl, size=size)


async def test_cache_answers_a_repeated_check(clock: FakeClock) -> None:
    """A reconnect with the same token does not ask the auth service again."""
    inner = Inner(Identity(USER))
    auth = cached(inner)
    assert await auth.identify(TOKEN) == Identity(USER)
    assert await auth.identify(TOKEN) == Identity(USER)
    assert inner.calls == 1
    await auth.identify("another-token")
    assert inner.calls == 2


async def test_cache_remembers_invalid_tokens(clock: FakeClock) -> None:
    """A client retrying a bad token is refused without hammering the auth service."""
    inner = Inner(InvalidToken("refused by auth service (401)"))
    auth = cached(inner)
    for _ in range(3):
        with pytest.raises(InvalidToken):
            await auth.identify(TOKEN)
    assert inner.calls == 1


async def test_cache_never_remembers_unavailable(clock: FakeClock) -> None:
    """After an auth outage the next attempt asks again, so clients get in once it is back."""
    inner = Inner(AuthUnavailable("timeout"))
    auth = cached(inner)
    for _ in range(2):
        with pytest.raises(AuthUnavailable):
            await auth.identify(TOKEN)
    assert inner.calls == 2
    inner.result = Identity(USER)
    assert await auth.identify(TOKEN) == Identity(USER)


async def test_cache_entry_expires_after_ttl(clock: FakeClock) -> None:
    """A cached answer is re-checked after the cache TTL."""
    inner = Inner(Identity(USER))
    auth = cached(inner, ttl=30)
    await auth.identify(TOKEN)
    clock.now += 29
    await auth.identify(TOKEN)
    assert inner.calls == 1
    clock.now += 2
    await auth.identify(TOKEN)
    assert inner.calls == 2


async def test_cache_entry_never_outlives_the_token(clock: FakeClock) -> None:
    """A token about to expire is not accepted from the cache after its ``exp``."""
    inner = Inner(Identity(USER, expires_at=clock.now + 5))
    auth = cached(inner, ttl=30)
    await auth.identify(TOKEN)
    clock.now += 4
    await auth.identify(TOKEN)
    assert inner.calls == 1
    clock.now += 2
    inner.result = InvalidToken("token expired")
    with pytest.raises(InvalidToken):
        await auth.identify(TOKEN)
    assert inner.calls == 2


async def test_cache_is_bounded(clock: FakeClock) -> None:
    """The cache forgets the least recently used token once it is full."""
    inner = Inner(Identity(USER))
    auth = cached(inner, size=1)
    await auth.identify("token-a")
    await auth.identify("token-b")
    await auth.identify("token-a")
    assert inner.calls == 3


async def test_cache_can_be_disabled(clock: FakeClock) -> None:
    """AUTH_CACHE_TTL=0 checks every connection with the auth service."""
    inner = Inner(Identity(USER))
    auth = cached(inner, ttl=0)
    await auth.identify(TOKEN)
    await auth.identify(TOKEN)
    assert inner.calls == 2


async def test_concurrent_checks_of_one_token_share_one_call() -> None:
    """A reconnect storm with one token becomes one auth request, and everyone gets its answer."""
    inner = Inner(Identity(USER))
    inner.gate = asyncio.Event()
    auth = cached(inner)
    checks = [asyncio.create_task(auth.identify(TOKEN)) for _ in range(20)]
    await asyncio.sleep(0.01)
    inner.gate.set()
    assert await asyncio.gather(*checks) == [Identity(USER)] * 20
    assert inner.calls == 1


@pytest.mark.parametrize("error", [InvalidToken("refused"), AuthUnavailable("timeout")])
async def test_concurrent_checks_share_a_failure(error: Exception) -> None:
    """When the shared check fails, every waiting client gets the same kind of answer."""
    inner = Inner(error)
    inner.gate = asyncio.Event()
    auth = cached(inner)
    checks = [asyncio.create_task(auth.identify(TOKEN)) for _ in range(5)]
    await asyncio.sleep(0.01)
    inner.gate.set()
    results = await asyncio.gather(*checks, return_exceptions=True)
    assert all(type(result) is type(error) for result in results)
    assert inner.calls == 1


async def test_cache_close_closes_the_inner_authenticator() -> None:
    """Closing the cached authenticator releases the auth client; closing twice is harmless."""
    inner = Inner(Identity(USER))
    auth = cached(inner)
    await auth.close()
    await auth.close()
    assert inner.closed


# --- cache: what it keeps ----------------------------------------------------------------------


class RequestLike:
    """Stands for a handler's request and socket: big, and must die with the handler."""

    def __init__(self) -> None:
        self.headers = b"x" * 6144


async def refused_handler(auth: CachedAuthenticator, token: str) -> weakref.ref[RequestLike]:
    """A WebSocket handler in miniature: holds a request while its token is checked."""
    request = RequestLike()
    with contextlib.suppress(InvalidToken, AuthUnavailable):
        await auth.identify(token)
    return weakref.ref(request)


@pytest.mark.parametrize(
    "error",
    [InvalidToken("refused by auth service (401)"), AuthUnavailable("timeout"), KeyError("bug")],
)
async def test_a_finished_check_keeps_nothing_of_its_handler(
    clock: FakeClock, error: Exception
) -> None:
    """After a refused check (cached or not) the handler's request can be freed."""
    inner = Inner(error)
    auth = cached(inner)
    held = [await refused_handler(auth, f"bad-token-{i}") for i in range(3)]
    held.append(await refused_handler(auth, "bad-token-0"))  # a cache hit, when cached
    gc.collect()
    assert [ref() for ref in held] == [None] * len(held)


async def test_waiters_of_a_shared_refusal_are_freed_too() -> None:
    """Several handlers waiting on one check all let go of their requests afterwards."""
    inner = Inner(InvalidToken("refused"))
    inner.gate = asyncio.Event()
    auth = cached(inner)
    handlers = [asyncio.create_task(refused_handler(auth, TOKEN)) for _ in range(5)]
    await asyncio.sleep(0.01)
    inner.gate.set()
    held = await asyncio.gather(*handlers)
    del handlers
    gc.collect()
    assert [ref() for ref in held] == [None] * 5
    assert inner.calls == 1


async def test_refusals_have_a_bound_of_their_own(clock: FakeClock) -> None:
    """A flood of distinct bad tokens fills only the refusals' share: valid tokens stay."""
    inner = Inner(Identity(USER))
    auth = CachedAuthenticator(inner, Metrics(), ttl=30, size=100, refusals=10)
    for i in range(5):
        await auth.identify(f"good-{i}")
    inner.result = InvalidToken("refused")
    for i in range(1000):
        with pytest.raises(InvalidToken):
            await auth.identify(f"bad-{i}")
    assert len(auth) == 5 + 10
    inner.result = Identity("someone-else")
    assert [await auth.identify(f"good-{i}") for i in range(5)] == [Identity(USER)] * 5


async def test_expired_entries_are_swept_without_being_looked_up(clock: FakeClock) -> None:
    """Entries past their TTL leave the cache when new ones arrive, not only when asked for."""
    inner = Inner(InvalidToken("refused"))
    auth = cached(inner, ttl=30, size=1000)
    for i in range(100):
        with pytest.raises(InvalidToken):
            await auth.identify(f"bad-{i}")
    assert len(auth) == 100
    clock.now += 31
    with pytest.raises(InvalidToken):
        await auth.identify("one-more")
    assert len(auth) == 1


async def test_a_token_past_its_exp_is_refused_without_asking(clock: FakeClock) -> None:
    """A JWT whose ``exp`` has passed gets 4401 at once, signed or not, with no remote call."""
    inner = Inner(Identity(USER))
    auth = cached(inner)
    expired = jwt.encode(
        {"sub": USER, "exp": int(clock.now) - 1}, "any-key-at-all-here-32-bytes-long"
    )
    with pytest.raises(InvalidToken) as raised:
        await auth.identify(expired)
    assert raised.value.reason == "token expired"
    assert inner.calls == 0
    fresh = jwt.encode(
        {"sub": USER, "exp": int(clock.now) + 60}, "any-key-at-all-here-32-bytes-long"
    )
    assert await auth.identify(fresh) == Identity(USER)
    assert inner.calls == 1


async def test_remote_checks_are_bounded_and_queued_in_turn() -> None:
    """At most AUTH_CONCURRENCY checks run at once; the others wait and are answered later."""
    running = peak = 0
    release = asyncio.Event()

    class Counting(Inner):
        async def identify(self, token: str) -> Identity:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1
            return Identity(token)

    auth = CachedAuthenticator(Counting(Identity(USER)), Metrics(), ttl=30, size=100, concurrency=3)
    checks = [asyncio.create_task(auth.identify(f"user-{i}")) for i in range(10)]
    await asyncio.sleep(0.05)
    assert running == 3
    release.set()
    assert [i.user_id for i in await asyncio.gather(*checks)] == [f"user-{i}" for i in range(10)]
    assert peak == 3


async def test_a_check_without_answer_in_time_is_unavailable_waiting_included() -> None:
    """Checks queued behind a stuck one get 4503 after AUTH_TIMEOUT, not an endless wait."""
    inner = Inner(Identity(USER))
    inner.gate = asyncio.Event()  # never set: the auth service hangs
    auth = CachedAuthenticator(inner, Metrics(), ttl=30, size=100, concurrency=1, timeout=0.2)
    checks = [auth.identify(f"token-{i}") for i in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*checks, return_exceptions=True), 5)
    assert all(isinstance(result, AuthUnavailable) for result in results), results
    assert inner.calls < 5  # the queued checks never reached the auth service


async def test_an_unexpected_error_of_the_check_is_unavailable_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in a check answers 4503 (retry), logs its type, and never reaches the client."""
    auth = cached(Inner(KeyError(TOKEN)))
    with pytest.raises(AuthUnavailable) as raised:
        await auth.identify(TOKEN)
    assert_secret_free(raised.value)
    [record] = [r for r in caplog.records if r.name == "notify.auth"]
    assert record.error == "KeyError"  # type: ignore[attr-defined]
    assert TOKEN not in caplog.text
    assert record.exc_info is None


class LocalInner(Inner):
    """An Inner that answers in place (``identify_now``), except for tokens in ``remote``."""

    def __init__(self, result: Identity | Exception) -> None:
        super().__init__(result)
        self.now_calls = 0
        self.remote: set[str] = set()

    def identify_now(self, token: str) -> Identity | None:
        self.now_calls += 1
        if token in self.remote:
            return None
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


async def test_a_local_check_does_not_wait_behind_checks_that_need_io() -> None:
    """With every slot held by a stuck JWKS fetch, a token checked locally is still answered."""
    inner = LocalInner(Identity(USER))
    inner.remote.add("needs-the-key-set")
    inner.gate = asyncio.Event()
    auth = CachedAuthenticator(inner, Metrics(), ttl=30, size=100, concurrency=1, timeout=5.0)
    stuck = asyncio.create_task(auth.identify("needs-the-key-set"))
    for _ in range(100):
        if inner.calls:
            break
        await asyncio.sleep(0)
    assert inner.calls == 1  # holds the only slot
    assert await asyncio.wait_for(auth.identify(TOKEN), 1.0) == Identity(USER)
    assert inner.calls == 1
    inner.gate.set()
    assert await stuck == Identity(USER)
    await auth.close()


async def test_a_local_answer_is_cached_never_past_exp(clock: FakeClock) -> None:
    """A valid local answer is reused, until its token's ``exp`` at most."""
    inner = LocalInner(Identity(USER, clock.now + 10))
    auth = cached(inner, ttl=30)
    await auth.identify(TOKEN)
    await auth.identify(TOKEN)
    assert inner.now_calls == 1
    clock.now += 11
    await auth.identify(TOKEN)
    assert inner.now_calls == 2


async def test_a_local_refusal_is_cached_within_its_bound(clock: FakeClock) -> None:
    """An invalid token refused locally is remembered; with AUTH_CACHE_REFUSALS=0 it is not."""
    inner = LocalInner(InvalidToken("invalid token (InvalidSignatureError)"))
    auth = cached(inner)
    for _ in range(2):
        with pytest.raises(InvalidToken) as raised:
            await auth.identify(TOKEN)
        assert_secret_free(raised.value)
    assert inner.now_calls == 1
    assert len(auth) == 1
    forgetful = CachedAuthenticator(inner, Metrics(), ttl=30, size=100, refusals=0)
    for _ in range(2):
        with pytest.raises(InvalidToken):
            await forgetful.identify(TOKEN)
    assert inner.now_calls == 3
    assert len(forgetful) == 0


async def test_an_unexpected_error_of_a_local_check_is_unavailable_and_not_cached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in a local check answers 4503, logs its type only, and is asked again next time."""
    inner = LocalInner(KeyError(TOKEN))
    auth = cached(inner)
    for _ in range(2):
        with pytest.raises(AuthUnavailable) as raised:
            await auth.identify(TOKEN)
        assert_secret_free(raised.value)
    assert inner.now_calls == 2
    assert TOKEN not in caplog.text
    assert {r.error for r in caplog.records if r.name == "notify.auth"} == {"KeyError"}  # type: ignore[attr-defined]


async def test_jwt_behind_the_cache_refuses_what_it_refuses_alone() -> None:
    """The real local check through the cache: valid in, expired and forged out, no token leaks."""
    settings = Settings.from_env({"AUTH_MODE": "jwt", "AUTH_JWT_SECRET": SECRET})
    auth = service.auth.build_authenticator(settings, Metrics())
    exp = soon()
    assert await auth.identify(hs_token({"sub": USER, "exp": exp})) == Identity(USER, float(exp))
    forged = hs_token({"sub": USER}, secret="another-secret-that-is-also-long-enough")
    for token in (forged, hs_token({"sub": USER, "exp": int(time.time()) - 60})):
        for _ in range(2):  # once checked, once from the cache
            with pytest.raises(InvalidToken) as raised:
                await auth.identify(token)
            assert_secret_free(raised.value, token)
    await auth.close()


# --- sockets waiting for their token check ------------------------------------------------------


def test_unauthenticated_sockets_are_bounded_in_total_and_per_address() -> None:
    """Past the per-address bound one address is refused, others not; past the total, all."""
    waiting = Unauthenticated(total=5, per_address=2, metrics=Metrics())
    assert waiting.enter("10.0.0.1") is None
    assert waiting.enter("10.0.0.1") is None
    assert waiting.enter("10.0.0.1") == "address"
    assert waiting.enter("10.0.0.2") is None
    waiting.leave("10.0.0.1")
    assert waiting.enter("10.0.0.1") is None
    assert waiting.enter("10.0.0.3") is None
    assert waiting.enter("10.0.0.4") is None
    assert waiting.enter("10.0.0.5") == "total"
    assert len(waiting) == 5
    for address in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        waiting.leave(address)
    assert len(waiting) == 0
    assert waiting.enter("10.0.0.5") is None


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2:bbbb::9]", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("/run/notify.sock", "/run/notify.sock"),
    ],
)
def test_one_ipv6_host_counts_as_its_64(address: str, key: str) -> None:
    """An IPv6 client cannot escape the per-address bound by changing its interface id."""
    assert address_key(address) == key
