"""A site certificate close to its expiry is seen: the gateway says so when it starts and
exports the expiry for the alert (manifests/monitoring)."""

from __future__ import annotations

import datetime
from pathlib import Path

import httpx2 as httpx
from cryptography import x509

from telerad.api.config import TLSFiles
from telerad.devcluster.pki import CertificateAuthority
from tests.runtime.conftest import GatewayFactory

METRIC = "telerad_gateway_certificate_expiry_timestamp_seconds"


def test_a_certificate_expiring_in_three_days_is_logged_and_exported(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    ca = CertificateAuthority("telerad-test-ca")
    cert, key = ca.issue(
        "gateway",
        dns_names=["localhost"],
        ips=["127.0.0.1"],
        server=True,
        valid_for=datetime.timedelta(days=3),
    )
    for name, data in (("ca.pem", ca.cert_pem), ("tls.crt", cert), ("tls.key", key)):
        (tmp_path / name).write_bytes(data)
    expires = x509.load_pem_x509_certificate(cert).not_valid_after_utc
    files = TLSFiles(
        cert_file=tmp_path / "tls.crt", key_file=tmp_path / "tls.key", ca_file=tmp_path / "ca.pem"
    )
    gateway = start_gateway(tls=files)
    assert gateway.metric(METRIC, site=gateway.config.site) == expires.timestamp()
    warnings = [line for line in gateway.log_tail(200).splitlines() if "WARNING" in line]
    assert any(
        f"expires on {expires:%Y-%m-%d %H:%M} UTC" in line and "renew" in line for line in warnings
    ), warnings


def test_a_gateway_without_tls_exports_no_expiry(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    exposed = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert "telerad_gateway_free_bytes{" in exposed  # the collector answers
    assert METRIC not in exposed
