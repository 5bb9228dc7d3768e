"""The upgrade answered from a template says what websockets would say, or leaves it to it."""

from __future__ import annotations

import base64
import email.utils
import time
from urllib.parse import parse_qs

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from websockets.datastructures import Headers
from websockets.http11 import Request as HandshakeRequest
from websockets.protocol import State
from websockets.server import ServerProtocol

from service.app import _query_token
from service.upgrade import accept_head, offered_subprotocols, select_subprotocol

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key


def plain(**extra: str) -> list[tuple[str, str]]:
    headers = [
        ("Host", "gw.example"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY),
        ("Sec-WebSocket-Version", "13"),
    ]
    return headers + [(name.replace("_", "-"), value) for name, value in extra.items()]


def head_fields(head: bytes) -> tuple[str, dict[str, str]]:
    status, *lines = head.decode().split("\r\n")
    assert lines[-2:] == ["", ""]
    return status, dict(line.split(": ", 1) for line in lines[:-2])


def websockets_answer(
    headers: list[tuple[str, str]], available: list[str] | None
) -> tuple[int, dict[str, str]]:
    parser = ServerProtocol(subprotocols=available, state=State.OPEN)  # type: ignore[arg-type]
    answer = parser.accept(HandshakeRequest(path="/", headers=Headers(headers)))
    return answer.status_code, dict(answer.headers.raw_items())


def test_rfc_example_key_is_answered_with_the_rfc_accept_value() -> None:
    """RFC 6455's sample key gets the accept value the RFC gives, and a current Date."""
    head = accept_head("GET", "1.1", CIMultiDict(plain()), None)
    assert head is not None
    status, fields = head_fields(head)
    assert status == "HTTP/1.1 101 Switching Protocols"
    assert fields["Sec-WebSocket-Accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert fields["Upgrade"] == "websocket" and fields["Connection"] == "Upgrade"
    assert "Sec-WebSocket-Protocol" not in fields
    sent = email.utils.parsedate_to_datetime(fields["Date"]).timestamp()
    assert abs(sent - time.time()) < 5


def test_subprotocol_is_named_only_when_selected() -> None:
    """The selected subprotocol is in the answer; one the server lacks is not selected."""
    headers = CIMultiDict(plain(Sec_WebSocket_Protocol="other, notify.v2"))
    offered = offered_subprotocols(headers)
    assert offered == ["other", "notify.v2"]
    chosen = select_subprotocol(["notify.v2"], offered)
    head = accept_head("GET", "1.1", headers, chosen)
    assert head is not None
    assert head_fields(head)[1]["Sec-WebSocket-Protocol"] == "notify.v2"
    assert select_subprotocol(["notify.v2"], ["other"]) is None


def test_requests_that_are_not_plainly_valid_go_to_websockets() -> None:
    """Bad method, version, key, version header, duplicates: no template answer."""
    cases: list[tuple[str, str, list[tuple[str, str]]]] = [
        ("POST", "1.1", plain()),
        ("GET", "1.0", plain()),
        ("GET", "1.1", [h for h in plain() if h[0] != "Upgrade"]),
        ("GET", "1.1", [h for h in plain() if h[0] != "Connection"]),
        ("GET", "1.1", [h if h[0] != "Upgrade" else ("Upgrade", "h2c") for h in plain()]),
        ("GET", "1.1", [h if h[0] != "Connection" else ("Connection", "close") for h in plain()]),
        ("GET", "1.1", [h for h in plain() if h[0] != "Sec-WebSocket-Key"]),
        ("GET", "1.1", [h for h in plain() if h[0] != "Sec-WebSocket-Version"]),
        ("GET", "1.1", plain(Sec_WebSocket_Key="AAAA")),
        ("GET", "1.1", [*plain(), ("Sec-WebSocket-Key", "not base64 at all!!!!!!!")]),
        ("GET", "1.1", [h if h[1] != KEY else (h[0], "not base64 at all!!!!!!!") for h in plain()]),
        ("GET", "1.1", [h if h[1] != "13" else (h[0], "8") for h in plain()]),
        ("GET", "1.1", [*plain(), ("Origin", "https://a"), ("Origin", "https://b")]),
    ]
    for method, version, headers in cases:
        assert accept_head(method, version, CIMultiDict(headers), None) is None, headers
    assert offered_subprotocols(CIMultiDict(plain(Sec_WebSocket_Protocol='"quoted"'))) is None


_HEADER_VALUES = st.sampled_from(
    [
        "websocket",
        "WebSocket",
        "websocket/13",
        "Upgrade",
        "keep-alive, Upgrade",
        "upgrade,",
        "",
        " ",
        "13",
        "8",
        KEY,
        base64.b64encode(b"x" * 15).decode(),
        base64.b64encode(b"y" * 16).decode(),
        "notify.v2",
        "notify.v2, other",
        "a b",
        ",notify.v2",
        "https://a.example",
    ]
)
_HEADER_NAMES = st.sampled_from(
    [
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Protocol",
        "Origin",
        "Sec-WebSocket-Extensions",
    ]
)


@given(
    base=st.lists(st.booleans(), min_size=5, max_size=5),
    extra=st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=4),
    available=st.sampled_from([None, ["notify.v2"]]),
)
def test_a_template_answer_is_the_one_websockets_gives(
    base: list[bool], extra: list[tuple[str, str]], available: list[str] | None
) -> None:
    """Whenever the template answers, websockets accepts with the same accept value and
    subprotocol (the route's subprotocols narrowed to those offered, as the gateway does)."""
    headers = [h for keep, h in zip(base, plain(), strict=True) if keep] + extra
    multi = CIMultiDict(headers)
    offered = offered_subprotocols(multi)
    if offered is None:
        return
    chosen = select_subprotocol(available or [], offered)
    head = accept_head("GET", "1.1", multi, chosen)
    if head is None:
        return
    narrowed = [chosen] if chosen else None
    status, theirs = websockets_answer(headers, narrowed)
    assert status == 101
    _, ours = head_fields(head)
    assert ours["Sec-WebSocket-Accept"] == theirs["Sec-WebSocket-Accept"]
    assert ours.get("Sec-WebSocket-Protocol") == theirs.get("Sec-WebSocket-Protocol")
    assert set(ours) == set(theirs)


def test_query_token_reads_as_request_args_would() -> None:
    """``?token=`` decoding: first non-empty value, escapes and ``+`` decoded, others ignored."""
    assert _query_token("") is None
    assert _query_token("acked=1") is None
    assert _query_token("token=&token=abc") == "abc"
    assert _query_token("token") is None
    assert _query_token("a=1&token=x%2By+z&token=second") == "x+y z"
    assert _query_token("%74oken=encoded-name") == "encoded-name"
    assert _query_token("token=%ff") == "\ufffd"


@given(st.text(alphabet="tokenx=&%+27F4f", max_size=30))
def test_query_token_agrees_with_parse_qs(query: str) -> None:
    """For any query string, the token found is the first ``token`` of ``parse_qs``."""
    values = parse_qs(query, errors="replace").get("token")
    assert _query_token(query) == (values[0] if values else None)
