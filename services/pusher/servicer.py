"""gRPC adapter of pusher: im.pusher.v1.Pusher, called by gateways over the
cluster network (plain insecure gRPC, restricted by NetworkPolicies)."""

from __future__ import annotations

import logging

import grpc

from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
from pusher.delivery import Deliverer

SERVICE = "im.pusher.v1.Pusher"

#: What AckDeliveries accepts per call unless the server passes its setting.
DEFAULT_MAX_ACKS_PER_CALL = 1000

log = logging.getLogger(__name__)


class PusherServicer(pusher_pb2_grpc.PusherServicer):
    def __init__(
        self, deliverer: Deliverer, max_acks_per_call: int = DEFAULT_MAX_ACKS_PER_CALL
    ) -> None:
        self._deliverer = deliverer
        self._max_acks = max_acks_per_call

    async def AckDelivery(
        self, request: pusher_pb2.AckDeliveryRequest, context: grpc.aio.ServicerContext
    ) -> pusher_pb2.AckDeliveryResponse:
        if not request.user_id or not request.device_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "user_id and device_id are required"
            )
        cancelled = self._deliverer.ack(request.user_id, request.device_id, request.seq)
        return pusher_pb2.AckDeliveryResponse(cancelled=cancelled)

    async def AckDeliveries(
        self, request: pusher_pb2.AckDeliveriesRequest, context: grpc.aio.ServicerContext
    ) -> pusher_pb2.AckDeliveriesResponse:
        """Each item acts like one AckDelivery on its own device. Items without
        user_id or device_id are rejected one by one (counted, indexes listed), so
        one bad item cannot cost the other devices of a gateway's batch their ACKs;
        a call over the per-call bound is refused whole, before anything applies."""
        acks = request.acks
        if len(acks) > self._max_acks:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(acks)} acks in one AckDeliveries call; at most {self._max_acks} "
                "(IM_PUSHER_MAX_ACKS_PER_CALL): split the batch "
                "(gateways: IM_GATEWAY_ACK_BATCH_MAX)",
            )
        ack = self._deliverer.ack
        cancelled = 0
        rejected: list[int] = []
        for i, item in enumerate(acks):
            if not item.user_id or not item.device_id:
                rejected.append(i)
                continue
            cancelled += ack(item.user_id, item.device_id, item.seq)
        if rejected:
            log.info(
                "AckDeliveries items rejected (user_id and device_id are required)",
                extra={"rejected": len(rejected), "items": len(acks)},
            )
        return pusher_pb2.AckDeliveriesResponse(
            cancelled=cancelled, rejected=len(rejected), rejected_indexes=rejected
        )
