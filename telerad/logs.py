"""Logging of every telerad process: one record, one line.

Peers put text into log records (a calling AE title, a query key, a decoder's complaint
about either); a line break in it would start a line that reads as a record of its own,
and an escape sequence would drive the terminal of whoever reads the log. So the handlers
of the root logger escape every control character of each formatted record, whichever
logger it comes from (pynetdicom's, kopf's, aiohttp's) and whatever its formatter. A
traceback becomes one line too, its line breaks escaped: no exception to the rule, and a
collector keeps a record with its traceback.
"""

from __future__ import annotations

import logging
from typing import Final

# C0 and C1 controls, DEL, and the two Unicode line breaks that are not controls: every
# character str.splitlines breaks at is among them.
_ESCAPES: Final = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}
FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def one_line(text: str) -> str:
    """`text` with its control characters written as escapes (`\\n`, `\\x1b`)."""
    return text.translate(_ESCAPES)


class OneLine(logging.Formatter):
    """Another formatter's output, on one line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return one_line(self.inner.format(record))


def setup(level: int, fmt: str = FORMAT) -> None:
    """Log to stderr at `level`, one line per record."""
    logging.basicConfig(level=level, format=fmt)
    one_line_handlers()


def one_line_handlers() -> None:
    """Make every handler of the root logger write one line per record (for handlers set
    up by others: kopf's)."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, OneLine):
            handler.setFormatter(OneLine(handler.formatter or logging.Formatter()))
