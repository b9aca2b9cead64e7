"""The control plane's certificates: one CA for serving and client certificates.

Keys are ECDSA P-256 written in SEC1 form ("BEGIN EC PRIVATE KEY"): client-go's
``keyutil.ParsePublicKeysPEM``, which reads ``--service-account-key-file``, silently skips
EC keys in PKCS#8 form and the API server then refuses to start with "no keys".
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=30)
_CLOCK_SKEW = datetime.timedelta(minutes=5)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_encipherment=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


class CertificateAuthority:
    """A throwaway CA that signs the API server's serving cert and the users' client certs."""

    def __init__(self, common_name: str) -> None:
        self.key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    def issue(
        self,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        ips: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
        expired: bool = False,
        valid_for: datetime.timedelta = _VALIDITY,
    ) -> tuple[bytes, bytes]:
        """Return (certificate PEM, key PEM). For client certs Kubernetes reads CN as the
        user name and every O as a group. `expired`: valid only in the past (for tests
        that must see it refused); `valid_for`: how long from now (a certificate close to
        its expiry)."""
        key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        if expired:
            now -= _VALIDITY + datetime.timedelta(days=1)
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return _cert_pem(builder.sign(self.key, hashes.SHA256())), _key_pem(key)


@dataclass(frozen=True)
class ClientCredentials:
    user: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Files of the control plane's PKI in one directory."""

    dir: Path
    ca_cert: Path
    apiserver_cert: Path
    apiserver_key: Path
    service_account_key: Path
    admin: ClientCredentials

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority("telerad-devcluster-ca")

        def write(name: str, data: bytes, *, secret: bool = False) -> Path:
            path = directory / name
            path.write_bytes(data)
            path.chmod(0o600 if secret else 0o644)
            return path

        srv_cert, srv_key = ca.issue(
            "kube-apiserver", dns_names=["localhost"], ips=["127.0.0.1"], server=True
        )
        adm_cert, adm_key = ca.issue("admin", organizations=["system:masters"], client=True)
        # The CA key is only kept long enough to sign; other users can be issued later
        # through the API server's own CSR API if a test ever needs them.
        return cls(
            dir=directory,
            ca_cert=write("ca.crt", ca.cert_pem),
            apiserver_cert=write("apiserver.crt", srv_cert),
            apiserver_key=write("apiserver.key", srv_key, secret=True),
            service_account_key=write("sa.key", _key_pem(_new_key()), secret=True),
            admin=ClientCredentials(
                "admin",
                write("admin.crt", adm_cert),
                write("admin.key", adm_key, secret=True),
            ),
        )


def write_kubeconfig(path: Path, server: str, ca_cert: Path, creds: ClientCredentials) -> Path:
    """Write a self-contained kubeconfig (certificates inline) as JSON, which is valid YAML."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [
            {
                "name": "telerad-dev",
                "cluster": {"server": server, "certificate-authority-data": b64(ca_cert)},
            }
        ],
        "users": [
            {
                "name": creds.user,
                "user": {
                    "client-certificate-data": b64(creds.cert),
                    "client-key-data": b64(creds.key),
                },
            }
        ],
        "contexts": [
            {
                "name": "telerad-dev",
                "context": {"cluster": "telerad-dev", "user": creds.user, "namespace": "default"},
            }
        ],
        "current-context": "telerad-dev",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path
