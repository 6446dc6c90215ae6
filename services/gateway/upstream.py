"""The gateway's calls to other processes: logic (sends), pushers (delivery ACKs)
and other gateways (kicks).

Internal calls are plain insecure gRPC on the cluster network; NetworkPolicies
decide who may reach whom (see imcommon.telemetry.insecure_channel).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.auth import Identity
from gateway.connection import SendRejected
from im.gateway.v1 import gateway_internal_pb2, gateway_internal_pb2_grpc, gateway_pb2
from im.logic.v1 import logic_pb2, logic_pb2_grpc
from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
from imcommon.metrics import Metrics
from imcommon.telemetry import insecure_channel

log = logging.getLogger(__name__)

Code = gateway_pb2.SendErrorCode

#: How a status from logic becomes a SendError: (code, retryable). The one place
#: this mapping lives. Retryable means "resend the same frame later": safe for any
#: failure, because logic deduplicates on (sender, client_msg_id).
_SEND_ERRORS: dict[grpc.StatusCode, tuple[gateway_pb2.SendErrorCode.ValueType, bool]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (Code.SEND_ERROR_CODE_INVALID_ARGUMENT, False),
    grpc.StatusCode.OUT_OF_RANGE: (Code.SEND_ERROR_CODE_INVALID_ARGUMENT, False),
    grpc.StatusCode.PERMISSION_DENIED: (Code.SEND_ERROR_CODE_PERMISSION_DENIED, False),
    grpc.StatusCode.NOT_FOUND: (Code.SEND_ERROR_CODE_NOT_FOUND, False),
    grpc.StatusCode.FAILED_PRECONDITION: (Code.SEND_ERROR_CODE_INVALID_ARGUMENT, False),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (Code.SEND_ERROR_CODE_RATE_LIMITED, True),
    grpc.StatusCode.UNAVAILABLE: (Code.SEND_ERROR_CODE_UNAVAILABLE, True),
    grpc.StatusCode.DEADLINE_EXCEEDED: (Code.SEND_ERROR_CODE_UNAVAILABLE, True),
    grpc.StatusCode.CANCELLED: (Code.SEND_ERROR_CODE_UNAVAILABLE, True),
    grpc.StatusCode.ABORTED: (Code.SEND_ERROR_CODE_UNAVAILABLE, True),
}


def send_error_for(code: grpc.StatusCode) -> tuple[gateway_pb2.SendErrorCode.ValueType, bool]:
    """(SendErrorCode, retryable) for a status code returned by logic. Anything
    unexpected is INTERNAL and retryable: the send was not stored, and resending it
    cannot store it twice."""
    return _SEND_ERRORS.get(code, (Code.SEND_ERROR_CODE_INTERNAL, True))


class LogicClient:
    """Sends through logic.SendMessage, retrying while logic is UNAVAILABLE."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float, retry_s: float) -> None:
        self.stub = logic_pb2_grpc.LogicStub(channel)
        self._tracer = trace.get_tracer("im.gateway")
        self.timeout_s = timeout_s
        self.retry_s = retry_s

    async def send(self, identity: Identity, send: gateway_pb2.Send) -> gateway_pb2.SendAck:
        """Stores the message as `identity` (never a user named by the client).

        Returns only once logic answered OK, i.e. the message, the sender's
        timeline row and the outbox row are committed. Raises SendRejected.
        """
        request = logic_pb2.SendMessageRequest(
            sender_id=identity.user_id,
            sender_device_id=identity.device_id,
            client_msg_id=send.client_msg_id,
            conversation_id=send.conversation_id,
            content_type=send.content_type,
            body=send.body,
        )
        give_up_at = time.monotonic() + self.retry_s
        delay = 0.05
        # One span per send (streams get no span of their own; imcommon.telemetry).
        with self._tracer.start_as_current_span(
            "gateway.Send",
            kind=SpanKind.SERVER,
            attributes={
                "im.user_id": identity.user_id,
                "im.device_id": identity.device_id,
                "im.client_id": send.client_id,
                "im.client_msg_id": send.client_msg_id,
                "im.conversation_id": send.conversation_id,
            },
        ) as span:
            while True:
                try:
                    resp = await self.stub.SendMessage(request, timeout=self.timeout_s)
                    span.set_attributes(
                        {
                            "im.msg_id": resp.msg_id,
                            "im.seq": resp.seq,
                            "im.conv_seq": resp.conv_seq,
                            "im.duplicate": resp.duplicate,
                        }
                    )
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "send stored",
                            extra={
                                "msg_id": resp.msg_id,
                                "user_id": identity.user_id,
                                "device_id": identity.device_id,
                                "conversation_id": send.conversation_id,
                                "client_id": send.client_id,
                            },
                        )
                    break
                except grpc.aio.AioRpcError as exc:
                    status = exc.code()
                    if (
                        status == grpc.StatusCode.UNAVAILABLE
                        and time.monotonic() + delay < give_up_at
                    ):
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 1.0)
                        continue
                    code, retryable = send_error_for(status)
                    reason = exc.details() or status.name
                    if code == Code.SEND_ERROR_CODE_UNAVAILABLE:
                        reason = f"message store unavailable ({reason}); resend the same frame"
                    span.set_status(Status(StatusCode.ERROR, status.name))
                    raise SendRejected(code, retryable, reason) from None
        return gateway_pb2.SendAck(
            client_id=send.client_id,
            client_msg_id=send.client_msg_id,
            msg_id=resp.msg_id,
            seq=resp.seq,
            conv_seq=resp.conv_seq,
            server_time_ms=resp.server_time_ms,
        )


class Peers:
    """Channels to pushers and other gateways, cached per address (LRU)."""

    def __init__(self, metrics: Metrics, timeout_s: float, max_channels: int = 256) -> None:
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._max = max_channels
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Future[None]] = set()

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = insecure_channel(address, self._metrics)
            self._channels[address] = channel
            while len(self._channels) > self._max:
                _, old = self._channels.popitem(last=False)
                closing = asyncio.ensure_future(old.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        self._channels.move_to_end(address)
        return channel

    async def ack_delivery(self, address: str, user_id: str, device_id: str, seq: int) -> None:
        """Best effort: a lost ACK costs a retransmit, which the client ACKs again."""
        stub = pusher_pb2_grpc.PusherStub(self._channel(address))
        try:
            await stub.AckDelivery(
                pusher_pb2.AckDeliveryRequest(user_id=user_id, device_id=device_id, seq=seq),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            log.debug(
                "AckDelivery failed",
                extra={"pusher": address, "user_id": user_id, "code": exc.code().name},
            )

    async def kick(
        self, address: str, user_id: str, device_id: str, connection_id: str, reason: str
    ) -> bool:
        """Asks another gateway to close a replaced connection. Best effort: the
        other gateway also notices on its next route refresh."""
        stub = gateway_internal_pb2_grpc.GatewayInternalStub(self._channel(address))
        try:
            resp = await stub.Kick(
                gateway_internal_pb2.KickRequest(
                    user_id=user_id, device_id=device_id, connection_id=connection_id, reason=reason
                ),
                timeout=self._timeout_s,
            )
            return bool(resp.kicked)
        except grpc.aio.AioRpcError as exc:
            log.info(
                "Kick at another gateway failed",
                extra={"gateway": address, "user_id": user_id, "code": exc.code().name},
            )
            return False

    async def close(self) -> None:
        """Closes every channel. Idempotent."""
        channels, self._channels = list(self._channels.values()), OrderedDict()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
