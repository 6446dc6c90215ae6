"""Builds the gateway from its settings and runs it (`python -m gateway`)."""

from __future__ import annotations

import logging
import ssl
import sys

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from gateway.config import Settings
from gateway.heads import Liveness, LogicHeads
from gateway.hub import Hub
from gateway.presence import LogicVisibility, PresenceService, PresenceStore
from gateway.routes import RouteTable
from gateway.servicer import (
    GATEWAY_SERVICE,
    INTERNAL_SERVICE,
    GatewayInternalServicer,
    GatewayServicer,
    add_authenticated_gateway,
)
from gateway.typing_relay import LogicMembers, TypingRelay
from gateway.upstream import LogicClient, Peers
from gateway.websocket import WsGateway, WsSettings
from im.gateway.v1 import gateway_internal_pb2_grpc
from imcommon.config import ConfigError
from imcommon.redisconn import redis_client
from imcommon.server import Runtime, add_port, bind_failure, server_options
from imcommon.server import main as serve_main
from imcommon.telemetry import instrument_server, internal_channel
from imcommon.tls import ChannelTLS

log = logging.getLogger(__name__)

#: Longest the shutdown waits for queued delivery ACKs to reach their pushers.
ACK_FLUSH_DEADLINE_S = 1.0


async def build(settings: Settings, runtime: Runtime) -> None:
    """Wires the gateway: Redis routes, the logic channel, the stream hub, typing
    and presence, both services, the route refresh loop and the presence poller,
    and GoAway on shutdown."""
    settings.require_addresses()
    if settings.server_tls() is None and not settings.allow_plaintext:
        log.warning(
            "The client port serves PLAINTEXT: tokens and messages cross the network "
            "unencrypted. Set IM_GATEWAY_TLS_CERT_FILE and IM_GATEWAY_TLS_KEY_FILE, or "
            "IM_GATEWAY_ALLOW_PLAINTEXT=true if a load balancer in front terminates TLS."
        )
    if settings.uses_dev_secret:
        log.warning(
            "IM_GATEWAY_TOKEN_SECRET is the DEV default: anyone can mint tokens. "
            "Set a random secret in every real deployment."
        )

    def address() -> str:
        """Where pushers and gateways reach GatewayInternal here (the route value)."""
        if settings.internal_advertise_address:
            return settings.internal_advertise_address
        if settings.internal_port:
            # The advertised host (a pod IP, say) with the internal port.
            host = settings.advertise_address.rpartition(":")[0] or settings.host
            return f"{host}:{settings.internal_port}"
        return settings.advertise_address or f"{settings.host}:{runtime.port}"

    redis = redis_client(
        settings.redis_url, settings.redis_timeout_s, max_connections=settings.redis_max_connections
    )
    runtime.stack.push_async_callback(redis.aclose)
    client_tls = ChannelTLS.of(settings.client_tls())
    logic_channel = internal_channel(settings.logic_address, runtime.metrics, tls=client_tls)
    runtime.stack.push_async_callback(logic_channel.close)
    peers = Peers(
        runtime.metrics,
        settings.internal_timeout_s,
        tls=client_tls,
        ack_batch_s=settings.ack_batch_ms / 1000,
        ack_batch_max=settings.ack_batch_max,
        ack_queue_max=settings.ack_queue_max,
    )
    runtime.stack.push_async_callback(peers.close)
    # Delivery ACKs still queued for pushers leave once the server has stopped (no
    # stream can ACK any more) and before the channels close; the stack unwinds in
    # reverse, so this runs first. A short deadline: an unsent ACK costs only a
    # retransmit. No background task: a pusher's queue arms a timer while non-empty.
    runtime.stack.push_async_callback(
        peers.acks.close, min(ACK_FLUSH_DEADLINE_S, settings.internal_timeout_s)
    )

    routes = RouteTable(
        redis, settings.redis_prefix, settings.route_ttl_s, settings.last_seen_ttl_s
    )
    logic = LogicClient(
        logic_channel,
        settings.logic_timeout_s,
        settings.logic_retry_s,
        runtime.metrics,
        batch_max=settings.send_batch_max,
        linger_s=settings.send_batch_linger_ms / 1000,
        max_inflight=settings.send_max_inflight,
    )
    liveness = None
    if settings.liveness_s:
        liveness = Liveness(
            settings,
            LogicHeads(logic.stub, settings.logic_timeout_s, logic.note_store_epoch),
            runtime.metrics,
        )
        runtime.spawn(liveness.run(), "liveness")
    hub = Hub(
        routes,
        peers,
        address,
        settings.refresh_interval_s,
        check_interval_s=settings.route_check_s,
        # Streams whose route was missing (Redis flushed, restarted, down): what the
        # pushers could not route meanwhile is pushed at the next tick, not the
        # next check.
        on_routes_restored=liveness.check_soon if liveness is not None else None,
    )
    # Typing and presence: ephemeral, off the message path (their own tasks, frames
    # queued without waiting), on the same logic channel and Redis client.
    typing = TypingRelay(
        settings,
        LogicMembers(logic.stub, settings.logic_timeout_s),
        routes,
        hub,
        peers,
        address,
        runtime.metrics,
    )
    runtime.stack.push_async_callback(typing.close)
    presence = PresenceService(
        settings,
        PresenceStore(redis, settings.redis_prefix),
        LogicVisibility(logic.stub, settings.logic_timeout_s),
        runtime.metrics,
    )
    runtime.spawn(presence.run(), "presence-poller")
    servicer = GatewayServicer(
        settings, hub, logic, peers, runtime.metrics, liveness, typing=typing, presence=presence
    )
    add_authenticated_gateway(servicer, runtime.server, settings.token_secret)
    runtime.expose(GATEWAY_SERVICE)
    if settings.ws_port:
        await _serve_websocket(settings, runtime, servicer)
    internal_servicer = GatewayInternalServicer(hub, runtime.metrics)
    if settings.internal_port:
        await _serve_internal(settings, runtime, internal_servicer)
    else:
        gateway_internal_pb2_grpc.add_GatewayInternalServicer_to_server(
            internal_servicer, runtime.server
        )
        runtime.expose(INTERNAL_SERVICE)
    runtime.spawn(hub.refresh_loop(), "route-refresh")

    def store_replaced(old: str, new: str) -> None:
        # Positions of the old store mean nothing in the new one: a client that
        # kept its stream would drop the new, lower seqs as duplicates. Reconnected,
        # it gets a Welcome with the new epoch and resyncs from the start.
        streams = hub.go_away_all(
            "the message store was replaced; reconnect", settings.goaway_reconnect_ms
        )
        log.warning("GoAway to every stream: new store epoch", extra={"streams": streams})

    logic.on_store_epoch_change = store_replaced

    async def go_away() -> None:
        await hub.shutdown(settings.goaway_reconnect_ms, settings.close_grace_s + 0.5)

    runtime.on_shutdown(go_away)


async def _serve_websocket(settings: Settings, runtime: Runtime, servicer: GatewayServicer) -> None:
    """The device protocol on WebSocket (gateway/websocket.py), same servicer.
    Stops accepting at shutdown; its sockets get the hub's GoAway like gRPC ones."""
    origins = [o.strip() for o in settings.ws_origins.split(",") if o.strip()]
    ws = WsGateway(
        servicer,
        settings.token_secret,
        WsSettings(
            origins=None if origins == ["*"] else origins,
            max_message_bytes=settings.ws_max_message_bytes,
            hello_timeout_s=settings.ws_hello_timeout_s,
            ping_interval_s=settings.ws_ping_interval_s,
            ping_timeout_s=settings.ws_ping_timeout_s,
            max_unary_in_flight=settings.ws_max_unary_in_flight,
        ),
        runtime.metrics,
    )
    tls = None
    if settings.tls_cert_file:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    try:
        await ws.start(settings.host, settings.ws_port, tls)
    except OSError:
        raise bind_failure(
            f"{settings.host}:{settings.ws_port}",
            "IM_GATEWAY_WS_PORT; is another gateway running there?",
        ) from None
    runtime.stack.push_async_callback(ws.stop)


async def _serve_internal(
    settings: Settings, runtime: Runtime, servicer: GatewayInternalServicer
) -> None:
    """GatewayInternal on its own port (TLS from INTERNAL_TLS_* if set, mutual
    with a client CA, else plaintext on the cluster network; NetworkPolicies let
    only pushers and gateways reach it). It stops after the client-facing server,
    so pushes keep flowing while clients get GoAway."""
    server = grpc.aio.server(options=server_options(settings))
    gateway_internal_pb2_grpc.add_GatewayInternalServicer_to_server(
        servicer, instrument_server(server, runtime.metrics)
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.host}:{settings.internal_port}"
    try:
        # A TLS file that does not load raises StartupError (exit 1, file named).
        add_port(server, address, settings.internal_server_tls())
    except RuntimeError:
        raise bind_failure(
            address, "IM_GATEWAY_INTERNAL_PORT; is another gateway running there?"
        ) from None
    await server.start()
    runtime.stack.push_async_callback(server.stop, settings.shutdown_grace_s)
    log.info("serving GatewayInternal", extra={"port": settings.internal_port})


def main(argv: list[str] | None = None) -> int:
    try:
        return serve_main("gateway", Settings, build, argv=argv)
    except ConfigError as exc:
        sys.stderr.write(f"gateway: {exc}\n")
        return 2
