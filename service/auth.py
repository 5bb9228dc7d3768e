"""Token checks: who is connecting, asked of the auth service or read from a JWT.

Three implementations share one shape, :class:`Authenticator`:

* :class:`RemoteAuthenticator` asks the platform's auth service over HTTP;
* :class:`JwtAuthenticator` verifies a signed JWT locally;
* :class:`CachedAuthenticator` wraps either and remembers answers briefly, keyed
  by a hash of the token, never past the token's expiry.

A token is a secret: no exception, log line or metric here ever contains it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import jwt
import orjson

from .config import Settings
from .metrics import Metrics
from .notification import normalise_user_id

log = logging.getLogger("notify.auth")

INVALID_STATUSES = frozenset({401, 403, 422})


@dataclass(frozen=True, slots=True)
class Identity:
    """The user a connection belongs to; ``expires_at`` is the token's ``exp`` (epoch seconds)."""

    user_id: str
    expires_at: float | None = None


class InvalidToken(Exception):
    """The token is missing, malformed, expired or refused: the client needs a new one (4401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuthUnavailable(Exception):
    """The token could not be checked now (timeout, refused, 5xx): retry later (4503)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Authenticator(Protocol):
    async def identify(self, token: str) -> Identity:
        """Return the identity behind ``token``.

        Raises:
            InvalidToken: the token is not valid.
            AuthUnavailable: the check could not be made.
        Safe to call concurrently.
        """
        ...

    async def close(self) -> None:
        """Release connections; idempotent."""
        ...


def unverified_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT-shaped token without checking its signature, else None.

    Used only to bound caching and to close a connection when its token runs out;
    never to decide whether a token is valid.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


def _lookup(document: Any, path: str) -> Any:
    """Follow a dotted path (``claims.sub``) through nested objects; None when absent."""
    for part in path.split("."):
        if not isinstance(document, dict) or part not in document:
            return None
        document = document[part]
    return document


def _user_id(value: Any) -> str | None:
    """The user id of an auth answer's field, by the rule Kafka records obey too.

    A string or an integer (``42`` is ``"42"``), through :func:`normalise_user_id`:
    an id no Kafka record could address (empty, padded, unprintable, too long) is
    no usable id, rather than a login as a user nothing can ever reach.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return normalise_user_id(str(value))


class RemoteAuthenticator:
    """Asks the platform's auth service who owns a token.

    One pooled ``httpx.AsyncClient`` with explicit timeouts. Any 2xx (or the
    configured statuses) is valid, 401/403/422 invalid, anything else, a timeout
    or a refused connection is *unavailable*.
    """

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        timeout = httpx.Timeout(settings.auth_timeout, connect=min(settings.auth_timeout, 2.0))
        self._client = client or httpx.AsyncClient(
            timeout=timeout,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            follow_redirects=False,
            trust_env=False,
        )

    async def identify(self, token: str) -> Identity:
        s = self._settings
        if not (token.isascii() and token.isprintable()):
            # Tokens are ASCII; anything else cannot even be put in a header.
            raise InvalidToken("malformed token")
        headers: dict[str, str] = {"Accept": "application/json"}
        params: dict[str, str] = {}
        body: dict[str, str] | None = None
        match s.auth_token_in:
            case "bearer":
                headers["Authorization"] = f"Bearer {token}"
            case "header":
                headers[s.auth_token_name] = token
            case "cookie":
                headers["Cookie"] = f"{s.auth_token_name}={token}"
            case "json":
                body = {s.auth_token_name: token}
            case "query":
                params[s.auth_token_name] = token
        try:
            response = await self._client.request(
                s.auth_method, s.auth_verify_url, headers=headers, params=params, json=body
            )
        except httpx.TimeoutException:
            raise AuthUnavailable("timeout") from None
        except httpx.HTTPError as exc:
            # The exception text may hold the URL with the token in its query: drop it.
            raise AuthUnavailable(f"unreachable ({type(exc).__name__})") from None

        status = response.status_code
        valid = status in s.auth_valid_statuses if s.auth_valid_statuses else 200 <= status < 300
        if not valid:
            if status in INVALID_STATUSES:
                raise InvalidToken(f"refused by auth service ({status})")
            raise AuthUnavailable(f"auth service answered {status}")
        try:
            document = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:
            raise AuthUnavailable("auth service answered with a body that is not JSON") from None
        if s.auth_body_check and not self._body_ok(document):
            raise InvalidToken("auth service says the token is not valid")
        for path in s.user_id_fields:
            user_id = _user_id(_lookup(document, path))
            if user_id is not None:
                return Identity(user_id, unverified_expiry(token))
        log.error("auth_response_without_user_id", extra={"fields": list(s.user_id_fields)})
        raise AuthUnavailable("auth service answer holds no user id")

    def _body_ok(self, document: Any) -> bool:
        check = self._settings.auth_body_check
        if "==" in check:
            path, expected = (part.strip() for part in check.split("==", 1))
            value = _lookup(document, path)
            # Compare in JSON spelling, so `is_valid==true` matches a JSON true.
            text = value if isinstance(value, str) else orjson.dumps(value).decode()
            return text == expected
        return bool(_lookup(document, check))

    async def close(self) -> None:
        await self._client.aclose()


class JwtAuthenticator:
    """Verifies a JWT locally: signature, ``exp``, and optionally ``iss``, ``aud``, ``type``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._jwks = (
            jwt.PyJWKClient(settings.auth_jwt_jwks_url) if settings.auth_jwt_jwks_url else None
        )
        self._key: str = settings.auth_jwt_secret or settings.auth_jwt_public_key

    async def identify(self, token: str) -> Identity:
        s = self._settings
        key: Any = self._key
        if self._jwks is not None:
            try:
                key = (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
            except jwt.PyJWKClientConnectionError:
                raise AuthUnavailable("JWKS endpoint unreachable") from None
            except jwt.PyJWKClientError:
                raise InvalidToken("no signing key for this token") from None
            except jwt.InvalidTokenError:
                raise InvalidToken("malformed token") from None
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(s.auth_jwt_algorithms),
                audience=s.auth_jwt_audience or None,
                issuer=s.auth_jwt_issuer or None,
                options={"require": ["exp"], "verify_aud": bool(s.auth_jwt_audience)},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.InvalidTokenError as exc:
            # PyJWT's messages name claims, never the token itself.
            raise InvalidToken(f"invalid token ({type(exc).__name__})") from None
        if s.auth_jwt_require_access_type and claims.get("type") != "access":
            raise InvalidToken("not an access token")
        user_id = _user_id(_lookup(claims, s.auth_jwt_user_id_claim))
        if user_id is None:
            raise InvalidToken(f"token has no usable '{s.auth_jwt_user_id_claim}' claim")
        exp = claims.get("exp")
        return Identity(user_id, float(exp) if isinstance(exp, int | float) else None)

    async def close(self) -> None:
        return None


class CachedAuthenticator:
    """Remembers answers by SHA-256 of the token for ``ttl`` seconds, never past ``exp``.

    Valid and invalid answers are cached; "unavailable" never is. Concurrent checks
    of one token share a single request, so a reconnect storm is one auth call.
    """

    def __init__(self, inner: Authenticator, metrics: Metrics, *, ttl: float, size: int) -> None:
        self._inner = inner
        self._metrics = metrics
        self._ttl = ttl
        self._size = size
        self._entries: OrderedDict[bytes, tuple[float, Identity | InvalidToken]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Identity]] = {}

    async def identify(self, token: str) -> Identity:
        started = time.perf_counter()
        outcome = "unavailable"
        try:
            identity = await self._identify(token)
            outcome = "valid"
            return identity
        except InvalidToken:
            outcome = "invalid"
            raise
        finally:
            self._metrics.auth_seconds.labels(outcome).observe(time.perf_counter() - started)

    async def _identify(self, token: str) -> Identity:
        key = hashlib.sha256(token.encode()).digest()
        now = time.time()
        entry = self._entries.get(key)
        if entry is not None:
            until, answer = entry
            if now < until:
                self._metrics.auth_cache_hits.inc()
                if isinstance(answer, InvalidToken):
                    raise InvalidToken(answer.reason)
                return answer
            del self._entries[key]
        check = self._inflight.get(key)
        if check is None:
            # The check runs in a task of its own: a client that leaves (its
            # handler cancelled) must not fail the others waiting on it.
            check = asyncio.get_running_loop().create_task(self._check(key, token))
            check.add_done_callback(_retrieve)  # every waiter may have left
            self._inflight[key] = check
        return await asyncio.shield(check)

    async def _check(self, key: bytes, token: str) -> Identity:
        try:
            identity = await self._inner.identify(token)
        except InvalidToken as exc:
            self._remember(key, exc, None)
            raise
        else:
            self._remember(key, identity, identity.expires_at)
            return identity
        finally:
            del self._inflight[key]

    def _remember(
        self, key: bytes, answer: Identity | InvalidToken, expires_at: float | None
    ) -> None:
        if self._ttl <= 0 or self._size <= 0:
            return
        until = time.time() + self._ttl
        if expires_at is not None:
            until = min(until, expires_at)
        self._entries[key] = (until, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()
        await self._inner.close()


def _retrieve(task: asyncio.Task[Identity]) -> None:
    if not task.cancelled():
        task.exception()


def build_authenticator(settings: Settings, metrics: Metrics) -> Authenticator:
    """The authenticator the settings ask for, behind the cache."""
    inner: Authenticator
    if settings.auth_mode == "jwt":
        inner = JwtAuthenticator(settings)
    else:
        inner = RemoteAuthenticator(settings)
    return CachedAuthenticator(
        inner, metrics, ttl=settings.auth_cache_ttl, size=settings.auth_cache_size
    )
