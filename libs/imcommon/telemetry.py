"""gRPC interceptors that give every unary RPC a span (trace context carried in
metadata, W3C traceparent) and RPC metrics, on both the server and the client side.

Streaming RPCs pass through the server interceptor untouched: wrapping them breaks
handlers that use `context.write` (opentelemetry-python-contrib issue 3066; the aio
health `Watch` is one), and a span as long as a client connection says nothing.
Services open spans for the units of work inside a stream themselves (the gateway:
one span per Send).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from imcommon.metrics import Metrics

_SKIP = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class _MetadataCarrier(dict[str, str]):
    pass


class ServerTelemetryInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.tracer = trace.get_tracer("im.grpc.server")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or handler.unary_unary is None or method.startswith(_SKIP):
            return handler
        inner = handler.unary_unary
        carrier = _MetadataCarrier(
            (k, v) for k, v in (details.invocation_metadata or ()) if isinstance(v, str)
        )
        metrics, tracer = self.metrics, self.tracer

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            parent = propagate.extract(carrier)
            start = time.perf_counter()
            code = "OK"
            with tracer.start_as_current_span(
                method.lstrip("/"), context=parent, kind=SpanKind.SERVER,
                record_exception=False, set_status_on_exception=False,
            ) as span:  # fmt: skip
                try:
                    return await inner(request, context)
                except BaseException:
                    status = context.code()
                    code = status.name if status is not None else "UNKNOWN"
                    span.set_status(Status(StatusCode.ERROR, code))
                    raise
                finally:
                    if code == "OK":
                        status = context.code()
                        if status is not None and status != grpc.StatusCode.OK:
                            code = status.name
                    span.set_attribute("rpc.grpc.status_code", code)
                    metrics.rpc_server_handled.labels(method, code).inc()
                    metrics.rpc_server_latency.labels(method).observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class ClientTelemetryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Injects the current trace context into outgoing metadata and records a
    CLIENT span and client metrics per unary call."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.tracer = trace.get_tracer("im.grpc.client")

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        start = time.perf_counter()
        with self.tracer.start_as_current_span(method.lstrip("/"), kind=SpanKind.CLIENT) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            metadata = list(details.metadata or []) + list(carrier.items())
            details = grpc.aio.ClientCallDetails(
                details.method, details.timeout, metadata, details.credentials,
                details.wait_for_ready,
            )  # fmt: skip
            code = "OK"
            try:
                call = await continuation(details, request)
                status = await call.code()
                code = status.name
                return call
            except grpc.RpcError as exc:
                code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
                raise
            finally:
                if code != "OK":
                    span.set_status(Status(StatusCode.ERROR, code))
                if self.metrics is not None:
                    self.metrics.rpc_client_handled.labels(method, code).inc()
                    self.metrics.rpc_client_latency.labels(method).observe(
                        time.perf_counter() - start
                    )


def insecure_channel(
    address: str,
    metrics: Metrics | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to another of our services, with trace propagation and
    client metrics. Internal traffic is plaintext on the cluster network;
    NetworkPolicies restrict who can reach whom. Calls are spread round-robin over
    every address the name resolves to (a headless Service lists every pod)."""
    opts = [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        *(options or []),
    ]
    return grpc.aio.insecure_channel(
        address, options=opts, interceptors=[ClientTelemetryInterceptor(metrics)]
    )
