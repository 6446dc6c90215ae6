"""Builds pusher from its settings and runs it (`python -m pusher`)."""

from __future__ import annotations

import sys

from im.logic.v1 import logic_pb2_grpc
from im.pusher.v1 import pusher_pb2_grpc
from imcommon.config import ConfigError
from imcommon.redisconn import redis_client
from imcommon.server import Runtime
from imcommon.server import main as serve_main
from imcommon.telemetry import internal_channel
from imcommon.tls import ChannelTLS
from pusher.config import Settings
from pusher.consumer import TriggerConsumer
from pusher.delivery import Deliverer, GatewayClients
from pusher.faults import Faults
from pusher.routes import RouteReader
from pusher.servicer import SERVICE, PusherServicer


async def build(settings: Settings, runtime: Runtime) -> None:
    """Wires pusher: Redis route reader, logic and gateway channels, the timing
    wheel, the JetStream consumer, and the AckDelivery service."""
    settings.require_addresses()

    def ack_to() -> str:
        return settings.advertise_address or f"{settings.host}:{runtime.port}"

    redis = redis_client(settings.redis_url, settings.redis_timeout_s)
    runtime.stack.push_async_callback(redis.aclose)
    client_tls = ChannelTLS.of(settings.client_tls())
    logic_channel = internal_channel(settings.logic_address, runtime.metrics, tls=client_tls)
    runtime.stack.push_async_callback(logic_channel.close)
    gateways = GatewayClients(runtime.metrics, settings.deliver_timeout_s, tls=client_tls)
    runtime.stack.push_async_callback(gateways.close)

    deliverer = Deliverer(
        settings, RouteReader(redis, settings.redis_prefix), gateways, ack_to, runtime.metrics
    )
    consumer = TriggerConsumer(
        settings,
        logic_pb2_grpc.LogicStub(logic_channel),
        deliverer,
        runtime.metrics,
        Faults.from_settings(settings),
    )
    pusher_pb2_grpc.add_PusherServicer_to_server(
        PusherServicer(deliverer, settings.max_acks_per_call), runtime.server
    )
    runtime.expose(SERVICE)
    runtime.spawn(consumer.run(), "jetstream-consumer")
    runtime.spawn(deliverer.run(), "retransmit-wheel")
    if settings.metrics_port:
        runtime.spawn(consumer.lag_loop(settings.metrics_sample_s), "jetstream-lag")

    async def stop_consuming() -> None:
        await consumer.stop(wait_s=max(0.5, settings.shutdown_grace_s - 0.5))

    runtime.on_shutdown(stop_consuming)


def main(argv: list[str] | None = None) -> int:
    try:
        return serve_main("pusher", Settings, build, argv=argv)
    except ConfigError as exc:
        sys.stderr.write(f"pusher: {exc}\n")
        return 2
