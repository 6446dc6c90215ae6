"""imcommon.telemetry: trace context crosses a real gRPC hop, and RPC metrics move."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from im.seqsvc.v1 import seqsvc_pb2, seqsvc_pb2_grpc
from imcommon.metrics import Metrics
from imcommon.telemetry import ServerTelemetryInterceptor, insecure_channel


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    trace.set_tracer_provider(provider)
    yield exp


class Echo(seqsvc_pb2_grpc.SeqServiceServicer):
    async def Current(
        self, request: seqsvc_pb2.CurrentRequest, context: grpc.aio.ServicerContext
    ) -> seqsvc_pb2.CurrentResponse:
        if not request.key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "key is empty")
        return seqsvc_pb2.CurrentResponse(value=len(request.key))


async def test_one_trace_across_a_hop_and_metrics(exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    metrics = Metrics("test")
    server = grpc.aio.server(interceptors=[ServerTelemetryInterceptor(metrics)])
    seqsvc_pb2_grpc.add_SeqServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{port}", metrics) as channel:
            stub = seqsvc_pb2_grpc.SeqServiceStub(channel)
            tracer = trace.get_tracer("test")
            with tracer.start_as_current_span("root") as root:
                resp = await stub.Current(seqsvc_pb2.CurrentRequest(key="abc"))
            assert resp.value == 3
            with contextlib.suppress(grpc.RpcError):
                await stub.Current(seqsvc_pb2.CurrentRequest(key=""))
    finally:
        await server.stop(None)

    spans = exporter.get_finished_spans()
    trace_id = root.get_span_context().trace_id
    ours = [s for s in spans if s.context.trace_id == trace_id]
    kinds = sorted(s.kind.name for s in ours)
    assert kinds == ["CLIENT", "INTERNAL", "SERVER"]
    server_span = next(s for s in ours if s.kind.name == "SERVER")
    client_span = next(s for s in ours if s.kind.name == "CLIENT")
    assert server_span.parent is not None
    assert server_span.parent.span_id == client_span.context.span_id

    method = "/im.seqsvc.v1.SeqService/Current"
    assert (
        metrics.registry.get_sample_value(
            "im_rpc_server_handled_total", {"method": method, "code": "OK"}
        )
        == 1
    )
    assert (
        metrics.registry.get_sample_value(
            "im_rpc_server_handled_total", {"method": method, "code": "INVALID_ARGUMENT"}
        )
        == 1
    )
    assert (
        metrics.registry.get_sample_value(
            "im_rpc_client_handled_total", {"method": method, "code": "INVALID_ARGUMENT"}
        )
        == 1
    )


async def test_streaming_handlers_pass_through() -> None:
    """The health Watch uses context.write; the interceptor must leave it alone."""
    from grpc_health.v1 import health

    metrics = Metrics("test")
    server = grpc.aio.server(interceptors=[ServerTelemetryInterceptor(metrics)])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("x", health_pb2.HealthCheckResponse.SERVING)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            call = stub.Watch(health_pb2.HealthCheckRequest(service="x"))
            first = await call.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            call.cancel()
    finally:
        await server.stop(None)
