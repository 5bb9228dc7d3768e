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
import functools
import hashlib
import ipaddress
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import jwt
import orjson
from jwt.algorithms import Algorithm

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
            # As many connections as checks may run at once (AUTH_CONCURRENCY).
            limits=httpx.Limits(
                max_connections=settings.auth_concurrency,
                max_keepalive_connections=min(20, settings.auth_concurrency),
            ),
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


class KeySetUnavailable(Exception):
    """The JWKS endpoint gave no usable key set (unreachable, timeout, bad answer)."""


class _KeySet(jwt.PyJWKClient):
    """PyJWKClient whose every failure of the endpoint is one exception type.

    PyJWT raises a connection error for some failures, ``PyJWKClientError`` for an
    answer that is not an object, ``PyJWKSetError`` for a set without usable keys, and
    lets a body that is not JSON escape as ``ValueError``; only "no key with this
    ``kid``" is about the token. Everything about the set becomes
    :class:`KeySetUnavailable` (named by type only: messages may hold the URL).
    """

    def get_signing_keys(self, refresh: bool = False) -> list[jwt.PyJWK]:
        try:
            return super().get_signing_keys(refresh)
        except Exception as exc:
            raise KeySetUnavailable(type(exc).__name__) from None

    def cached_set(self) -> jwt.PyJWKSet | None:
        """The key set fetched less than its lifespan (5 minutes) ago, else None; no I/O.

        Reads one reference the fetching thread replaces whole, so it is safe to call
        from the event loop while a fetch runs.
        """
        return self.jwk_set_cache.get() if self.jwk_set_cache is not None else None


# Seconds of clock difference allowed for ``exp``, ``nbf`` and ``iat``.
LEEWAY = 5.0

# Three base64url segments, none empty: ``alg: none`` tokens (no signature) stop here.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

# An algorithm and the key it verifies with, prepared once (a PEM parsed, a secret checked).
_Verifier = tuple[Algorithm, Any]


def _segment(text: str) -> Any:
    """A base64url JSON segment of a JWT, decoded; ValueError if it is neither."""
    return orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class _Jws:
    """A JWT split and its header read, its signature not yet checked."""

    signing_input: bytes
    signature: bytes
    payload: str
    alg: str
    kid: str | None


class JwtAuthenticator:
    """Verifies a JWT locally: signature, ``exp``, and optionally ``iss``, ``aud``, ``type``.

    Only the configured algorithms are accepted (``none`` never): the token's ``alg``
    picks among them, and each is bound to the key prepared for it at start, so a
    token cannot make an HMAC check use an RSA public key as its secret. ``exp`` is
    required; ``exp``, ``nbf`` and ``iat`` are checked with 5 s of leeway, ``iss``
    and ``aud`` when configured; the claims PyJWT checks for type (``sub``,
    ``jti``) are checked the same way. The signature is verified by PyJWT's
    algorithm objects; the token is parsed once, with orjson.

    With a JWKS URL, the key set is fetched (at most ``AUTH_TIMEOUT`` per request, one
    at a time in a thread of its own) and kept for 5 minutes; an unknown ``kid``
    refetches it at most every 30 s. An endpoint that fails in any way is
    "unavailable" (4503); a token naming no key of the set, or a key that cannot
    verify it, is invalid (4401).

    :meth:`identify_now` checks a token without I/O when it can (a fixed key, or a
    JWKS key set already held that names the token's ``kid``); :meth:`identify`
    fetches the key set first when it must. Both are safe to call concurrently.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._algorithms = frozenset(
            alg for alg in settings.auth_jwt_algorithms if alg.lower() != "none"
        )
        self._jwks = (
            _KeySet(settings.auth_jwt_jwks_url, timeout=settings.auth_timeout)
            if settings.auth_jwt_jwks_url
            else None
        )
        # PyJWKClient serialises lookups on a lock; one thread keeps a stuck fetch
        # from tying up the loop's default executor (DNS lookups run there).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jwks")
        # A fixed key, prepared once per algorithm. An algorithm the key does not suit
        # (an HS* check given a PEM, an RS* check given a secret) has no entry: its
        # tokens are refused.
        self._fixed: dict[str, _Verifier] = {}
        if self._jwks is None:
            key = settings.auth_jwt_secret or settings.auth_jwt_public_key
            for alg in self._algorithms:
                verifier = _prepare(alg, key)
                if verifier is not None:
                    self._fixed[alg] = verifier
        # The verifiers of the key set last seen, by (kid, alg); replaced with the set.
        self._set: jwt.PyJWKSet | None = None
        self._set_verifiers: dict[tuple[str, str], _Verifier | None] = {}
        self._audience = settings.auth_jwt_audience
        self._issuer = settings.auth_jwt_issuer

    def identify_now(self, token: str) -> Identity | None:
        """The identity behind ``token``, or None when the check needs the JWKS endpoint.

        No I/O and no await: the answer for a fixed key, or for a ``kid`` of the key set
        held. Raises InvalidToken (never with the token in its message).
        """
        jws = self._parse(token)
        verifier = self._verifier(jws)
        if verifier is None:
            return None
        return self._verify(jws, verifier)

    async def identify(self, token: str) -> Identity:
        jws = self._parse(token)
        verifier = self._verifier(jws)
        if verifier is None:
            found = await self._signing_key(token)
            verifier = _prepare(jws.alg, found.key)
            if verifier is None:
                raise InvalidToken("no usable key for this token")
        return self._verify(jws, verifier)

    def _parse(self, token: str) -> _Jws:
        """Split ``token`` and read its header; InvalidToken if it is no JWS we accept."""
        if not _COMPACT_JWS.fullmatch(token):
            raise InvalidToken("malformed token")
        header_text, payload_text, signature_text = token.split(".")
        try:
            header = _segment(header_text)
            signature = base64.urlsafe_b64decode(signature_text + "=" * (-len(signature_text) % 4))
        except ValueError:
            raise InvalidToken("malformed token") from None
        if not isinstance(header, dict):
            raise InvalidToken("malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("invalid token (InvalidAlgorithmError)")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("invalid token (InvalidTokenError)")
        # No JWS extension is supported: a critical one (or an unencoded payload,
        # RFC 7797) would change what the signature covers.
        if "crit" in header or header.get("b64", True) is not True:
            raise InvalidToken("invalid token (InvalidTokenError)")
        signing_input = f"{header_text}.{payload_text}".encode()
        return _Jws(signing_input, signature, payload_text, alg, kid)

    def _verifier(self, jws: _Jws) -> _Verifier | None:
        """The prepared key for ``jws``; None when the key set must be fetched first.

        Raises InvalidToken when the key held cannot verify this token's algorithm.
        """
        if self._jwks is None:
            verifier = self._fixed.get(jws.alg)
            if verifier is None:
                raise InvalidToken("no usable key for this token")
            return verifier
        if jws.kid is None:
            return None
        key_set = self._jwks.cached_set()
        if key_set is None:
            return None
        if key_set is not self._set:
            self._set, self._set_verifiers = key_set, {}
        index = (jws.kid, jws.alg)
        if index not in self._set_verifiers:
            # The key set's signing keys, as PyJWKClient chooses them.
            key = next(
                (
                    k
                    for k in key_set.keys
                    if k.key_id == jws.kid and k.public_key_use in ("sig", None)
                ),
                None,
            )
            if key is None:
                # Unknown here: the fetching path decides (and may refetch the set).
                return None
            self._set_verifiers[index] = _prepare(jws.alg, key.key)
        verifier = self._set_verifiers[index]
        if verifier is None:
            raise InvalidToken("no usable key for this token")
        return verifier

    async def _signing_key(self, token: str) -> jwt.PyJWK:
        assert self._jwks is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._settings.auth_timeout):
                found = await loop.run_in_executor(
                    self._executor, self._jwks.get_signing_key_from_jwt, token
                )
        except TimeoutError:
            raise AuthUnavailable("JWKS endpoint timed out") from None
        except KeySetUnavailable as exc:
            log.warning("jwks_unavailable", extra={"error": str(exc)})
            raise AuthUnavailable("JWKS endpoint unavailable") from None
        except jwt.PyJWKClientError:
            raise InvalidToken("no signing key for this token") from None
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        return found

    def _verify(self, jws: _Jws, verifier: _Verifier) -> Identity:
        """Check the signature, then the claims; InvalidToken naming what failed."""
        algorithm, key = verifier
        try:
            signed = algorithm.verify(jws.signing_input, key, jws.signature)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise InvalidToken(f"no usable key for this token ({type(exc).__name__})") from None
        if not signed:
            raise InvalidToken("invalid token (InvalidSignatureError)")
        try:
            claims = _segment(jws.payload)
        except ValueError:
            raise InvalidToken("malformed token") from None
        if not isinstance(claims, dict):
            raise InvalidToken("malformed token")
        self._check_claims(claims)
        s = self._settings
        if s.auth_jwt_require_access_type and claims.get("type") != "access":
            raise InvalidToken("not an access token")
        user_id = _user_id(_lookup(claims, s.auth_jwt_user_id_claim))
        if user_id is None:
            raise InvalidToken(f"token has no usable '{s.auth_jwt_user_id_claim}' claim")
        return Identity(user_id, float(claims["exp"]))

    def _check_claims(self, claims: dict[str, Any]) -> None:
        """The registered claims, as PyJWT checks them (``exp`` required); InvalidToken."""
        now = time.time()
        exp = claims.get("exp")
        if exp is None:
            raise InvalidToken("invalid token (MissingRequiredClaimError)")
        if not _number(exp):
            raise InvalidToken("invalid token (DecodeError)")
        if exp <= now - LEEWAY:
            raise InvalidToken("token expired")
        if "nbf" in claims:
            nbf = claims["nbf"]
            if not _number(nbf):
                raise InvalidToken("invalid token (DecodeError)")
            if nbf > now + LEEWAY:
                raise InvalidToken("invalid token (ImmatureSignatureError)")
        if "iat" in claims:
            iat = claims["iat"]
            if not _number(iat):
                raise InvalidToken("invalid token (InvalidIssuedAtError)")
            if iat > now + LEEWAY:
                raise InvalidToken("invalid token (ImmatureSignatureError)")
        if self._issuer:
            if "iss" not in claims:
                raise InvalidToken("invalid token (MissingRequiredClaimError)")
            if claims["iss"] != self._issuer:
                raise InvalidToken("invalid token (InvalidIssuerError)")
        if self._audience:
            audience = claims.get("aud")
            if not audience:
                raise InvalidToken("invalid token (MissingRequiredClaimError)")
            if isinstance(audience, str):
                audience = [audience]
            if not isinstance(audience, list) or not all(isinstance(a, str) for a in audience):
                raise InvalidToken("invalid token (InvalidAudienceError)")
            if self._audience not in audience:
                raise InvalidToken("invalid token (InvalidAudienceError)")
        if "sub" in claims and not isinstance(claims["sub"], str):
            raise InvalidToken("invalid token (InvalidSubjectError)")
        if "jti" in claims and not isinstance(claims["jti"], str):
            raise InvalidToken("invalid token (InvalidJTIError)")

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _prepare(alg: str, key: Any) -> _Verifier | None:
    """PyJWT's algorithm ``alg`` with ``key`` prepared for it; None if the key does not suit."""
    try:
        algorithm = jwt.get_algorithm_by_name(alg)
        return algorithm, algorithm.prepare_key(key)
    except (jwt.PyJWTError, NotImplementedError, ValueError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A check that did not give an identity: ``retry`` says 4503 (True) or 4401 (False).

    A plain value on purpose: an exception kept past its handler keeps its traceback,
    the traceback the handler's frame, and the frame the request and its socket.
    """

    reason: str
    retry: bool

    def exception(self) -> InvalidToken | AuthUnavailable:
        return AuthUnavailable(self.reason) if self.retry else InvalidToken(self.reason)


class CachedAuthenticator:
    """Remembers answers by SHA-256 of the token for ``ttl`` seconds, never past ``exp``.

    Valid and invalid answers are cached, "unavailable" never is. The cache holds plain
    values only (``until`` and a user id and expiry, or a refusal's reason): nothing of
    the connection that asked. Refusals have a bound of their own (``refusals``), smaller
    than ``size``, so a flood of distinct bad tokens cannot push out the valid ones.
    Expired entries are swept on every insert.

    A token whose unverified ``exp`` has passed is refused (4401) here, without a
    remote call. An inner authenticator with ``identify_now`` (the local JWT check) is
    asked that first: it answers without I/O, so its answer is taken at once, with no
    task, slot or timeout around it. Checks that need I/O (the auth service, a JWKS
    fetch) are shared: concurrent checks of one token share a single request, so a
    reconnect storm is one auth call; at most ``concurrency`` of them run at once, the
    others wait in turn, and one that has no answer within ``timeout`` (waiting
    included) is "unavailable". Any other exception of the inner authenticator is
    logged by type and answered as "unavailable".
    """

    def __init__(
        self,
        inner: Authenticator,
        metrics: Metrics,
        *,
        ttl: float,
        size: int,
        refusals: int | None = None,
        concurrency: int = 100,
        timeout: float = 30.0,
    ) -> None:
        self._inner = inner
        self._metrics = metrics
        self._ttl = ttl
        self._size = size
        self._refusal_size = size if refusals is None else min(refusals, size)
        self._timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        # Insertion order; every entry is (until, identity) or (until, reason).
        self._valid: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()
        self._refused: OrderedDict[bytes, tuple[float, str]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Identity | Refusal]] = {}
        # An inner authenticator that can answer without I/O says so with identify_now.
        self._identify_now: Callable[[str], Identity | None] | None = getattr(
            inner, "identify_now", None
        )
        # The histogram's children, looked up once rather than on every check.
        self._seconds = {
            outcome: metrics.auth_seconds.labels(outcome)
            for outcome in ("valid", "invalid", "unavailable")
        }
        self._entries_valid = metrics.auth_cache_entries.labels("valid")
        self._entries_refused = metrics.auth_cache_entries.labels("refused")

    def __len__(self) -> int:
        """Cached answers, valid and refused."""
        return len(self._valid) + len(self._refused)

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
            self._seconds[outcome].observe(time.perf_counter() - started)

    async def _identify(self, token: str) -> Identity:
        now = time.time()
        key = _token_key(token)
        valid = self._valid.get(key)
        if valid is not None:
            # Kept until exp at most (``_remember``): a token found here has not expired.
            if now < valid[0]:
                self._metrics.auth_cache_hits.inc()
                return valid[1]
            del self._valid[key]
        expiry = unverified_expiry(token)
        if expiry is not None and expiry <= now:
            # Expired whoever signed it: no need to ask anyone.
            raise InvalidToken("token expired")
        refused = self._refused.get(key)
        if refused is not None:
            if now < refused[0]:
                self._metrics.auth_cache_hits.inc()
                raise InvalidToken(refused[1])
            del self._refused[key]
        check = self._inflight.get(key)
        if check is None and self._identify_now is not None:
            # A check that needs no I/O (a local JWT) runs here and now: no task, no
            # slot, no timeout, nothing to share. Only when it cannot (a JWKS key set
            # to fetch) does it take the shared, bounded path below.
            identity = self._check_now(key, token)
            if identity is not None:
                self._remember(key, identity)
                return identity
        if check is None:
            # The check runs in a task of its own: a client that leaves (its
            # handler cancelled) must not fail the others waiting on it.
            check = asyncio.get_running_loop().create_task(self._check(key, token))
            self._inflight[key] = check
        answer = await asyncio.shield(check)
        if isinstance(answer, Refusal):
            # A new exception in this frame: the task's result stays a plain value.
            raise answer.exception()
        return answer

    def _check_now(self, key: bytes, token: str) -> Identity | None:
        """The inner check without I/O, or None if it needs some; raises like ``_check`` answers.

        A refusal is remembered under ``key`` before it is raised; an unexpected error
        of the check is logged by type and raised as "unavailable", as on the shared path.
        """
        assert self._identify_now is not None
        try:
            return self._identify_now(token)
        except InvalidToken as exc:
            refusal = Refusal(exc.reason, retry=False)
        except Exception as exc:
            log.error("auth_check_failed", extra={"error": type(exc).__name__})
            raise AuthUnavailable("internal error") from None
        self._remember(key, refusal)
        raise refusal.exception()

    async def _check(self, key: bytes, token: str) -> Identity | Refusal:
        """The inner check's answer as a value; never raises (but CancelledError)."""
        answer: Identity | Refusal
        running = False
        try:
            async with asyncio.timeout(self._timeout):
                async with self._slots:
                    running = True
                    self._metrics.auth_checks_running.inc()
                    try:
                        answer = await self._inner.identify(token)
                    finally:
                        self._metrics.auth_checks_running.dec()
        except InvalidToken as exc:
            answer = Refusal(exc.reason, retry=False)
        except AuthUnavailable as exc:
            answer = Refusal(exc.reason, retry=True)
        except TimeoutError:
            answer = Refusal("timeout" if running else "too many token checks", retry=True)
        except Exception as exc:
            log.error("auth_check_failed", extra={"error": type(exc).__name__})
            answer = Refusal("internal error", retry=True)
        finally:
            del self._inflight[key]
        self._remember(key, answer)
        return answer

    def _remember(self, key: bytes, answer: Identity | Refusal) -> None:
        if self._ttl <= 0:
            return
        now = time.time()
        until = now + self._ttl
        if isinstance(answer, Identity):
            if answer.expires_at is not None:
                until = min(until, answer.expires_at)
            _insert(self._valid, key, (until, answer), self._size, now)
        elif not answer.retry:
            _insert(self._refused, key, (until, answer.reason), self._refusal_size, now)
        else:
            return
        self._entries_valid.set(len(self._valid))
        self._entries_refused.set(len(self._refused))

    async def close(self) -> None:
        self._valid.clear()
        self._refused.clear()
        await self._inner.close()


def _token_key(token: str) -> bytes:
    """What the cache keys a token by: its SHA-256, so no entry holds the token."""
    return hashlib.sha256(token.encode(errors="surrogatepass")).digest()


def _insert(
    entries: OrderedDict[bytes, tuple[float, Any]],
    key: bytes,
    entry: tuple[float, Any],
    bound: int,
    now: float,
) -> None:
    """Add ``entry`` last; drop expired entries from the front, then the oldest over ``bound``.

    Entries are in insertion order and ``until`` is at most insertion time + TTL, so
    everything inserted more than a TTL ago is at the front: the sweep costs one look
    per insert plus one per entry it removes.
    """
    if bound <= 0:
        return
    entries.pop(key, None)
    entries[key] = entry
    while entries:
        oldest = next(iter(entries.values()))
        if oldest[0] > now and len(entries) <= bound:
            break
        entries.popitem(last=False)


@functools.lru_cache(maxsize=4096)
def address_key(address: str) -> str:
    """What the per-address limit counts ``address`` as: an IPv4 address, an IPv6 /64.

    One IPv6 host usually holds a whole /64 and can change addresses within it at
    will; anything that is not an IP address (a Unix socket) counts as itself. The
    answers for the last 4096 addresses are kept: a connect asks twice (in and out),
    and parsing an address costs more than the rest of the limiter.
    """
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Unauthenticated:
    """Sockets whose token is still being checked: at most ``total``, ``per_address`` each.

    ``enter`` counts a socket in or says which bound it hit; every socket counted in is
    counted out once with ``leave``. Not thread-safe: used from one event loop, where
    neither call awaits.
    """

    def __init__(self, total: int, per_address: int, metrics: Metrics) -> None:
        self._total = total
        self._per_address = per_address
        self._metrics = metrics
        self._count = 0
        self._by_address: dict[str, int] = {}
        # Read when scraped, not set on every connect.
        metrics.unauthenticated.set_function(self.__len__)

    def __len__(self) -> int:
        return self._count

    def enter(self, address: str) -> str | None:
        """Count a socket from ``address`` in; or "total" / "address" when over a bound."""
        if self._count >= self._total:
            return "total"
        key = address_key(address)
        count = self._by_address.get(key, 0)
        if count >= self._per_address:
            return "address"
        self._by_address[key] = count + 1
        self._count += 1
        return None

    def leave(self, address: str) -> None:
        """Count out a socket that ``enter`` counted in."""
        key = address_key(address)
        count = self._by_address.get(key, 0) - 1
        if count > 0:
            self._by_address[key] = count
        else:
            self._by_address.pop(key, None)
        self._count = max(0, self._count - 1)


def build_authenticator(settings: Settings, metrics: Metrics) -> Authenticator:
    """The authenticator the settings ask for, behind the cache."""
    inner: Authenticator
    if settings.auth_mode == "jwt":
        inner = JwtAuthenticator(settings)
    else:
        inner = RemoteAuthenticator(settings)
    return CachedAuthenticator(
        inner,
        metrics,
        ttl=settings.auth_cache_ttl,
        size=settings.auth_cache_size,
        refusals=settings.auth_cache_refusals,
        concurrency=settings.auth_concurrency,
        timeout=settings.auth_timeout,
    )
