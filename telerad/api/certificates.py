"""When a site's certificate expires, and when that needs someone's attention: one rule for
the gateway (its metric and start-up warning) and the operator (the site's Degraded
condition). manifests/monitoring/prometheusrule.yaml alerts on the same 14 days."""

from __future__ import annotations

import datetime
from enum import StrEnum

from cryptography import x509

WARN_BEFORE = datetime.timedelta(days=14)
"""Time enough to renew through a change process, as cert-manager's default renewal
(a third of a 90-day certificate's life) also leaves about a month."""


class Expiry(StrEnum):
    VALID = "valid"
    EXPIRING = "expiring"
    """Still valid, but for less than WARN_BEFORE."""
    EXPIRED = "expired"


def not_after(pem: bytes) -> datetime.datetime:
    """The expiry of the first certificate of a PEM chain (the site's own: tls.crt puts the
    leaf first). ValueError when there is none."""
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc


def assess(expires: datetime.datetime, now: datetime.datetime) -> Expiry:
    if expires <= now:
        return Expiry.EXPIRED
    return Expiry.EXPIRING if expires - now < WARN_BEFORE else Expiry.VALID


def describe(expires: datetime.datetime, now: datetime.datetime) -> str:
    """What happens when, in words: the date only, so the text changes only when the
    certificate does or it expires."""
    when = expires.strftime("%Y-%m-%d %H:%M UTC")
    if assess(expires, now) is Expiry.EXPIRED:
        return f"the certificate expired on {when}"
    return f"the certificate expires on {when}"
