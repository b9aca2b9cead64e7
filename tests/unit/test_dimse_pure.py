"""The few bytes the DICOM receiver builds itself."""

from __future__ import annotations

from telerad.runtime.gateway.dimse import error_comment


def test_an_error_comment_is_one_lo_value() -> None:
    """A parser message quoting a byte (b'\\x00') held a backslash, which split the
    comment into several values ("Non-conformant VM" at the sender); long ones broke LO's
    64 characters."""
    assert error_comment("bad value b'\\x00\\xff' in (0008,0005)") == (
        b"bad value b'?x00?xff' in (0008,0005)"
    )
    assert error_comment("tab\there, é") == b"tab?here, ?"
    long = error_comment("element (5349,5F4F) claims 824201801 bytes but 1464 remain at 16")
    assert len(long) == 64
    assert long.startswith(b"element (5349,5F4F) claims 824201801 bytes")
