"""Undecodable bytes to the client-facing unary methods: UNAUTHENTICATED when the
token is missing or bad (checked first), else INVALID_ARGUMENT with a clear text;
never UNKNOWN, and no traceback in the gateway's log."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from gwkit import bearer, token_for

from imdev.servers import ServiceProcess

METHODS = [
    "Sync",
    "History",
    "CreateGroup",
    "AddMembers",
    "RemoveMembers",
    "ListConversations",
]
#: A varint tag with no value (truncated), for every method.
TRUNCATED = b"\x08"
#: Field 1 as a string that is not UTF-8, for the methods whose field 1 is a string.
NOT_UTF8 = b"\x0a\x02\xff\xfe"
STRING_FIRST = {"History", "CreateGroup", "AddMembers", "RemoveMembers"}


async def call_raw(
    address: str, method: str, data: bytes, metadata: list[tuple[str, str]] | None
) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        rpc = channel.unary_unary(
            f"/im.gateway.v1.Gateway/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rpc(data, metadata=metadata, timeout=10)
        return err.value.code(), err.value.details() or ""


async def test_undecodable_requests(start_gateway: Callable[..., ServiceProcess]) -> None:
    gw = start_gateway()
    for method in METHODS:
        for data in [TRUNCATED, *([NOT_UTF8] if method in STRING_FIRST else [])]:
            code, details = await call_raw(gw.address, method, data, None)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, data, code, details)
            code, details = await call_raw(gw.address, method, data, bearer("not-a-token"))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, data, code, details)
            code, details = await call_raw(gw.address, method, data, bearer(token_for("alice")))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, data, code, details)
            assert f"not a valid im.gateway.v1.Gateway/{method} request" in details
    assert "Traceback" not in gw.log_path.read_text()
