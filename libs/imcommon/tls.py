"""TLS for our gRPC ports and the channels between our services, from PEM files.

Server side, `server_credentials(ServerTLS(...))`: gRPC's dynamic SSL
credentials. Before every new TLS handshake gRPC asks `ReloadingCertificate.fetch`
(from one of its own threads) whether the certificate changed; it compares the
files' identity (device, inode, mtime, size; `os.stat` follows symlinks, so a
Kubernetes Secret volume, which swaps a `..data` symlink, counts as a change) with
the last load, and only when that changed reads the files, checks them and hands
gRPC the new pair. So a renewed certificate is served to every connection opened
after it lands on disk, without a restart; connections already open keep the
session they negotiated (TLS does not re-key an open connection to a new
certificate) and go on working. Files that do not load (half written, a key that
does not match the certificate) keep the previous pair in service, with one
warning per change, and are tried again when they change again.

`tls_client_ca_file` turns on mutual TLS: the port then refuses, in the
handshake, a client without a certificate signed by one of those CAs. The CA
file is reloaded like the certificate.

Client side, `ChannelTLS(ClientTLS(...))` gives each new channel credentials
from the CA bundle (and the client certificate for mutual TLS) as the files are
when the channel opens, re-read when they changed. gRPC has no hook to swap an
open channel's credentials, so a channel keeps the client certificate it was
opened with (docs/deploy.md, "TLS", on renewing client certificates).
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used (missing, unreadable, not
    PEM, or a key that does not match its certificate). The message names the
    file and the reason."""


@dataclass(frozen=True)
class ServerTLS:
    """What a TLS port serves: a certificate chain and its key (PEM files), and
    optionally the CAs whose client certificates it requires (mutual TLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.cert_file, self.key_file, self.client_ca_file) if f)


@dataclass(frozen=True)
class ClientTLS:
    """How a channel to another of our services checks and presents
    certificates: the CAs that sign the servers' certificates, optionally a
    client certificate and key (mutual TLS), and optionally the name to check in
    the server's certificate instead of the dialled host (needed when the host is
    a pod IP, as the routes in Redis are)."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""


_Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _stamp(paths: tuple[str, ...]) -> _Stamp:
    """Identity of each file as it is now (None where it cannot be stat'ed)."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"the {what} {path} is not PEM (no -----BEGIN line)")
    return data


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the first certificate of a PEM chain (as `openssl x509
    -fingerprint -sha256` prints it, without colons), for logs."""
    text = cert_pem.decode("ascii", "replace")
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        return "?"
    der = ssl.PEM_cert_to_DER_cert(text[start : end + len("-----END CERTIFICATE-----")])
    return hashlib.sha256(der).hexdigest()


def _check_pair(cert_file: str, key_file: str) -> None:
    """Raises TLSConfigError unless the key file holds the private key of the
    certificate file's first certificate (OpenSSL's own check). The caller reads
    the files before and after, so what it checked is what it read."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise TLSConfigError(
            f"the key {key_file} does not match the certificate {cert_file}, or one of "
            f"them is not a valid PEM file ({reason})"
        ) from None


def _check_ca(ca: bytes, path: str) -> None:
    try:
        ssl.create_default_context(cadata=ca.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise TLSConfigError(f"the CA file {path} holds no valid certificate ({exc})") from None


class ReloadingCertificate:
    """The certificate of one TLS port, reloaded when its files change (see the
    module docs). `fetch` is gRPC's certificate configuration fetcher: it never
    raises, and costs a few `stat` calls per handshake when nothing changed."""

    def __init__(self, tls: ServerTLS) -> None:
        self.tls = tls
        self._paths = tls.files()
        self._lock = threading.Lock()
        #: Times the served certificate was replaced since start.
        self.reloads = 0
        self._stamp = _stamp(self._paths)
        self._failed_stamp: _Stamp | None = None
        self._content = self._load()  # raises TLSConfigError: the service must not start
        self.fingerprint = fingerprint(self._content[0])
        self.initial = self._configuration(self._content)

    def _load(self) -> tuple[bytes, bytes, bytes | None]:
        """Reads and checks the files. Re-reads until two reads agree, so a pair
        caught half-replaced is never served."""
        tls = self.tls
        for _ in range(3):
            cert = _read(tls.cert_file, "certificate")
            key = _read(tls.key_file, "private key")
            ca = _read(tls.client_ca_file, "client CA file") if tls.client_ca_file else None
            _check_pair(tls.cert_file, tls.key_file)
            if ca is not None:
                _check_ca(ca, tls.client_ca_file)
            again = (
                _read(tls.cert_file, "certificate"),
                _read(tls.key_file, "private key"),
                _read(tls.client_ca_file, "client CA file") if tls.client_ca_file else None,
            )
            if again == (cert, key, ca):
                return cert, key, ca
        raise TLSConfigError(f"the files {', '.join(self._paths)} keep changing while read")

    @staticmethod
    def _configuration(content: tuple[bytes, bytes, bytes | None]) -> Any:
        cert, key, ca = content
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> Any:
        """A new `grpc.ServerCertificateConfiguration` if the files changed and
        load, else None (keep serving the current one)."""
        try:
            stamp = _stamp(self._paths)
            if stamp == self._stamp or stamp == self._failed_stamp:
                return None
            with self._lock:
                if stamp == self._stamp:
                    return None
                try:
                    content = self._load()
                except TLSConfigError as exc:
                    self._failed_stamp = stamp
                    log.warning(
                        "TLS files changed but do not load; still serving the previous "
                        "certificate: %s",
                        exc,
                        extra={"sha256": self.fingerprint},
                    )
                    return None
                self._stamp, self._failed_stamp = _stamp(self._paths), None
                if content == self._content:
                    return None  # touched, or re-linked to the same content
                self._content = content
                self.fingerprint = fingerprint(content[0])
                self.reloads += 1
                log.info(
                    "TLS certificate reloaded",
                    extra={"cert_file": self.tls.cert_file, "sha256": self.fingerprint},
                )
                return self._configuration(content)
        except Exception:  # gRPC calls this from its own thread: never raise there
            log.exception("TLS certificate reload failed; still serving the previous one")
            return None


def server_credentials(
    tls: ServerTLS,
) -> tuple[grpc.ServerCredentials, ReloadingCertificate]:
    """Credentials for `server.add_secure_port`, reloading the files as they
    change, requiring client certificates when `tls.client_ca_file` is set.
    Raises TLSConfigError if the files do not load now."""
    cert = ReloadingCertificate(tls)
    credentials = grpc.dynamic_ssl_server_credentials(
        cert.initial,
        cert.fetch,
        require_client_authentication=bool(tls.client_ca_file),
    )
    return credentials, cert


def channel_credentials(tls: ClientTLS) -> grpc.ChannelCredentials:
    """Credentials of a channel to one of our services, read now. Raises
    TLSConfigError."""
    ca = _read(tls.ca_file, "CA file")
    _check_ca(ca, tls.ca_file)
    cert = key = None
    if tls.cert_file:
        cert = _read(tls.cert_file, "client certificate")
        key = _read(tls.key_file, "client private key")
        _check_pair(tls.cert_file, tls.key_file)
    return grpc.ssl_channel_credentials(ca, key, cert)


class ChannelTLS:
    """The TLS of the channels a process opens to our other services. Each new
    channel gets credentials as the files are now: they are re-read when a file
    changed (a renewed client certificate reaches every channel opened after
    it), and if they no longer load, the last good ones are used, with a warning.
    A channel keeps the credentials it was opened with. Raises TLSConfigError
    at construction if the files do not load."""

    def __init__(self, tls: ClientTLS) -> None:
        self.tls = tls
        self._paths = tuple(f for f in (tls.ca_file, tls.cert_file, tls.key_file) if f)
        self._stamp = _stamp(self._paths)
        self._credentials = channel_credentials(tls)
        self._failed_stamp: _Stamp | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        stamp = _stamp(self._paths)
        if stamp not in (self._stamp, self._failed_stamp):
            try:
                self._credentials = channel_credentials(self.tls)
                self._stamp = stamp
                log.info("TLS client files reloaded", extra={"ca_file": self.tls.ca_file})
            except TLSConfigError as exc:
                self._failed_stamp = stamp
                log.warning("TLS client files changed but do not load; using the previous: %s", exc)
        return self._credentials

    def options(self) -> list[tuple[str, Any]]:
        """The channel options it needs (the server-name override)."""
        if self.tls.server_name:
            return [("grpc.ssl_target_name_override", self.tls.server_name)]
        return []

    @classmethod
    def of(cls, tls: ClientTLS | None) -> ChannelTLS | None:
        return None if tls is None else cls(tls)
