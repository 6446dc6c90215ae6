"""gRPC status codes as numbers: the per-item errors of batch RPCs (FanoutBatch,
SendMessages) carry `error_code` as the code's number, so one bad item never
fails a whole call. Both sides convert here."""

from __future__ import annotations

import grpc

_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_number(code: grpc.StatusCode) -> int:
    """The wire number of `code` (OK is 0)."""
    number: int = code.value[0]
    return number


def status_from_number(number: int) -> grpc.StatusCode:
    """The code with that wire number; UNKNOWN for a number gRPC does not define."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
