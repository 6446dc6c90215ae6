"""Errors raised by the client SDK.

Everything the SDK raises on purpose derives from `ImClientError`, so an app can
catch the whole family in one place and the specific cases where it must act.
"""

from __future__ import annotations

import enum

import grpc


class SendErrorCode(enum.IntEnum):
    """`im.gateway.v1.SendErrorCode`, mirrored so apps need not import protobuf."""

    UNSPECIFIED = 0
    OUT_OF_ORDER = 1
    INVALID_ARGUMENT = 2
    PERMISSION_DENIED = 3
    NOT_FOUND = 4
    RATE_LIMITED = 5
    UNAVAILABLE = 6
    INTERNAL = 7


class ImClientError(Exception):
    """Base class of every error the SDK raises."""


class SendFailed(ImClientError):
    """The gateway refused a send for good: the message was NOT stored and never
    will be. Raised by `Client.send()` for a non-retryable `SendError`
    (invalid argument, not a member, no such conversation)."""

    def __init__(self, code: SendErrorCode, reason: str, client_msg_id: str) -> None:
        super().__init__(f"{code.name}: {reason} (client_msg_id={client_msg_id})")
        self.code = code
        self.reason = reason
        self.client_msg_id = client_msg_id


class OutboxFull(ImClientError):
    """`Client.submit()` refused a message because the account already has the
    store's `max_outbox` messages pending (submitted, not yet acknowledged or
    refused). Nothing was queued; submit again once some are answered."""

    def __init__(self, pending: int, limit: int) -> None:
        super().__init__(
            f"the outbox is full: {pending} messages pending, the limit is {limit} "
            f"(store max_outbox); wait for ACKs (flush()) before submitting more"
        )
        self.pending = pending
        self.limit = limit


class ClientClosed(ImClientError):
    """The client was closed (or stopped for good) before the operation finished.

    For a send this means: the message may or may not have been stored. Sending it
    again with the same `client_msg_id` from a new client is safe: the server
    deduplicates on it."""


class Kicked(ClientClosed):
    """Another connection of the same user and device replaced this one. The
    client stopped and does not reconnect by itself."""


class AuthError(ClientClosed):
    """The gateway refused the token (missing, malformed, expired or forged)."""


class ConnectTimeout(ImClientError, TimeoutError):
    """No gateway completed a connection (Welcome, or Welcome and the first sync)
    in time. `last_error` says why the last attempt failed (e.g. "UNAVAILABLE:
    connection refused at 127.0.0.1:17000"), None if no attempt had ended."""

    def __init__(self, message: str, last_error: str | None = None) -> None:
        super().__init__(f"{message}: {last_error}" if last_error else message)
        self.last_error = last_error


class ProtocolError(ImClientError):
    """The server broke the protocol (e.g. a first frame other than Welcome)."""


class RpcError(ImClientError):
    """A unary call failed. `code` is the gRPC status code, `details` the
    server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(RpcError):
    """The request was malformed (bad ids, limits): fix it, do not retry."""


class PermissionDenied(RpcError):
    """Not allowed (not a member, someone else's data)."""


class NotFound(RpcError):
    """No such conversation or group."""


class Unavailable(RpcError):
    """A server was unreachable or overloaded: retrying later is safe."""


class Unauthenticated(RpcError, AuthError):
    """A unary call's token was refused."""


class TLSError(RpcError, ClientClosed):
    """The TLS handshake with a gateway failed: its certificate is not trusted
    (signed by a CA the client does not trust, expired, or not naming the host),
    or the port does not speak TLS. The message says which. A configuration
    problem, not a transient one: a `Client` stops for good (like `AuthError`),
    a `GatewayApi` call raises it at once without trying other addresses."""

    def __init__(self, reason: str, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, details)
        self.args = (f"{reason} [{details}]" if details else reason,)
        self.reason = reason


_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def unreachable_reason(details: str, address: str) -> str | None:
    """A short reason, naming the address, for gRPC's details of a server that
    could not be reached (refused, unresolvable); None for anything else."""
    low = details.lower()
    if "connection refused" in low:
        return f"connection refused at {address}"
    if "errors resolving" in low or "dns resolution failed" in low:
        return f"cannot resolve the host of {address}"
    return None


def rpc_error(exc: grpc.aio.AioRpcError, address: str | None = None) -> RpcError:
    """Maps a gRPC failure to the SDK's typed error (one place for the mapping).
    With `address`, an unreachable server is named in the details."""
    code = exc.code()
    details = exc.details() or ""
    if address is not None and code == grpc.StatusCode.UNAVAILABLE:
        details = unreachable_reason(details, address) or details
    return _BY_CODE.get(code, RpcError)(code, details)
