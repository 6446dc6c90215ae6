"""gRPC adapter of pusher: im.pusher.v1.Pusher, called by gateways over the
cluster network (plain insecure gRPC, restricted by NetworkPolicies)."""

from __future__ import annotations

import grpc

from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
from pusher.delivery import Deliverer

SERVICE = "im.pusher.v1.Pusher"


class PusherServicer(pusher_pb2_grpc.PusherServicer):
    def __init__(self, deliverer: Deliverer) -> None:
        self._deliverer = deliverer

    async def AckDelivery(
        self, request: pusher_pb2.AckDeliveryRequest, context: grpc.aio.ServicerContext
    ) -> pusher_pb2.AckDeliveryResponse:
        if not request.user_id or not request.device_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "user_id and device_id are required"
            )
        cancelled = self._deliverer.ack(request.user_id, request.device_id, request.seq)
        return pusher_pb2.AckDeliveryResponse(cancelled=cancelled)
