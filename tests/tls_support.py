"""Certificates made at test time (the `cryptography` package), and a directory
that is updated the way Kubernetes updates a mounted Secret.

`CertificateAuthority("test ca").issue(["localhost"])` signs a leaf certificate;
`SecretVolume(dir).write({"tls.crt": ..., "tls.key": ...})` publishes files
through a `..data` symlink swapped in one rename, as the kubelet's atomic writer
does, so a reader sees the old pair or the new one, never a mix.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Issued:
    """A leaf certificate and its key, PEM."""

    cert_pem: bytes
    key_pem: bytes
    serial: int


class CertificateAuthority:
    """A self-signed CA, valid from an hour ago for a day."""

    def __init__(self, name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, names: Sequence[str], serial: int | None = None) -> Issued:
        """A certificate for `names` (DNS names or IP addresses), usable by a
        server and as a client certificate (mutual TLS)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = datetime.datetime.now(datetime.UTC)
        serial = serial or x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), serial)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem)
        return path


class SecretVolume:
    """A directory laid out like a mounted Kubernetes Secret: `<dir>/<key>` is a
    symlink to `..data/<key>`, and `..data` a symlink to a timestamped
    directory; `write()` fills a new directory and swaps `..data` in one
    rename."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._generation = 0

    def file(self, key: str) -> str:
        return str(self.path / key)

    def write(self, files: Mapping[str, bytes]) -> None:
        self._generation += 1
        target = self.path / f"..gen_{self._generation}_{time.monotonic_ns()}"
        target.mkdir()
        for key, data in files.items():
            (target / key).write_bytes(data)
        tmp = self.path / "..data_tmp"
        os.symlink(target.name, tmp)
        os.replace(tmp, self.path / "..data")
        for key in files:
            link = self.path / key
            if not link.is_symlink():
                os.symlink(f"..data/{key}", link)


def served_certificate(host: str, port: int, timeout: float = 5.0) -> x509.Certificate:
    """The certificate a TLS port presents to a new connection (not verified)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
