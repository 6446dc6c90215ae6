"""How the client secures its connections to the gateways.

TLS is the default: `Client(addresses, token)` and `GatewayApi(addresses, token)`
check each gateway's certificate against the system's trusted CAs and its name
against the host dialled. `tls=TLSConfig(...)` changes what is trusted and
checked:

- `ca_file`: trust these CAs (PEM) instead of the system's (a private CA, or a
  test's);
- `server_name`: check this name in the certificate instead of the host dialled
  (dialling an IP address or a name the certificate does not carry);
- `cert_file`/`key_file`: present a client certificate (a gateway that
  requires one, IM_GATEWAY_TLS_CLIENT_CA_FILE).

Plaintext only when asked for: `insecure=True` (a development stack, `make run`).

"The system's trusted CAs" are the PEM bundle Python's `ssl` module uses
(`SSL_CERT_FILE`, else OpenSSL's default file, e.g.
/etc/ssl/certs/ca-certificates.crt), so a CA installed into the operating system
is trusted; where there is none, gRPC's own bundled roots (or the file named by
GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, which then wins).
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from imclient.errors import TLSError

StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class TLSConfig:
    """What the client trusts and checks on a TLS connection (see the module
    docs). Every field is optional; `TLSConfig()` is the default TLS."""

    ca_file: StrPath | None = None
    server_name: str | None = None
    cert_file: StrPath | None = None
    key_file: StrPath | None = None


@functools.lru_cache(maxsize=8)
def _read_roots(path: str, mtime_ns: int) -> bytes:
    return Path(path).read_bytes()


def system_roots() -> bytes | None:
    """The operating system's trusted CAs as PEM, or None to let gRPC choose
    (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH if set, else its bundled roots)."""
    if os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        return None
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get(paths.openssl_cafile_env), paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            try:
                return _read_roots(candidate, os.stat(candidate).st_mtime_ns)
            except OSError:
                continue
    return None


def _read_pem(path: StrPath, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or exc
        raise ValueError(f"cannot read the {what} {os.fspath(path)}: {reason}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} {os.fspath(path)} is not PEM (no -----BEGIN line)")
    return data


class Transport:
    """Opens the channels of one client: TLS as configured, or plaintext. Files
    are read once, here; errors in them raise ValueError naming the file."""

    def __init__(self, tls: TLSConfig | None = None, insecure: bool = False) -> None:
        if insecure and tls is not None:
            raise ValueError("insecure=True (plaintext) and tls=... exclude each other")
        self.insecure = insecure
        self.tls = tls or TLSConfig()
        self._credentials: grpc.ChannelCredentials | None = None
        self._options: list[tuple[str, Any]] = []
        if insecure:
            return
        t = self.tls
        if bool(t.cert_file) != bool(t.key_file):
            raise ValueError("TLSConfig: cert_file and key_file go together")
        roots = _read_pem(t.ca_file, "CA file") if t.ca_file else system_roots()
        chain = _read_pem(t.cert_file, "client certificate") if t.cert_file else None
        key = _read_pem(t.key_file, "client key") if t.key_file else None
        self._credentials = grpc.ssl_channel_credentials(roots, key, chain)
        if t.server_name:
            self._options.append(("grpc.ssl_target_name_override", t.server_name))

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        opts = [*self._options, *options]
        if self._credentials is None:
            return grpc.aio.insecure_channel(address, options=opts)
        return grpc.aio.secure_channel(address, self._credentials, options=opts)

    def describe(self) -> str:
        """What is trusted and checked, for error messages."""
        if self.insecure:
            return "plaintext"
        t = self.tls
        trust = f"CA file {os.fspath(t.ca_file)}" if t.ca_file else "the system's trusted CAs"
        name = f"; name checked: {t.server_name}" if t.server_name else ""
        return f"trusting {trust}{name}"

    def error(self, exc: grpc.aio.AioRpcError, address: str) -> TLSError | None:
        """The TLSError a failed call means, or None if it is not a TLS failure."""
        return tls_error(exc, f"the gateway at {address}; {self.describe()}")


def tls_error(exc: grpc.aio.AioRpcError, context: str = "") -> TLSError | None:
    """A TLSError if `exc` is a failed TLS handshake (gRPC reports those as
    UNAVAILABLE, with OpenSSL's reason in the details), else None. `context`
    (which gateway, what was trusted) goes into the message."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    details = exc.details() or ""
    where = f" ({context})" if context else ""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        why = details.split("CERTIFICATE_VERIFY_FAILED", 1)[1].strip(" :")
        why = why.removesuffix(": OK").strip() or "not trusted"
        hint = (
            ": the certificate is not signed by a CA this client trusts"
            if "issuer" in why or "self-signed" in why or "self signed" in why
            else ""
        )
        return TLSError(f"certificate verification failed{where}: {why}{hint}", details)
    if "Hostname Verification Check failed" in details:
        return TLSError(
            f"certificate verification failed{where}: the certificate does not name the host "
            "dialled (connect by a name it carries, or set the server name to check)",
            details,
        )
    if "WRONG_VERSION_NUMBER" in details:
        return TLSError(
            f"TLS handshake failed{where}: the server does not speak TLS on this port "
            "(a plaintext gateway? then connect in plaintext, insecure=True)",
            details,
        )
    if "handshake failed" in details.lower():
        return TLSError(f"TLS handshake failed{where}", details)
    return None
