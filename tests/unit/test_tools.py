"""The command-line tools without the network: arguments, line checks, close codes, v2 frames."""

from __future__ import annotations

import io
import json
import random
import uuid

import orjson
import pytest

from service.__main__ import main as service_main
from service.notification import MAX_VALUE_BYTES
from service.tools import main as tool_main
from service.tools.listener import (
    ACK_BATCH,
    MAX_RESUME_ACKS,
    Backoff,
    Listener,
    Session,
    Step,
    step_after,
)
from service.tools.sender import Refused, record_from_fields, record_from_line

NOW = 1_780_000_000_000


def fields(**overrides: object) -> dict[str, object]:
    return {"user_id": "u", "subject": "s", "content": "c", **overrides}


# --- send: one notification, one line ---


def test_missing_message_id_and_delivery_method_are_filled_in() -> None:
    """A record made from three fields carries a fresh UUID and ``push``."""
    record = record_from_fields(fields(), NOW)
    value = orjson.loads(record.value)
    assert uuid.UUID(value["message_id"]) and value["delivery_method"] == "push"
    assert record.message_id == value["message_id"] and record.skipped_as is None


def test_record_is_keyed_by_the_normalised_user_id() -> None:
    """Two spellings of one UUID user land on one partition key, as the consumer folds them."""
    upper = "B1FE6A68-F7B5-4C2C-A52B-97494403D2CE"
    record = record_from_fields(fields(user_id=upper), NOW)
    assert record.key == upper.lower().encode() and record.user_id == upper.lower()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"user_id": ""}, "user_id: empty (invalid_user_id)"),
        ({"user_id": "u "}, "user_id: leading or trailing whitespace (invalid_user_id)"),
        ({"user_id": "a\nb"}, "user_id: a character that is not printable (invalid_user_id)"),
        ({"message_id": "12"}, "message_id: not a UUID (invalid_message_id)"),
        ({"subject": None}, "subject: expected a string, got NoneType (invalid_subject)"),
        ({"content": "a\x00b"}, "content: contains a NUL character (invalid_content)"),
        ({"delivery_method": 3}, "delivery_method: expected a string, got int"),
        ({"content": "x" * MAX_VALUE_BYTES}, "(too_large)"),
    ],
)
def test_refusals_name_the_field_and_the_consumers_reason(
    overrides: dict[str, object], expected: str
) -> None:
    """What the consumer would dead-letter is refused, naming the field, why, and the reason."""
    with pytest.raises(Refused) as caught:
        record_from_fields(fields(**overrides), NOW)
    assert expected in str(caught.value)


def test_another_delivery_method_is_sent_but_marked_skipped() -> None:
    """A non-push record is valid input the gateway skips: sent, and said so."""
    record = record_from_fields(fields(delivery_method="email"), NOW)
    assert record.skipped_as == "email" and record.key == b"u"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object but list (not_an_object)"),
        (b'"text"', "not a JSON object but str"),
        (b'{"subject": "s", "content": "c"}', "user_id: missing (missing_user_id)"),
        (b'{"user_id": "u", "content": "c"}', "subject: missing (missing_subject)"),
        (b"\xff\xfe{}", "not JSON"),
    ],
)
def test_bad_lines_are_refused_with_a_reason(line: bytes, expected: str) -> None:
    """Each kind of bad line gets a message an operator can act on."""
    with pytest.raises(Refused) as caught:
        record_from_line(line, NOW)
    assert expected in str(caught.value)


def test_a_console_producer_line_is_accepted_as_is() -> None:
    """The README's seed line, fields and all, is a valid line for ``--file``."""
    line = json.dumps(
        {
            "message_id": "123e4567-e89b-12d3-a456-426614174000",
            "delivery_method": "push",
            "user_id": "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce",
            "subject": "Новый фильм",
            "content": "Фильм",
        },
        ensure_ascii=False,
    ).encode()
    record = record_from_line(line, NOW)
    assert record.message_id == "123e4567-e89b-12d3-a456-426614174000"
    assert orjson.loads(record.value) == orjson.loads(line)


@pytest.mark.parametrize(
    "argv",
    [
        ["send"],
        ["send", "--user-id", "u", "--subject", "s"],
        ["send", "--file", "x.jsonl", "--user-id", "u"],
        ["send", "--file", "x.jsonl", "--delivery-method", "push"],
        ["send", "--user-id", "u", "--subject", "s", "--content", "c", "--timeout", "0"],
        ["listen"],
        ["listen", "--token", "t", "--token-command", "echo t"],
        ["listen", "--token", "t", "--url", "http://127.0.0.1:8001/api/v1/notify/ws"],
        ["listen", "--token", "t", "--count", "0"],
        ["listen", "--token", "t", "--timeout", "-1"],
        ["listen", "--token", " "],
    ],
)
def test_argument_mistakes_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Missing or contradictory options stop before any connection, with status 2 and usage."""
    with pytest.raises(SystemExit) as caught:
        tool_main(argv)
    assert caught.value.code == 2
    assert "usage: python -m service" in capsys.readouterr().err


def test_unreadable_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A file that cannot be opened is a usage error, named on stderr."""
    assert tool_main(["send", "--file", "/nonexistent/n.jsonl"]) == 2
    assert "cannot read /nonexistent/n.jsonl" in capsys.readouterr().err


def test_dry_run_checks_without_kafka(
    tmp_path: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--dry-run`` checks every line, needs no Kafka, and exits 65 for a bad one."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    path = f"{tmp_path}/n.jsonl"
    with open(path, "w") as out:
        out.write('{"user_id": "u", "subject": "s", "content": "c"}\n\n{"user_id": 1}\n')
    assert tool_main(["send", "--file", path, "--dry-run"]) == 65
    err = capsys.readouterr().err
    assert f"{path}:3: refused: user_id: expected a string, got int" in err
    assert "valid 1, refused 1 (dry run: nothing sent)" in err


def test_serve_is_the_explicit_form_of_no_subcommand(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``serve --workers 2`` is read like ``--workers 2``: here, a configuration error (2)."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert service_main(["serve", "--workers", "2"]) == 2
    assert service_main(["--workers", "2"]) == 2
    assert capsys.readouterr().err.count("NOTIFY_WORKERS: more than 1 needs REDIS_URL") == 2


# --- listen: the close-code table and backoff ---


@pytest.mark.parametrize(
    ("code", "step"),
    [
        (1000, Step.RETRY),
        (1001, Step.RETRY_SOON),
        (1006, Step.RETRY),
        (1008, Step.RETRY),
        (1009, Step.STOP),
        (1011, Step.RETRY),
        (1013, Step.RETRY),
        (4401, Step.NEW_TOKEN),
        (4403, Step.STOP),
        (4429, Step.WAIT_LONG),
        (4503, Step.RETRY),
        (None, Step.RETRY),
    ],
)
def test_close_codes_follow_the_protocol_table(code: int | None, step: Step) -> None:
    """Each close code of docs/protocol.md leads to the step the table prescribes."""
    assert step_after(code) is step


def test_backoff_is_full_jitter_doubling_to_the_cap_and_resets() -> None:
    """Waits stay under base * 2**n and the cap, spread from zero; reset starts over."""
    backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(7))
    for attempt in range(8):
        assert 0 <= backoff.next() <= min(4.0, 0.5 * 2**attempt)
    samples = [backoff.next() for _ in range(200)]
    assert max(samples) <= 4.0 and min(samples) < 0.5, "full jitter reaches down to zero"
    backoff.reset()
    assert backoff.next() <= 0.5
    assert all(20 <= backoff.long() <= 60 for _ in range(50)), "4429 waits tens of seconds"


# --- listen: frames of both protocol versions ---


def notification(ident: str, title: str = "t") -> str:
    return json.dumps({"type": "notification", "id": ident, "title": title, "body": "b"})


def test_v1_frames_are_printed_as_they_come() -> None:
    """On v1 each frame is a notification, printed as one JSON line, never acknowledged."""
    session = Session()
    session.opened(None)
    line, new = session.handle('{"title": "Новый",\n "body": "b"}')
    assert line == '{"title":"Новый","body":"b"}\n'.encode() and new
    assert session.take_acks() is None


def test_v2_notifications_are_acknowledged_in_batches_and_duplicates_dropped() -> None:
    """Every v2 notification is acknowledged; one seen before is acknowledged, not printed."""
    session = Session()
    session.opened("notify.v2")
    ids = [str(uuid.uuid4()) for _ in range(ACK_BATCH + 5)]
    for ident in ids:
        assert session.handle(notification(ident))[1]
    line, new = session.handle(notification(ids[0]))
    assert line is None and not new
    assert "duplicate" in session.take_notes()[0]
    first, second = session.take_acks(), session.take_acks()
    assert first is not None and second is not None and session.take_acks() is None
    assert orjson.loads(first) == {"type": "ack", "ids": ids[:ACK_BATCH]}
    assert orjson.loads(second)["ids"] == [*ids[ACK_BATCH:], ids[0]]
    assert len(first.encode()) < 4096, "an ack frame stays under MAX_CLIENT_FRAME"


def test_v2_duplicates_are_dropped_across_connections_and_acks_resumed() -> None:
    """After a reconnect the last acknowledged ids go in ``acked``; a resent one is dropped."""
    session = Session()
    session.opened("notify.v2")
    ids = [str(uuid.uuid4()) for _ in range(MAX_RESUME_ACKS + 20)]
    for ident in ids:
        session.handle(notification(ident))
    while session.take_acks():
        pass
    session.handle(notification(str(uuid.uuid4())))  # printed, its ack not yet sent
    resume = session.resume_acks()
    assert len(resume) == MAX_RESUME_ACKS and resume[-2] == ids[-1]
    session.opened("notify.v2")
    assert session.handle(notification(ids[-1])) == (None, False)


def test_v2_control_frames_are_printed_but_not_counted() -> None:
    """gap, expiring and error frames are printed and noted; they are not notifications."""
    session = Session()
    session.opened("notify.v2")
    gap = session.handle('{"type": "gap", "dropped": 3}')
    assert gap == (b'{"type":"gap","dropped":3}\n', False)
    assert "dropped 3" in session.take_notes()[0]
    assert session.handle('{"type": "expiring", "in_s": 30}')[1] is False
    assert session.expiring
    assert session.handle('{"type": "future_kind"}')[0] is not None, "unknown types are shown"


def test_a_frame_that_is_not_json_is_noted_not_printed() -> None:
    """A text frame that is no JSON is reported on stderr, never on stdout."""
    session = Session()
    assert session.handle("hello") == (None, False)
    assert "not JSON" in session.take_notes()[0]


def test_status_lines_never_carry_the_token() -> None:
    """A status line holding the token shows ``<token>``; a short token mangles nothing."""
    err = io.StringIO()
    listener = Listener(
        "ws://h/ws",
        "secret-token-123",
        None,
        count=None,
        origin=None,
        max_backoff=1,
        out=io.BytesIO(),
        err=err,
    )
    listener.status("closed 4401 (bad secret-token-123)")
    listener.token = "t"
    listener.status("connected to ws://h/ws")
    assert err.getvalue() == ("listen: closed 4401 (bad <token>)\nlisten: connected to ws://h/ws\n")
