"""gRPC adapters of the gateway: the client-facing `Gateway` (every method behind
the token check) and the internal `GatewayInternal` (called by pushers and other
gateways over the cluster network; plain insecure gRPC, restricted by
NetworkPolicies, never exposed to clients).

Authentication is applied when the client-facing service is registered: every
method of im.gateway.v1.Gateway is wrapped, so a method cannot forget it. The
wrapper verifies `authorization: Bearer <token>` and hands the identity to the
method through a context variable; without a valid token the call ends with
UNAUTHENTICATED before the method runs. No request carries a user id: every call
acts as the token's user.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace

from gateway.auth import Identity, TokenError, bearer_token, verify_token
from gateway.config import Settings
from gateway.connection import Connection, ConnectionAborted, parse_client_frame
from gateway.ephemeral import Refused
from gateway.heads import Liveness
from gateway.hub import Hub
from gateway.presence import PresenceService
from gateway.typing_relay import TypingRelay
from gateway.upstream import LogicClient, Peers
from im.gateway.v1 import (
    gateway_internal_pb2,
    gateway_internal_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)
from im.logic.v1 import logic_pb2
from imcommon.metrics import Metrics

log = logging.getLogger(__name__)

GATEWAY_SERVICE = "im.gateway.v1.Gateway"
INTERNAL_SERVICE = "im.gateway.v1.GatewayInternal"

identity_var: contextvars.ContextVar[Identity] = contextvars.ContextVar("gateway_identity")

R = TypeVar("R")
T = TypeVar("T")

#: Most ids one span attribute lists.
MAX_SPAN_IDS = 64


def _ids(values: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(values))[:MAX_SPAN_IDS]


def current_identity() -> Identity:
    """The verified caller of the current client RPC. Fails closed: raises
    LookupError outside an authenticated call."""
    return identity_var.get()


# -- authentication at registration ------------------------------------------


class _Capture:
    """Stands in for a server to collect the handlers generated code registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, _service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = handlers


def _authenticate(secret: str, metadata: Any) -> tuple[Identity | None, str]:
    try:
        return verify_token(secret, bearer_token(metadata), time.time()), ""
    except TokenError as exc:
        return None, str(exc)


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """What a unary method's lenient deserializer yields for bytes that are not its
    request message: the call ends INVALID_ARGUMENT (after the token check), not
    with gRPC's UNKNOWN and a logged traceback."""

    error: str


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Undecodable(str(exc) or "undecodable protobuf")

    return deserialize


def _guard(handler: grpc.RpcMethodHandler, secret: str, method: str) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            identity, problem = _authenticate(secret, context.invocation_metadata())
            if identity is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
            if isinstance(request, _Undecodable):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a valid {GATEWAY_SERVICE}/{method} request "
                    f"({request.error}); strings must be UTF-8",
                )
            identity_var.set(identity)  # type: ignore[arg-type]
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None:
        inner_stream = handler.stream_stream
        # Connect's frames are decoded here, not by gRPC: an undecodable frame
        # becomes a MalformedFrame the connection answers with a clear status.
        deserializer = parse_client_frame if method == "Connect" else handler.request_deserializer
        if inspect.iscoroutinefunction(inner_stream):
            # A handler that reads and writes through the context (Connect): one
            # coroutine per stream, no response generator.
            async def stream_rw(requests: Any, context: grpc.aio.ServicerContext) -> None:
                identity, problem = _authenticate(secret, context.invocation_metadata())
                if identity is None:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
                identity_var.set(identity)  # type: ignore[arg-type]
                await inner_stream(requests, context)

            return grpc.stream_stream_rpc_method_handler(
                stream_rw,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )

        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            identity, problem = _authenticate(secret, context.invocation_metadata())
            if identity is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
            identity_var.set(identity)  # type: ignore[arg-type]
            async for response in inner_stream(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    raise TypeError(f"{GATEWAY_SERVICE}/{method}: unsupported handler kind")


def add_authenticated_gateway(
    servicer: gateway_pb2_grpc.GatewayServicer, server: grpc.aio.Server, secret: str
) -> None:
    """Registers the client-facing service with every method behind the token check."""
    capture = _Capture()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, capture)
    guarded = {name: _guard(h, secret, name) for name, h in capture.handlers.items()}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(GATEWAY_SERVICE, guarded),)
    )
    server.add_registered_method_handlers(GATEWAY_SERVICE, guarded)


# -- the client-facing service -------------------------------------------------


async def _to_completion(coro: Coroutine[Any, Any, None]) -> bool:
    """Runs `coro` to its end even if this task is cancelled meanwhile; returns
    whether it was (the caller re-raises the cancellation afterwards)."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    return cancelled


def _log_stream(message: str, conn: Connection) -> None:
    """Logs from a plain function: logging's caller lookup turns the calling frame
    into a frame object, which for a coroutine lives as long as the coroutine (a
    few hundred bytes per open stream had Connect logged itself)."""
    log.info(message, extra=conn.log_extra())


async def _forward(context: grpc.aio.ServicerContext, call: Awaitable[R]) -> R:
    """Awaits a call to logic; its error status becomes this call's status."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        details = exc.details() or code.name
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            code = grpc.StatusCode.UNAVAILABLE
            details = f"message store did not answer in time ({details}); retry"
        await context.abort(code, details)
        raise  # unreachable: abort raises


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        logic: LogicClient,
        peers: Peers,
        metrics: Metrics,
        liveness: Liveness | None = None,
        typing: TypingRelay | None = None,
        presence: PresenceService | None = None,
    ) -> None:
        self._settings = settings
        self._hub = hub
        self._typing = typing
        self._presence = presence
        self._on_typing = typing.on_typing if typing is not None else None
        self._on_subscribe = presence.on_subscribe if presence is not None else None
        self._liveness = liveness
        self._on_ping = liveness.ping if liveness is not None else None
        self._logic = logic
        self._peers = peers
        self._timeout = settings.logic_timeout_s
        self._connections = metrics.gauge("gateway_connections", "Open client streams")
        self._sends = metrics.counter(
            "gateway_sends", "Sends answered, by result (ok or SendError code)", ["result"]
        )
        self._delivery_acks = metrics.counter(
            "gateway_delivery_acks", "DeliverAck frames received from clients (cumulative ACKs)"
        )
        # Bound once, shared by every connection (no closure per connection).
        self._count_send = self._sends_inc
        self._count_delivery_ack = self._delivery_acks.inc

    def _sends_inc(self, result: str) -> None:
        self._sends.labels(result).inc()

    async def Connect(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> None:
        """Serves one device stream. A coroutine using context.read()/write()
        rather than a response generator: the connection reads in this very task,
        so an idle stream costs no task of its own (docs/benchmarks.md)."""
        identity = current_identity()
        if self._hub.closing:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "gateway is shutting down; connect to another one"
            )
        conn = Connection(
            identity,
            self._settings,
            self._logic,
            self._peers,
            on_send_result=self._count_send,
            on_deliver_ack=self._count_delivery_ack,
            on_ping=self._on_ping,
            on_typing=self._on_typing,
            on_subscribe_presence=self._on_subscribe,
        )
        liveness = self._liveness
        self._connections.inc()
        try:
            await self._hub.attach(conn)
            if liveness is not None:
                # After the route: whatever is committed above this head is this
                # stream's to receive, by the pusher or by a catch-up (I9).
                conn.start_cursor(await liveness.head_at_connect(identity.user_id))
                liveness.add(conn)
            # After the head lookup, which refreshes it: the epoch that head is of.
            conn.store_epoch = self._logic.store_epoch
            _log_stream("stream open", conn)
            await conn.run(context)
        except ConnectionAborted as exc:
            await context.abort(exc.code, exc.details)
        finally:
            self._connections.dec()
            if liveness is not None:
                liveness.remove(conn)
            if self._presence is not None:
                self._presence.forget(conn)
            # gRPC cancels this task when the client goes away, possibly while
            # the stream is already ending here: the route must still be removed
            # (else pushes go to a closed stream until the route's TTL).
            cancelled = await _to_completion(self._hub.detach(conn))
            _log_stream("stream closed", conn)
            if cancelled:
                raise asyncio.CancelledError()

    async def Sync(
        self, request: gateway_pb2.SyncRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SyncResponse:
        me = current_identity()
        if request.after_seq < 0 or request.limit < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "after_seq and limit must not be negative"
            )
        resp = await _forward(
            context,
            self._logic.stub.SyncMessages(
                logic_pb2.SyncMessagesRequest(
                    user_id=me.user_id, after_seq=request.after_seq, limit=request.limit
                ),
                timeout=self._timeout,
            ),
        )
        self._logic.note_store_epoch(resp.store_epoch)
        return gateway_pb2.SyncResponse(
            entries=resp.entries,
            has_more=resp.has_more,
            store_epoch=resp.store_epoch,
            pruned_through_seq=resp.pruned_through_seq,
        )

    async def History(
        self, request: gateway_pb2.HistoryRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.HistoryResponse:
        me = current_identity()
        if request.before_conv_seq < 0 or request.limit < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "before_conv_seq and limit must not be negative"
            )
        resp = await _forward(
            context,
            self._logic.stub.History(
                logic_pb2.HistoryRequest(
                    user_id=me.user_id,
                    conversation_id=request.conversation_id,
                    before_conv_seq=request.before_conv_seq,
                    limit=request.limit,
                ),
                timeout=self._timeout,
            ),
        )
        return gateway_pb2.HistoryResponse(messages=resp.messages, has_more=resp.has_more)

    async def CreateGroup(
        self, request: gateway_pb2.CreateGroupRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CreateGroupResponse:
        me = current_identity()
        resp = await _forward(
            context,
            self._logic.stub.CreateGroup(
                logic_pb2.CreateGroupRequest(
                    creator_id=me.user_id, name=request.name, member_ids=request.member_ids
                ),
                timeout=self._timeout,
            ),
        )
        return gateway_pb2.CreateGroupResponse(conversation=resp.conversation)

    async def AddMembers(
        self, request: gateway_pb2.AddMembersRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AddMembersResponse:
        me = current_identity()
        resp = await _forward(
            context,
            self._logic.stub.AddMembers(
                logic_pb2.AddMembersRequest(
                    actor_id=me.user_id,
                    conversation_id=request.conversation_id,
                    member_ids=request.member_ids,
                ),
                timeout=self._timeout,
            ),
        )
        return gateway_pb2.AddMembersResponse(conversation=resp.conversation)

    async def RemoveMembers(
        self, request: gateway_pb2.RemoveMembersRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RemoveMembersResponse:
        me = current_identity()
        resp = await _forward(
            context,
            self._logic.stub.RemoveMembers(
                logic_pb2.RemoveMembersRequest(
                    actor_id=me.user_id,
                    conversation_id=request.conversation_id,
                    member_ids=request.member_ids,
                ),
                timeout=self._timeout,
            ),
        )
        return gateway_pb2.RemoveMembersResponse(conversation=resp.conversation)

    async def ListConversations(
        self, request: gateway_pb2.ListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListConversationsResponse:
        me = current_identity()
        resp = await _forward(
            context,
            self._logic.stub.ListConversations(
                logic_pb2.ListConversationsRequest(
                    user_id=me.user_id,
                    page_size=request.page_size,
                    page_token=request.page_token,
                ),
                timeout=self._timeout,
            ),
        )
        return gateway_pb2.ListConversationsResponse(
            conversations=resp.conversations, next_page_token=resp.next_page_token
        )

    async def GetReceipts(
        self, request: gateway_pb2.GetReceiptsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetReceiptsResponse:
        me = current_identity()
        resp = await _forward(
            context,
            self._logic.stub.GetReceipts(
                logic_pb2.GetReceiptsRequest(
                    user_id=me.user_id,
                    conversation_id=request.conversation_id,
                    conv_seq=request.conv_seq,
                    list_readers=request.list_readers,
                    page_size=request.page_size,
                    page_token=request.page_token,
                ),
                timeout=self._timeout,
            ),
        )
        return gateway_pb2.GetReceiptsResponse(
            member_count=resp.member_count,
            read_count=resp.read_count,
            reader_ids=resp.reader_ids,
            next_page_token=resp.next_page_token,
            delivered=resp.delivered,
        )

    async def GetPresence(
        self, request: gateway_pb2.GetPresenceRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetPresenceResponse:
        me = current_identity()
        if self._presence is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "presence is not served here")
        assert self._presence is not None
        try:
            presences = await self._presence.get(me.user_id, request.user_ids)
        except Refused as exc:
            await context.abort(exc.status, exc.reason)
        return gateway_pb2.GetPresenceResponse(presences=presences)


# -- the internal service ------------------------------------------------------

#: The ServerFrame kinds GatewayInternal.Signal carries.
SIGNAL_FRAMES = frozenset({"typing", "presence"})
#: Most targets of one Signal call.
MAX_SIGNAL_TARGETS = 10_000


class GatewayInternalServicer(gateway_internal_pb2_grpc.GatewayInternalServicer):
    def __init__(self, hub: Hub, metrics: Metrics) -> None:
        self._hub = hub
        self._pushes = metrics.counter(
            "gateway_pushes", "Deliveries handled, by status", ["status"]
        )
        self._signals = metrics.counter(
            "gateway_signals_written",
            "Ephemeral frames another gateway's Signal queued on streams here, by kind",
            ["kind"],
        )

    async def Deliver(
        self, request: gateway_internal_pb2.DeliverRequest, context: grpc.aio.ServicerContext
    ) -> gateway_internal_pb2.DeliverResponse:
        written = gateway_internal_pb2.DeliveryStatus.DELIVERY_STATUS_WRITTEN
        absent = gateway_internal_pb2.DeliveryStatus.DELIVERY_STATUS_NOT_CONNECTED
        statuses = []
        debug = log.isEnabledFor(logging.DEBUG)
        for d in request.deliveries:
            conn = self._hub.get(d.user_id, d.device_id)
            ok = conn is not None and conn.push(d.seq, d.message, request.ack_to)
            statuses.append(written if ok else absent)
            self._pushes.labels("written" if ok else "not_connected").inc()
            if debug:
                log.debug(
                    "push written" if ok else "push not written (no stream here)",
                    extra={
                        "msg_id": d.message.msg_id,
                        "user_id": d.user_id,
                        "device_id": d.device_id,
                        "seq": d.seq,
                    },
                )
        # The ids on the Deliver server span (the interceptor's): what this call carried.
        trace.get_current_span().set_attributes(
            {
                "im.deliveries": len(request.deliveries),
                "im.written": sum(1 for s in statuses if s == written),
                "im.msg_ids": _ids(d.message.msg_id for d in request.deliveries),
                "im.user_ids": _ids(d.user_id for d in request.deliveries),
            }
        )
        return gateway_internal_pb2.DeliverResponse(statuses=statuses)

    async def Kick(
        self, request: gateway_internal_pb2.KickRequest, context: grpc.aio.ServicerContext
    ) -> gateway_internal_pb2.KickResponse:
        kicked = self._hub.kick(
            request.user_id, request.device_id, request.connection_id, request.reason
        )
        return gateway_internal_pb2.KickResponse(kicked=kicked)

    async def Signal(
        self, request: gateway_internal_pb2.SignalRequest, context: grpc.aio.ServicerContext
    ) -> gateway_internal_pb2.SignalResponse:
        """Queues an ephemeral frame on the named streams here (a target without a
        device: every stream of the user here). Best effort: a stream that is
        closing or whose queue is full is skipped. Returns how many took it."""
        kind = request.frame.WhichOneof("frame")
        if kind not in SIGNAL_FRAMES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Signal carries only typing or presence frames, not {kind or 'an empty frame'}",
            )
        if len(request.targets) > MAX_SIGNAL_TARGETS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.targets)} targets; at most {MAX_SIGNAL_TARGETS} per call",
            )
        written = 0
        seen: set[Connection] = set()
        for target in request.targets:
            if target.device_id:
                conn = self._hub.get(target.user_id, target.device_id)
                conns = [conn] if conn is not None else []
            else:
                conns = self._hub.devices(target.user_id)
            for conn in conns:
                if conn not in seen and conn.signal(request.frame):
                    seen.add(conn)
                    written += 1
        self._signals.labels(kind or "").inc(written)
        return gateway_internal_pb2.SignalResponse(written=written)
