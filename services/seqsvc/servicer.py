"""gRPC adapter of seqsvc: decode, call the allocator, encode; errors mapped here.

Domain errors -> status codes (the one place):
- `InvalidArgument` (bad key, count, batch size, undecodable request) -> INVALID_ARGUMENT
- `Unavailable` (store down with no headroom left, lease lost, starting, stopping)
  -> UNAVAILABLE: nothing was handed out, retrying is safe.
- `NotOwner` (a key of a section this instance does not serve) -> FAILED_PRECONDITION
  with trailing metadata `seqsvc-owner` (the owner's address, '' while it moves),
  `seqsvc-routing-version` and `seqsvc-section`: nothing was handed out; the caller
  refreshes its routing table (GetRouting) and calls the owner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message

from im.seqsvc.v1 import seqsvc_pb2 as pb
from seqsvc.allocator import Allocator, NotOwner, Unavailable
from seqsvc.keys import InvalidArgument

SERVICE_NAME = "im.seqsvc.v1.SeqService"
#: Trailing metadata of a NotOwner refusal.
OWNER_MD, VERSION_MD, SECTION_MD = "seqsvc-owner", "seqsvc-routing-version", "seqsvc-section"

_UNDECODABLE = object()


def _lenient(cls: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer that lets the handler answer INVALID_ARGUMENT for bytes
    that do not parse (e.g. a key that is not UTF-8), instead of grpc's INTERNAL."""

    parse = cls.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


async def _reject(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    """Ends the call with the status code of a domain error (abort raises)."""
    if isinstance(exc, InvalidArgument):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, NotOwner):
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            str(exc),
            (
                (OWNER_MD, exc.owner),
                (VERSION_MD, str(exc.version)),
                (SECTION_MD, str(exc.section)),
            ),
        )
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    raise AssertionError("unreachable: abort raises")


_BAD_BYTES = InvalidArgument(
    "request does not parse as protobuf; keys must be valid UTF-8 (proto3 string)"
)


class SeqServicer:
    """im.seqsvc.v1.SeqService over an Allocator."""

    def __init__(self, allocator: Allocator) -> None:
        self._alloc = allocator

    async def Next(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            await _reject(context, _BAD_BYTES)
        alloc = self._alloc
        try:
            value = alloc.next_nowait(request.key)
            if value is None:
                value = await alloc.next(request.key)
        except (InvalidArgument, Unavailable, NotOwner) as exc:
            await _reject(context, exc)
        return pb.NextResponse(value=value)

    async def NextBatch(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            await _reject(context, _BAD_BYTES)
        try:
            values = await self._alloc.next_batch(request.keys)
        except (InvalidArgument, Unavailable, NotOwner) as exc:
            await _reject(context, exc)
        return pb.NextBatchResponse(values=values)

    async def Reserve(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            await _reject(context, _BAD_BYTES)
        try:
            first, last = await self._alloc.reserve(request.key, request.count)
        except (InvalidArgument, Unavailable, NotOwner) as exc:
            await _reject(context, exc)
        return pb.ReserveResponse(first=first, last=last)

    async def Current(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            await _reject(context, _BAD_BYTES)
        try:
            value = self._alloc.current(request.key)
        except (InvalidArgument, Unavailable, NotOwner) as exc:
            await _reject(context, exc)
        return pb.CurrentResponse(value=value)

    async def GetRouting(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            await _reject(context, _BAD_BYTES)
        table = self._alloc.routing
        return pb.GetRoutingResponse(
            version=table.version,
            sections=table.sections,
            instances=[pb.Instance(id=i, address=a) for i, a in table.instances],
            owner=table.owner,
            self_id=self._alloc.instance_id,
        )


def add_to_server(servicer: SeqServicer, server: grpc.aio.Server) -> None:
    """Registers the servicer (like the generated add_*_to_server, but with the
    lenient deserializers)."""
    pairs: dict[str, tuple[Callable[..., Any], type[Message], type[Message]]] = {
        "Next": (servicer.Next, pb.NextRequest, pb.NextResponse),
        "NextBatch": (servicer.NextBatch, pb.NextBatchRequest, pb.NextBatchResponse),
        "Reserve": (servicer.Reserve, pb.ReserveRequest, pb.ReserveResponse),
        "Current": (servicer.Current, pb.CurrentRequest, pb.CurrentResponse),
        "GetRouting": (servicer.GetRouting, pb.GetRoutingRequest, pb.GetRoutingResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_lenient(req), response_serializer=resp.SerializeToString
        )
        for name, (fn, req, resp) in pairs.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
