"""The close codes in code and in docs/protocol.md are one table: neither can drift."""

from __future__ import annotations

import re
from pathlib import Path

from service.closecode import CloseCode, Retry

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
_ROW = re.compile(r"^\|\s*(\d{4})\s*\|(.*)\|(.*)\|\s*$")


def documented() -> dict[int, list[str]]:
    """Code -> "what a client does" of each row of every "Close codes" table in the doc."""
    rows: dict[int, list[str]] = {}
    in_section = False
    for line in PROTOCOL.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            in_section = "close codes" in line.lower()
            continue
        match = _ROW.match(line) if in_section else None
        if match:
            rows.setdefault(int(match[1]), []).append(match[3].strip().lower())
    return rows


def test_the_enum_has_exactly_the_documented_codes() -> None:
    """Every code the doc promises exists in code, and code sends no undocumented one."""
    assert set(documented()) == {int(code) for code in CloseCode}


def test_the_retry_advice_matches_the_doc() -> None:
    """What the enum says a client does after each code is what the doc tells client authors."""
    for code, advice in documented().items():
        text = " ".join(advice)
        expected = (
            Retry.STOP
            if re.search(r"\bstop\b", text)
            else Retry.REFRESH
            if "new token" in text
            else Retry.LATER
            if "longer wait" in text
            else Retry.RECONNECT
        )
        assert CloseCode(code).retry is expected, code  # type: ignore[call-arg]


def test_every_code_has_a_short_reason() -> None:
    """A close frame's reason must fit its 123 bytes; each code has a phrase of its own."""
    reasons = [code.reason for code in CloseCode]
    assert all(0 < len(reason.encode()) <= 123 for reason in reasons)
    assert len(set(reasons)) == len(reasons)
