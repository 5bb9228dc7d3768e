"""What every benchmark process agrees on: user ids, tokens, the frame and message shapes.

The frame a client receives is ~150 bytes of UTF-8 JSON, ``{"title":"bench","body":"..."}``,
whose body starts with a 16-digit microsecond wall-clock timestamp (when the message was
made: by the producer for the gateway, by the send loop for the bare baseline), so a client
can read the latency of each frame from a fixed offset without parsing JSON.
"""

from __future__ import annotations

import resource
import time
import uuid

import orjson

TITLE = "bench"
FRAME_BYTES = 150
# '{"title":"bench","body":"' then the body, then '"}'
BODY_OFFSET = len('{"title":"bench","body":"')
BODY_CHARS = FRAME_BYTES - BODY_OFFSET - 2
TS_DIGITS = 16

# User populations: each scenario draws its users from its own range.
LIVE = 0  # connected users of the live, paced and storm scenarios
OFFLINE = 1  # users who are never connected (offline store)
FLUSH = 2  # the one user with a stored backlog (flush on connect)
STORM = 3  # fresh users of the JWT-local connect storm
SCALE = 4  # scale-out: SCALE + i for its i-th gateway set-up (4, 5, 6, ...)
ACKED = 16  # v1 against v2 with every client acknowledging

BENCH_SECRET = "bench-only-secret-not-for-production"


def user_id(population: int, index: int) -> str:
    """A canonical lower-case UUID, like the platform's user ids."""
    return f"00000000-0000-4{population:03x}-8000-{index:012x}"


def now_us() -> int:
    return time.time_ns() // 1000


def body(ts_us: int, seq: int) -> str:
    head = f"{ts_us:016d} {seq:09d} "
    return head + "x" * (BODY_CHARS - len(head))


def frame(ts_us: int, seq: int) -> str:
    """The exact text frame the gateway sends for a bench message (orjson's compact form)."""
    return orjson.dumps({"title": TITLE, "body": body(ts_us, seq)}).decode()


def message(user: str, ts_us: int, seq: int) -> bytes:
    """A Kafka value for ``user`` as the gateway takes it (README, "Kafka input"): one JSON
    object with ``message_id``, ``delivery_method`` ``push``, ``user_id``, ``subject`` and
    ``content``."""
    return orjson.dumps(
        {
            "message_id": str(uuid.uuid4()),
            "delivery_method": "push",
            "user_id": user,
            "subject": TITLE,
            "content": body(ts_us, seq),
        }
    )


def token(user: str, salt: str, exp: int, secret: str = BENCH_SECRET) -> str:
    """An HS256 access token; ``salt`` makes it unique, so a new salt means an uncached check."""
    import jwt

    claims = {"sub": user, "type": "access", "exp": exp, "jti": f"{salt}:{user}"}
    return jwt.encode(claims, secret, algorithm="HS256")


def personal_channel(user: str) -> str:
    """A user's personal channel in the Centrifugo peer (its namespace ``personal``)."""
    return f"personal:{user}"


def centrifugo_token(user: str, exp: int, secret: str = BENCH_SECRET) -> str:
    """An HS256 connection token for the Centrifugo peer: its ``channels`` claim subscribes
    the connection to the user's personal channel on the server's side."""
    import jwt

    claims = {"sub": user, "exp": exp, "channels": [personal_channel(user)]}
    return jwt.encode(claims, secret, algorithm="HS256")


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's open-file limit as far as allowed; returns the soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except OSError:
        ceiling = want
    target = min(max(want, hard), ceiling)
    for limits in ((target, target), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


assert len(frame(now_us(), 1)) == FRAME_BYTES
