"""The Redis client's pieces that need no Redis: addresses and command packing."""

from __future__ import annotations

import hiredis
import pytest

from service.resp import Address, pack


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", Address("127.0.0.1", 6379)),
        ("redis://redis", Address("redis", 6379)),
        ("redis://:s%40cret@redis:6380/2", Address("redis", 6380, db=2, password="s@cret")),
        (
            "rediss://gateway:pw@cache.example:6390",
            Address("cache.example", 6390, tls=True, username="gateway", password="pw"),
        ),
        ("unix:///run/redis.sock?db=3", Address(path="/run/redis.sock", db=3)),
    ],
)
def test_urls_are_read_as_documented(url: str, expected: Address) -> None:
    assert Address.parse(url) == expected


@pytest.mark.parametrize(
    "url", ["http://redis:6379", "redis://redis:port", "redis://:hunter2@redis/notadb"]
)
def test_a_malformed_url_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        Address.parse(url)
    assert "hunter2" not in str(refused.value) and url not in str(refused.value)


def test_the_password_is_not_in_the_repr() -> None:
    assert "hunter2" not in repr(Address.parse("redis://:hunter2@redis:6379/0"))


def test_packed_commands_are_resp_as_redis_reads_them() -> None:
    assert pack("PUBLISH", b"user:1", 42) == hiredis.pack_command(("PUBLISH", b"user:1", 42))  # type: ignore[arg-type]
    assert pack("SUBSCRIBE", "a", "b") == b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$1\r\nb\r\n"
