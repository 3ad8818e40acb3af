"""Certificates made at test time with `cryptography` (never committed keys): a `CA` writes
its certificate and issues server/client certificates (`CA.issue(cn).write(stem)` writes
`stem.crt` and `stem.key`).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(b: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return b.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Leaf:
    cert_pem: bytes
    key_pem: bytes

    def write(self, stem: Path) -> tuple[Path, Path]:
        """Write `<stem>.crt` and `<stem>.key`; return their paths."""
        crt, key = stem.with_suffix(".crt"), stem.with_suffix(".key")
        crt.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return crt, key


class CA:
    """A self-signed certificate authority that issues server and client certificates."""

    def __init__(self, name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        b = x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
        b = (
            _validity(b)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
        )
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        self.cert = b.sign(self.key, hashes.SHA256())
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem)
        return path

    def issue(self, cn: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Leaf:
        """A certificate for `cn`, valid as TLS server (for `hosts`) and client."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        b = x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.name)
        b = _validity(b).public_key(key.public_key()).serial_number(x509.random_serial_number())
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        b = b.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        cert = b.sign(self.key, hashes.SHA256())
        return Leaf(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
