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

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from im.common.v1 import common_pb2
from im.logic.v1 import logic_pb2 as pb
from imcommon.status import status_number
from imcommon.telemetry import remote_parent
from logic.conversations import Conversations
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


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a call that raised `exc` ends with (logged when INTERNAL): the one
    mapping of SendMessage and of each SendMessages item."""
    code = STATUS.get(type(exc)) if isinstance(exc, LogicError) else None
    if code is None:
        log.error("internal error", exc_info=exc)
        return grpc.StatusCode.INTERNAL, "internal error in logic (see its logs)"
    if code == grpc.StatusCode.INTERNAL:
        log.error("dependency misbehaved", extra={"error": str(exc)})
    return code, str(exc)


async def _abort(context: Context, exc: BaseException) -> NoReturn:
    code, message = _status_for(exc)
    await context.abort(code, message)
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
        kind=m.kind,  # type: ignore[arg-type]
        target_conv_seq=m.target_conv_seq,
        edited_at_ms=m.edited_at_ms,
        recalled=m.recalled,
        deleted_for_me=m.deleted_for_me,
    )


def conversation_pb(c: Conversation) -> common_pb2.Conversation:
    return common_pb2.Conversation(
        conversation_id=c.conversation_id,
        kind=c.kind,  # type: ignore[arg-type]
        name=c.name,
        member_ids=c.member_ids,
        last_conv_seq=c.last_conv_seq,
        owner_id=c.owner_id,
        read_conv_seq=c.read_conv_seq,
        unread_count=c.unread_count,
        unread_capped=c.unread_capped,
        last_activity_ms=c.last_activity_ms,
        peer_read_conv_seq=c.peer_read_conv_seq,
        peer_delivered_conv_seq=c.peer_delivered_conv_seq,
    )


class LogicServicer:
    """im.logic.v1.Logic over the domain objects."""

    def __init__(
        self,
        sender: Sender,
        fanout: Fanout,
        reader: Reader,
        groups: Groups,
        conversations: Conversations,
        send_messages_max_items: int = 256,
    ) -> None:
        self._conversations = conversations
        self._sender = sender
        self._fanout = fanout
        self._reader = reader
        self._groups = groups
        self._send_messages_max_items = send_messages_max_items
        self._tracer = trace.get_tracer("im.logic")

    async def _send(self, request: Any) -> pb.SendMessageResponse:
        ack = await self._sender.send(
            SendRequest(
                sender_id=request.sender_id,
                sender_device_id=request.sender_device_id,
                client_msg_id=request.client_msg_id,
                conversation_id=request.conversation_id,
                content_type=int(request.content_type),
                body=request.body,
                kind=int(request.kind),
                target_conv_seq=request.target_conv_seq,
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
    async def SendMessage(self, request: Any, context: Context) -> pb.SendMessageResponse:
        return await self._send(request)

    @_rpc
    async def SendMessages(self, request: Any, context: Context) -> pb.SendMessagesResponse:
        items = request.items
        limit = self._send_messages_max_items
        if len(items) > limit:
            raise InvalidArgument(
                f"SendMessages carries {len(items)} items; at most {limit} "
                "(IM_LOGIC_SEND_MESSAGES_MAX_ITEMS) per call"
            )
        traceparents = request.traceparents
        if traceparents and len(traceparents) != len(items):
            raise InvalidArgument(
                f"traceparents has {len(traceparents)} entries for {len(items)} items; "
                "send none or one per item"
            )
        batch_span = trace.get_current_span()
        batch_link = (
            [Link(batch_span.get_span_context())] if batch_span.get_span_context().is_valid else []
        )
        # Concurrently, so that the items join the same group-commit batch.
        results = await asyncio.gather(
            *(
                self._send_item(item, traceparents[i] if traceparents else "", batch_link)
                for i, item in enumerate(items)
            )
        )
        return pb.SendMessagesResponse(results=results)

    async def _send_item(
        self, item: Any, traceparent: str, batch_link: list[Link]
    ) -> pb.SendMessagesResult:
        """One item exactly as SendMessage would store it, in the trace of the span
        that sent it (linked to the SendMessages server span); its error becomes its
        result with the status code SendMessage would have returned."""
        parent = remote_parent(traceparent) if traceparent else None
        ctx = (
            trace.set_span_in_context(trace.NonRecordingSpan(parent))
            if parent is not None and parent.is_valid
            else otel_context.get_current()
        )
        with self._tracer.start_as_current_span(
            "logic.SendMessages.item", context=ctx, kind=SpanKind.SERVER, links=batch_link
        ) as span:
            try:
                return pb.SendMessagesResult(response=await self._send(item))
            except Exception as exc:
                code, message = _status_for(exc)
                span.set_status(Status(StatusCode.ERROR, code.name))
                return pb.SendMessagesResult(error_code=status_number(code), error_message=message)

    @_rpc
    async def SyncMessages(self, request: Any, context: Context) -> pb.SyncMessagesResponse:
        page = await self._reader.sync(request.user_id, request.after_seq, request.limit)
        return pb.SyncMessagesResponse(
            entries=[
                common_pb2.TimelineEntry(seq=e.seq, message=message_pb(e.message))
                for e in page.entries
            ],
            has_more=page.has_more,
            store_epoch=self._reader.store_epoch,
            pruned_through_seq=page.pruned_through_seq,
        )

    @_rpc
    async def GetHeads(self, request: Any, context: Context) -> pb.GetHeadsResponse:
        return pb.GetHeadsResponse(
            heads=await self._reader.heads(list(request.user_ids)),
            store_epoch=self._reader.store_epoch,
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
                        error_code=status_number(code),
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
        page = await self._conversations.page(
            request.user_id, request.page_size, request.page_token
        )
        return pb.ListConversationsResponse(
            conversations=[conversation_pb(c) for c in page.conversations],
            next_page_token=page.next_page_token,
        )

    @_rpc
    async def GetReceipts(self, request: Any, context: Context) -> pb.GetReceiptsResponse:
        members, reads, readers, token, delivered = await self._conversations.receipts(
            request.user_id,
            request.conversation_id,
            request.conv_seq,
            request.list_readers,
            request.page_size,
            request.page_token,
        )
        return pb.GetReceiptsResponse(
            member_count=members,
            read_count=reads,
            reader_ids=readers,
            next_page_token=token,
            delivered=delivered,
        )

    @_rpc
    async def GetMembers(self, request: Any, context: Context) -> pb.GetMembersResponse:
        members = await self._conversations.members(request.user_id, request.conversation_id)
        return pb.GetMembersResponse(member_ids=members)

    @_rpc
    async def SharedUsers(self, request: Any, context: Context) -> pb.SharedUsersResponse:
        shared = await self._conversations.shared(request.user_id, list(request.user_ids))
        return pb.SharedUsersResponse(user_ids=shared)


def add_to_server(servicer: LogicServicer, server: grpc.aio.Server) -> None:
    """Registers the servicer like the generated add_LogicServicer_to_server, but with
    lenient deserializers (undecodable bytes -> INVALID_ARGUMENT, not INTERNAL)."""
    methods: dict[str, tuple[Callable[..., Any], type[Message], type[Message]]] = {
        "SendMessage": (servicer.SendMessage, pb.SendMessageRequest, pb.SendMessageResponse),
        "SendMessages": (servicer.SendMessages, pb.SendMessagesRequest, pb.SendMessagesResponse),
        "SyncMessages": (servicer.SyncMessages, pb.SyncMessagesRequest, pb.SyncMessagesResponse),
        "GetHeads": (servicer.GetHeads, pb.GetHeadsRequest, pb.GetHeadsResponse),
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
        "GetReceipts": (servicer.GetReceipts, pb.GetReceiptsRequest, pb.GetReceiptsResponse),
        "GetMembers": (servicer.GetMembers, pb.GetMembersRequest, pb.GetMembersResponse),
        "SharedUsers": (servicer.SharedUsers, pb.SharedUsersRequest, pb.SharedUsersResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_lenient(req), response_serializer=resp.SerializeToString
        )
        for name, (fn, req, resp) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
