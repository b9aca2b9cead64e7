"""The one rule for when a site certificate needs attention (telerad.api.certificates)."""

from __future__ import annotations

import datetime

import pytest

from telerad.api.certificates import WARN_BEFORE, Expiry, assess, describe, not_after
from telerad.devcluster.pki import CertificateAuthority

NOW = datetime.datetime(2026, 12, 2, 12, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("left", "expected"),
    [
        (WARN_BEFORE, Expiry.VALID),
        (WARN_BEFORE - datetime.timedelta(seconds=1), Expiry.EXPIRING),
        (datetime.timedelta(seconds=1), Expiry.EXPIRING),
        (datetime.timedelta(0), Expiry.EXPIRED),
        (-datetime.timedelta(days=1), Expiry.EXPIRED),
    ],
)
def test_fourteen_days_ahead_is_expiring(left: datetime.timedelta, expected: Expiry) -> None:
    assert assess(NOW + left, NOW) is expected


def test_the_leaf_of_a_chain_is_read_and_described_by_its_date() -> None:
    ca = CertificateAuthority("ca")
    cert, _ = ca.issue("site", server=True, valid_for=datetime.timedelta(days=3))
    expires = not_after(cert + ca.cert_pem)
    now = datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=3) - (expires - now) < datetime.timedelta(minutes=1)
    assert describe(expires, now) == f"the certificate expires on {expires:%Y-%m-%d %H:%M} UTC"
    assert describe(expires, expires).startswith("the certificate expired on")
    with pytest.raises(ValueError, match="PEM"):
        not_after(b"-")
