"""gRPC adapter of seqsvc: decode, call the allocator, encode; errors mapped here.

Domain errors -> status codes (the one place):
- `InvalidArgument` (bad key, count, batch size, undecodable request) -> INVALID_ARGUMENT
- `Unavailable` (store down with no headroom left, lease lost, starting, stopping)
  -> UNAVAILABLE: nothing was handed out, retrying is safe.
- `NotOwner` (a key of a section this instance does not serve) -> FAILED_PRECONDITION
  with trailing metadata `seqsvc-owner` (the owner's address, '' while it moves),
  `seqsvc-routing-version` and `seqsvc-section`: nothing was handed out; the caller
  refreshes its routing table (GetRouting) and calls the owner.
- Team namespaces (`seqsvc.teams`, only with a teams file), checked by `_admit` at
  the top of every RPC before the allocator sees the call: `Unauthenticated` ->
  UNAUTHENTICATED, `PermissionDenied` (a key outside the team's prefixes) ->
  PERMISSION_DENIED, `QuotaExceeded` -> RESOURCE_EXHAUSTED with trailing metadata
  `retry-after-ms` (absent when the call can never fit: larger than the burst).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message

from im.seqsvc.v1 import seqsvc_pb2 as pb
from seqsvc.allocator import Allocator, NotOwner, Unavailable
from seqsvc.keys import InvalidArgument
from seqsvc.teams import PermissionDenied, QuotaExceeded, Teams, Unauthenticated

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
    if isinstance(exc, Unauthenticated):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
    if isinstance(exc, PermissionDenied):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    if isinstance(exc, QuotaExceeded):
        after = exc.retry_after_s
        trailer = () if after is None else (("retry-after-ms", str(max(1, round(after * 1000)))),)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), trailer)
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    raise AssertionError("unreachable: abort raises")


_BAD_BYTES = InvalidArgument(
    "request does not parse as protobuf; keys must be valid UTF-8 (proto3 string)"
)


def _caller(context: grpc.aio.ServicerContext[Any, Any], tls: bool) -> tuple[str | None, list[str]]:
    """The caller's bearer token (None if it sent none) and, when `tls`, the names
    its verified client certificate carries (common name, subject, SANs)."""
    token = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, rest = value.partition(" ")
            token = rest.strip() if scheme.lower() == "bearer" else ""
    identities: list[str] = []
    if tls:
        auth = context.auth_context()
        for prop in ("x509_common_name", "x509_subject", "x509_subject_alternative_name"):
            identities += [v.decode(errors="replace") for v in auth.get(prop, ())]
    return token, identities


class SeqServicer:
    """im.seqsvc.v1.SeqService over an Allocator, behind the team check when
    `teams` is given and enabled (a teams file is configured)."""

    def __init__(self, allocator: Allocator, teams: Teams | None = None) -> None:
        self._alloc = allocator
        self._teams = teams

    async def _admit(
        self, context: grpc.aio.ServicerContext[Any, Any], keys: Any, cost: int
    ) -> None:
        """The namespace layer: ends the call unless the caller's team may use
        `keys` now and its quota admits `cost` values. A no-op without teams."""
        teams = self._teams
        if teams is None or not teams.enabled:
            return
        token, identities = _caller(context, teams.uses_tls)
        try:
            teams.admit(token, identities, keys, cost)
        except (Unauthenticated, PermissionDenied, QuotaExceeded, InvalidArgument) as exc:
            await _reject(context, exc)

    async def Next(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            await _reject(context, _BAD_BYTES)
        await self._admit(context, (request.key,), 1)
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
        await self._admit(context, request.keys, len(request.keys))
        try:
            values = await self._alloc.next_batch(request.keys)
        except (InvalidArgument, Unavailable, NotOwner) as exc:
            await _reject(context, exc)
        return pb.NextBatchResponse(values=values)

    async def Reserve(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            await _reject(context, _BAD_BYTES)
        # A count out of range is the allocator's INVALID_ARGUMENT, not a quota matter.
        await self._admit(context, (request.key,), max(request.count, 0))
        try:
            first, last = await self._alloc.reserve(request.key, request.count)
        except (InvalidArgument, Unavailable, NotOwner) as exc:
            await _reject(context, exc)
        return pb.ReserveResponse(first=first, last=last)

    async def Current(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            await _reject(context, _BAD_BYTES)
        await self._admit(context, (request.key,), 1)
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
