"""One log record, one line: the formatter every telerad process logs through."""

from __future__ import annotations

import logging
import sys

from telerad.logs import FORMAT, OneLine, one_line


def test_control_characters_are_escaped_and_the_rest_kept() -> None:
    assert one_line("X\nFAKE\r\x1b[2J\x00\x7f\x85\u2028é ok") == (
        "X\\nFAKE\\r\\x1b[2J\\x00\\x7f\\x85\\u2028é ok"
    )
    assert len(one_line("".join(map(chr, range(0x110)))).splitlines()) == 1


def test_a_record_with_a_traceback_is_one_line() -> None:
    try:
        raise ValueError("peer said 'a\nb'")
    except ValueError:
        record = logging.LogRecord(
            "pynetdicom", logging.ERROR, __file__, 1, "from %s", ("X\nY",), sys.exc_info()
        )
    text = OneLine(logging.Formatter(FORMAT)).format(record)
    assert len(text.splitlines()) == 1
    assert "from X\\nY" in text
    assert "\\nTraceback (most recent call last):" in text
    assert "ValueError: peer said 'a\\nb'" in text
