"""What typing and presence share: the refusal of a frame or call, and the one
mapping from logic's status codes to it.

Ephemeral frames are answered with FrameError on the stream (GetPresence with a
gRPC status); FrameErrorCode has four values, so logic's richer codes fold into
them here and nowhere else.
"""

from __future__ import annotations

import grpc

from im.gateway.v1 import gateway_pb2

FrameCode = gateway_pb2.FrameErrorCode

INVALID_ARGUMENT = FrameCode.FRAME_ERROR_CODE_INVALID_ARGUMENT
PERMISSION_DENIED = FrameCode.FRAME_ERROR_CODE_PERMISSION_DENIED
RATE_LIMITED = FrameCode.FRAME_ERROR_CODE_RATE_LIMITED
UNAVAILABLE = FrameCode.FRAME_ERROR_CODE_UNAVAILABLE

#: Longest user id a presence frame or call may name (logic's limit is lower or equal).
MAX_USER_ID_CHARS = 200

_FROM_LOGIC: dict[grpc.StatusCode, gateway_pb2.FrameErrorCode.ValueType] = {
    grpc.StatusCode.PERMISSION_DENIED: PERMISSION_DENIED,
    # A conversation that does not exist is one the caller is not a member of.
    grpc.StatusCode.NOT_FOUND: PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT: INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE: INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RATE_LIMITED,
}

_TO_STATUS: dict[gateway_pb2.FrameErrorCode.ValueType, grpc.StatusCode] = {
    INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


class Refused(Exception):
    """A typing or presence request was refused; nothing changed. Becomes a
    FrameError on the stream, or `status` on a unary call."""

    def __init__(self, code: gateway_pb2.FrameErrorCode.ValueType, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    @property
    def status(self) -> grpc.StatusCode:
        return _TO_STATUS.get(self.code, grpc.StatusCode.UNAVAILABLE)

    @property
    def label(self) -> str:
        """The code as a metric label ("permission_denied", ...)."""
        return FrameCode.Name(self.code).removeprefix("FRAME_ERROR_CODE_").lower()


def refused_by_logic(exc: grpc.aio.AioRpcError, what: str) -> Refused:
    """The refusal for a failed call to logic. Anything not the caller's fault
    (logic down, timeouts, an older logic without the method) is UNAVAILABLE."""
    code = exc.code()
    mapped = _FROM_LOGIC.get(code)
    if mapped is None:
        return Refused(UNAVAILABLE, f"{what}: logic unavailable ({code.name}); try again later")
    return Refused(mapped, exc.details() or code.name)


def check_user_ids(user_ids: list[str], limit: int) -> str | None:
    """Why a list of user ids is not acceptable, or None."""
    if not user_ids:
        return "user_ids is empty"
    if len(user_ids) > limit:
        return f"{len(user_ids)} user ids; at most {limit}"
    for user in user_ids:
        if not user:
            return "a user id is empty"
        if len(user) > MAX_USER_ID_CHARS:
            return f"a user id is longer than {MAX_USER_ID_CHARS} characters"
    return None
