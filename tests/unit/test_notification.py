"""Parsing Kafka values: the frame clients see, skips, and every kind of poison message."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from service.notification import Notification, PoisonMessage, Skip, parse

SEED = (
    '{"message_id": "123e4567-e89b-12d3-a456-426614174000","delivery_method": "push",'
    '"user_id": "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce","subject":"Новый фильм", '
    '"content": "Фильм \'Как закалялась сталь\' теперь доступен для просмотра"}'
).encode()

GOOD: dict[str, Any] = {
    "message_id": "123e4567-e89b-12d3-a456-426614174000",
    "delivery_method": "push",
    "user_id": "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce",
    "subject": "s",
    "content": "c",
}


def value(**changes: Any) -> bytes:
    """The good document with fields replaced (or removed when given ``...``)."""
    document = {**GOOD, **changes}
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


def test_seed_message_becomes_the_documented_frame() -> None:
    """The platform's example message reaches the client as exactly the documented frame."""
    result = parse(SEED, 1_700_000_000_000)
    assert isinstance(result, Notification)
    assert result.frame == (
        '{"title":"Новый фильм",'
        '"body":"Фильм \'Как закалялась сталь\' теперь доступен для просмотра"}'
    )
    assert "\\u" not in result.frame
    assert json.loads(result.frame) == {
        "title": "Новый фильм",
        "body": "Фильм 'Как закалялась сталь' теперь доступен для просмотра",
    }
    assert result.message_id == "123e4567-e89b-12d3-a456-426614174000"
    assert result.user_id == "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce"
    assert result.created_ms == 1_700_000_000_000


def test_upper_case_user_uuid_is_canonicalised() -> None:
    """A user id written as an upper-case UUID reaches the same user as its lower-case form."""
    result = parse(value(user_id="B1FE6A68-F7B5-4C2C-A52B-97494403D2CE"), 0)
    assert isinstance(result, Notification)
    assert result.user_id == "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce"


def test_a_plain_user_id_is_kept_as_is() -> None:
    """A user id that is not a UUID is used unchanged (case and all)."""
    result = parse(value(user_id="Alice"), 0)
    assert isinstance(result, Notification)
    assert result.user_id == "Alice"


@pytest.mark.parametrize("look_alike", ["0x" + "ab" * 15, "١" * 32])
def test_a_user_id_that_only_looks_like_a_uuid_is_not_rewritten(look_alike: str) -> None:
    """A user id that is not a real UUID is not turned into another user's UUID."""
    result = parse(value(user_id=look_alike), 0)
    assert isinstance(result, Notification)
    assert result.user_id == look_alike


@pytest.mark.parametrize("method", ["email", "sms", "PUSH", ""])
def test_other_delivery_methods_are_skipped(method: str) -> None:
    """A message for another delivery method is skipped, not delivered and not dead-lettered."""
    result = parse(value(delivery_method=method), 0)
    assert isinstance(result, Skip)
    assert result.delivery_method == method


def test_a_skipped_message_needs_no_push_fields() -> None:
    """An e-mail message without push fields is skipped rather than treated as poison."""
    assert isinstance(parse(json.dumps({"delivery_method": "email"}).encode(), 0), Skip)


def test_unknown_fields_are_ignored() -> None:
    """Extra fields a producer adds do not stop delivery."""
    result = parse(value(priority=5, meta={"a": [1, 2]}, subject="Hi"), 0)
    assert isinstance(result, Notification)
    assert json.loads(result.frame) == {"title": "Hi", "body": "c"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty_value"),
        (b"\xff\xfe{}", "invalid_json"),
        (b'{"subject": "\xc3\x28"}', "invalid_json"),
        (b"not json at all", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"message_id": ', "invalid_json"),
        (b"[1, 2, 3]", "not_an_object"),
        (b'"push"', "not_an_object"),
        (b"null", "not_an_object"),
        (b"[" * 2000 + b"]" * 2000, "invalid_json"),
        (b'{"a":' * 1100 + b"1" + b"}" * 1100, "invalid_json"),
        (value(delivery_method=...), "missing_delivery_method"),
        (value(delivery_method=None), "invalid_delivery_method"),
        (value(message_id=...), "missing_message_id"),
        (value(message_id=123), "invalid_message_id"),
        (value(message_id="not-a-uuid"), "invalid_message_id"),
        (value(message_id=""), "invalid_message_id"),
        (value(user_id=...), "missing_user_id"),
        (value(user_id=None), "invalid_user_id"),
        (value(user_id=42), "invalid_user_id"),
        (value(user_id=""), "invalid_user_id"),
        (value(user_id="   "), "invalid_user_id"),
        (value(user_id="u" * 256), "invalid_user_id"),
        (value(subject=...), "missing_subject"),
        (value(subject=None), "invalid_subject"),
        (value(subject=["a"]), "invalid_subject"),
        (value(content=...), "missing_content"),
        (value(content={"text": "x"}), "invalid_content"),
        (value(content=1.5), "invalid_content"),
        (value(content="x" * (64 * 1024)), "too_large"),
        (value(subject="a\x00b"), "invalid_subject"),
        (value(content="\x00"), "invalid_content"),
        (value(user_id="al\x00ice"), "invalid_user_id"),
        (value(delivery_method="push\x00"), "invalid_delivery_method"),
        (value(message_id="\x00"), "invalid_message_id"),
    ],
)
def test_poison_messages_are_refused_with_their_reason(raw: bytes | None, reason: str) -> None:
    """Each broken value raises PoisonMessage with the short reason put in the DLQ header."""
    with pytest.raises(PoisonMessage) as raised:
        parse(raw, 0)
    assert raised.value.reason == reason


def test_a_nul_outside_the_five_fields_refuses_nothing() -> None:
    """A NUL in another field, or a backslash before ``u0000``, is no NUL in a field of ours."""
    extra = json.dumps({**GOOD, "meta": "\x00"}).encode()
    assert isinstance(parse(extra, 0), Notification)
    escaped = parse(value(subject="C:\\u0000"), 0)
    assert isinstance(escaped, Notification)
    assert escaped.title == "C:\\u0000"


def test_user_id_of_255_characters_is_accepted() -> None:
    """A user id at the 255-character limit is still delivered."""
    result = parse(value(user_id="u" * 255), 0)
    assert isinstance(result, Notification)


def test_64_kib_is_the_exact_size_limit() -> None:
    """A value of exactly 64 KiB is delivered; one byte more is poison."""
    overhead = len(value(content=""))
    raw = value(content="x" * (64 * 1024 - overhead))
    assert len(raw) == 64 * 1024
    assert isinstance(parse(raw, 0), Notification)
    with pytest.raises(PoisonMessage) as raised:
        parse(value(content="x" * (64 * 1024 - overhead + 1)), 0)
    assert raised.value.reason == "too_large"


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
field_values = json_values | st.text(max_size=300) | st.uuids().map(str) | st.just("push")
documents = st.fixed_dictionaries(
    {},
    optional={
        name: field_values
        for name in ("message_id", "delivery_method", "user_id", "subject", "content")
    },
)
push_documents = st.fixed_dictionaries(
    {
        "delivery_method": st.just("push"),
        "message_id": st.uuids().map(str) | field_values,
        "user_id": field_values,
        "subject": st.text() | field_values,
        "content": st.text() | field_values,
    },
    optional={"extra": json_values},
)


def check_outcome(raw: bytes) -> None:
    try:
        result = parse(raw, 0)
    except PoisonMessage as exc:
        assert exc.reason
        event(f"poison {exc.reason}")
        return
    event(type(result).__name__)
    assert isinstance(result, Notification | Skip)
    if isinstance(result, Notification):
        assert json.loads(result.frame) == {"title": result.title, "body": result.body}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parser(raw: bytes) -> None:
    """Whatever bytes arrive, the value is delivered, skipped or dead-lettered: never a crash."""
    check_outcome(raw)


@settings(max_examples=500, deadline=None)
@given(push_documents | documents | json_values, st.booleans())
def test_arbitrary_json_never_crashes_the_parser(document: Any, ascii_only: bool) -> None:
    """Whatever JSON arrives, the value is delivered, skipped or dead-lettered: never a crash."""
    check_outcome(json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))
