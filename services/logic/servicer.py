"""gRPC adapter of logic: decode, call the domain code, encode.

Domain errors -> status codes, in this one place (`STATUS`):

| error | code | meaning for the caller |
| --- | --- | --- |
| InvalidArgument | INVALID_ARGUMENT | fix the request (ids, sizes, limits, undecodable bytes) |
| NotFound | NOT_FOUND | the group does not exist |
| PermissionDenied | PERMISSION_DENIED | not a member / not in the pair / not the owner |
| FailedPrecondition | FAILED_PRECONDITION | valid, but the state refuses it (group full) |
| Unavailable | UNAVAILABLE | PostgreSQL or seqsvc down: nothing committed, retry |
| SequenceRegression | INTERNAL | seqsvc went back: refused, nothing written |
| DependencyFailed | INTERNAL | a dependency misbehaved: nothing written |
| anything else | INTERNAL | a bug: logged with its traceback |

Every failed call wrote nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from im.common.v1 import common_pb2
from im.logic.v1 import logic_pb2 as pb
from logic.errors import (
    DependencyFailed,
    FailedPrecondition,
    InvalidArgument,
    LogicError,
    NotFound,
    PermissionDenied,
    SequenceRegression,
    Unavailable,
)
from logic.fanout import Fanout
from logic.groups import Groups
from logic.model import Conversation, StoredMessage
from logic.reads import Reader
from logic.send import Sender, SendRequest

log = logging.getLogger(__name__)

SERVICE_NAME = "im.logic.v1.Logic"

STATUS: dict[type[LogicError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    SequenceRegression: grpc.StatusCode.INTERNAL,
    DependencyFailed: grpc.StatusCode.INTERNAL,
}

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
R = TypeVar("R")

#: Stands for a request whose bytes do not parse (e.g. a string that is not UTF-8).
_UNDECODABLE = object()


def _lenient(cls: type[Message]) -> Callable[[bytes], Any]:
    parse = cls.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


async def _abort(context: Context, exc: BaseException) -> NoReturn:
    code = STATUS.get(type(exc)) if isinstance(exc, LogicError) else None
    if code is None:
        log.error("internal error", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error in logic (see its logs)")
    elif code == grpc.StatusCode.INTERNAL:
        log.error("dependency misbehaved", extra={"error": str(exc)})
    await context.abort(code or grpc.StatusCode.INTERNAL, str(exc))
    raise AssertionError("unreachable: abort raises")


def _rpc(
    fn: Callable[[LogicServicer, Any, Context], Awaitable[R]],
) -> Callable[[LogicServicer, Any, Context], Awaitable[R]]:
    """Decoding failures and domain errors -> status codes."""

    @functools.wraps(fn)
    async def wrapper(self: LogicServicer, request: Any, context: Context) -> R:
        if request is _UNDECODABLE:
            await _abort(
                context,
                InvalidArgument("request does not parse as protobuf; strings must be UTF-8"),
            )
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


def message_pb(m: StoredMessage) -> common_pb2.Message:
    return common_pb2.Message(
        msg_id=m.msg_id,
        conversation_id=m.conversation_id,
        sender_id=m.sender_id,
        sender_device_id=m.sender_device_id,
        client_msg_id=m.client_msg_id,
        conv_seq=m.conv_seq,
        content_type=m.content_type,  # type: ignore[arg-type]
        body=m.body,
        server_time_ms=m.server_time_ms,
    )


def conversation_pb(c: Conversation) -> common_pb2.Conversation:
    return common_pb2.Conversation(
        conversation_id=c.conversation_id,
        kind=c.kind,  # type: ignore[arg-type]
        name=c.name,
        member_ids=c.member_ids,
        last_conv_seq=c.last_conv_seq,
        owner_id=c.owner_id,
    )


class LogicServicer:
    """im.logic.v1.Logic over the domain objects."""

    def __init__(self, sender: Sender, fanout: Fanout, reader: Reader, groups: Groups) -> None:
        self._sender = sender
        self._fanout = fanout
        self._reader = reader
        self._groups = groups

    @_rpc
    async def SendMessage(self, request: Any, context: Context) -> pb.SendMessageResponse:
        ack = await self._sender.send(
            SendRequest(
                sender_id=request.sender_id,
                sender_device_id=request.sender_device_id,
                client_msg_id=request.client_msg_id,
                conversation_id=request.conversation_id,
                content_type=int(request.content_type),
                body=request.body,
            )
        )
        return pb.SendMessageResponse(
            msg_id=ack.msg_id,
            seq=ack.seq,
            conv_seq=ack.conv_seq,
            server_time_ms=ack.server_time_ms,
            duplicate=ack.duplicate,
        )

    @_rpc
    async def SyncMessages(self, request: Any, context: Context) -> pb.SyncMessagesResponse:
        page = await self._reader.sync(request.user_id, request.after_seq, request.limit)
        return pb.SyncMessagesResponse(
            entries=[
                common_pb2.TimelineEntry(seq=e.seq, message=message_pb(e.message))
                for e in page.entries
            ],
            has_more=page.has_more,
        )

    @_rpc
    async def Fanout(self, request: Any, context: Context) -> pb.FanoutResponse:
        result = await self._fanout.fanout(request.conversation_id, request.max_messages)
        cache: dict[int, common_pb2.Message] = {}
        deliveries = []
        for d in result.deliveries:
            msg = cache.get(d.message.msg_id)
            if msg is None:
                msg = cache[d.message.msg_id] = message_pb(d.message)
            deliveries.append(pb.FanoutDelivery(user_id=d.user_id, seq=d.seq, message=msg))
        return pb.FanoutResponse(
            deliveries=deliveries, watermark=result.watermark, has_more=result.has_more
        )

    @_rpc
    async def FanoutBatch(self, request: Any, context: Context) -> pb.FanoutBatchResponse:
        items = await self._fanout.fanout_batch(
            list(request.conversation_ids), request.max_messages
        )
        cache: dict[int, common_pb2.Message] = {}
        results = []
        for item in items:
            if item.error is not None:
                code = STATUS.get(type(item.error), grpc.StatusCode.INTERNAL)
                results.append(
                    pb.FanoutBatchResult(
                        conversation_id=item.conversation_id,
                        error_code=code.value[0],
                        error_message=str(item.error),
                    )
                )
                continue
            assert item.result is not None
            deliveries = []
            for d in item.result.deliveries:
                msg = cache.get(d.message.msg_id)
                if msg is None:
                    msg = cache[d.message.msg_id] = message_pb(d.message)
                deliveries.append(pb.FanoutDelivery(user_id=d.user_id, seq=d.seq, message=msg))
            results.append(
                pb.FanoutBatchResult(
                    conversation_id=item.conversation_id,
                    deliveries=deliveries,
                    watermark=item.result.watermark,
                    has_more=item.result.has_more,
                )
            )
        return pb.FanoutBatchResponse(results=results)

    @_rpc
    async def History(self, request: Any, context: Context) -> pb.HistoryResponse:
        page = await self._reader.history(
            request.user_id, request.conversation_id, request.before_conv_seq, request.limit
        )
        return pb.HistoryResponse(
            messages=[message_pb(m) for m in page.messages], has_more=page.has_more
        )

    @_rpc
    async def CreateGroup(self, request: Any, context: Context) -> pb.CreateGroupResponse:
        conv = await self._groups.create(request.creator_id, request.name, list(request.member_ids))
        return pb.CreateGroupResponse(conversation=conversation_pb(conv))

    @_rpc
    async def AddMembers(self, request: Any, context: Context) -> pb.AddMembersResponse:
        conv = await self._groups.add(
            request.actor_id, request.conversation_id, list(request.member_ids)
        )
        return pb.AddMembersResponse(conversation=conversation_pb(conv))

    @_rpc
    async def RemoveMembers(self, request: Any, context: Context) -> pb.RemoveMembersResponse:
        conv = await self._groups.remove(
            request.actor_id, request.conversation_id, list(request.member_ids)
        )
        return pb.RemoveMembersResponse(conversation=conversation_pb(conv))

    @_rpc
    async def ListConversations(
        self, request: Any, context: Context
    ) -> pb.ListConversationsResponse:
        convs = await self._groups.list_conversations(request.user_id)
        return pb.ListConversationsResponse(conversations=[conversation_pb(c) for c in convs])


def add_to_server(servicer: LogicServicer, server: grpc.aio.Server) -> None:
    """Registers the servicer like the generated add_LogicServicer_to_server, but with
    lenient deserializers (undecodable bytes -> INVALID_ARGUMENT, not INTERNAL)."""
    methods: dict[str, tuple[Callable[..., Any], type[Message], type[Message]]] = {
        "SendMessage": (servicer.SendMessage, pb.SendMessageRequest, pb.SendMessageResponse),
        "SyncMessages": (servicer.SyncMessages, pb.SyncMessagesRequest, pb.SyncMessagesResponse),
        "Fanout": (servicer.Fanout, pb.FanoutRequest, pb.FanoutResponse),
        "FanoutBatch": (servicer.FanoutBatch, pb.FanoutBatchRequest, pb.FanoutBatchResponse),
        "History": (servicer.History, pb.HistoryRequest, pb.HistoryResponse),
        "CreateGroup": (servicer.CreateGroup, pb.CreateGroupRequest, pb.CreateGroupResponse),
        "AddMembers": (servicer.AddMembers, pb.AddMembersRequest, pb.AddMembersResponse),
        "RemoveMembers": (
            servicer.RemoveMembers,
            pb.RemoveMembersRequest,
            pb.RemoveMembersResponse,
        ),
        "ListConversations": (
            servicer.ListConversations,
            pb.ListConversationsRequest,
            pb.ListConversationsResponse,
        ),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_lenient(req), response_serializer=resp.SerializeToString
        )
        for name, (fn, req, resp) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
