"""imcommon.telemetry: trace context crosses real gRPC hops, RPC metrics move, each
method's handler and multicallable are instrumented once (not per call), and the
cheap no-exporter tracing still carries trace ids from hop to hop and into logs.

The tracer provider is a process global that OpenTelemetry lets one set only once;
these tests swap it through the API's module attribute and put it back after.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.status import StatusCode

from im.seqsvc.v1 import seqsvc_pb2, seqsvc_pb2_grpc
from imcommon import telemetry, tracing
from imcommon.logging import JsonFormatter
from imcommon.metrics import Metrics
from imcommon.server import EXCLUSIVE_PORT
from imcommon.telemetry import (
    InstrumentedChannel,
    ServerTelemetryInterceptor,
    insecure_channel,
    instrument_server,
)
from imcommon.tracing import IdsOnlyTracerProvider, ids_only_span

SEQ = "im.seqsvc.v1.SeqService"
CURRENT = f"/{SEQ}/Current"
NEXT = f"/{SEQ}/Next"
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"


@contextlib.contextmanager
def global_provider(provider: trace.TracerProvider | None) -> Iterator[None]:
    """Makes `provider` the global tracer provider for the block (None: none set,
    OpenTelemetry's no-op proxy)."""
    saved = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider
    try:
        yield
    finally:
        trace._TRACER_PROVIDER = saved


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    with global_provider(provider):
        yield exp


class Echo(seqsvc_pb2_grpc.SeqServiceServicer):
    """Current answers len(key); an empty key is INVALID_ARGUMENT; "slow" waits."""

    async def Current(
        self, request: seqsvc_pb2.CurrentRequest, context: grpc.aio.ServicerContext
    ) -> seqsvc_pb2.CurrentResponse:
        if not request.key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "key is empty")
        if request.key == "slow":
            await asyncio.sleep(30)
        if request.key == "set-code":
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            context.set_details("returned with a code")
        return seqsvc_pb2.CurrentResponse(value=len(request.key))

    async def Next(
        self, request: seqsvc_pb2.NextRequest, context: grpc.aio.ServicerContext
    ) -> seqsvc_pb2.NextResponse:
        return seqsvc_pb2.NextResponse(value=1)


@contextlib.asynccontextmanager
async def serving(servicer: Any, metrics: Metrics, how: str = "instrumented") -> AsyncIterator[str]:
    """A SeqService server on a free port; yields its address. `how`: registered
    through `instrument_server` by the generated function ("instrumented"), by a
    hand-written add_to_server like logic's and seqsvc's ("handwritten"), or with
    the ServerTelemetryInterceptor ("interceptor")."""
    if how == "interceptor":
        raw = grpc.aio.server(
            interceptors=[ServerTelemetryInterceptor(metrics)], options=[EXCLUSIVE_PORT]
        )
        server: grpc.aio.Server = raw
    else:
        raw = grpc.aio.server(options=[EXCLUSIVE_PORT])
        server = instrument_server(raw, metrics)
    if how == "handwritten":
        handlers = {
            "Current": grpc.unary_unary_rpc_method_handler(
                servicer.Current,
                request_deserializer=seqsvc_pb2.CurrentRequest.FromString,
                response_serializer=seqsvc_pb2.CurrentResponse.SerializeToString,
            ),
            "Next": grpc.unary_unary_rpc_method_handler(
                servicer.Next,
                request_deserializer=seqsvc_pb2.NextRequest.FromString,
                response_serializer=seqsvc_pb2.NextResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SEQ, handlers),))
        server.add_registered_method_handlers(SEQ, handlers)
    else:
        seqsvc_pb2_grpc.add_SeqServiceServicer_to_server(servicer, server)
    port = raw.add_insecure_port("127.0.0.1:0")
    await raw.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await raw.stop(None)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def served(metrics: Metrics, n: int, timeout: float = 10.0) -> None:
    """Waits until the server finished `n` calls. A handler that aborts has sent
    its status before it raises, so the client can see the error before the
    server's wrapper has counted the call and ended its span."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (
        sum(
            s.value
            for m in metrics.rpc_server_latency.collect()
            for s in m.samples
            if s.name.endswith("_count")
        )
        < n
    ):
        assert loop.time() < deadline, f"the server did not finish {n} calls"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["instrumented", "handwritten", "interceptor"])
async def test_one_trace_across_a_hop_and_metrics(exporter: InMemorySpanExporter, how: str) -> None:
    server_metrics, client_metrics = Metrics("server"), Metrics("client")
    async with (
        serving(Echo(), server_metrics, how) as address,
        insecure_channel(address, client_metrics) as channel,
    ):
        stub = seqsvc_pb2_grpc.SeqServiceStub(channel)
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("root") as root:
            resp = await stub.Current(seqsvc_pb2.CurrentRequest(key="abc"))
            with pytest.raises(grpc.RpcError) as failed:
                await stub.Current(seqsvc_pb2.CurrentRequest(key=""))
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert resp.value == 3
        await served(server_metrics, 2)

    spans = exporter.get_finished_spans()
    trace_id = root.get_span_context().trace_id
    ours = [s for s in spans if s.context.trace_id == trace_id]
    assert sorted(s.kind.name for s in ours) == ["CLIENT", "CLIENT", "INTERNAL", "SERVER", "SERVER"]
    servers = [s for s in ours if s.kind.name == "SERVER"]
    clients = [s for s in ours if s.kind.name == "CLIENT"]
    for server_span, client_span in zip(servers, clients, strict=True):
        assert server_span.name == client_span.name == CURRENT.lstrip("/")
        assert (
            client_span.parent is not None
            and client_span.parent.span_id == root.get_span_context().span_id
        )
        assert server_span.parent is not None
        assert server_span.parent.span_id == client_span.context.span_id
    ok_server, failed_server = servers
    ok_client, failed_client = clients
    assert ok_server.attributes["rpc.grpc.status_code"] == "OK"
    assert ok_server.status.status_code == StatusCode.UNSET
    assert ok_client.status.status_code == StatusCode.UNSET
    assert failed_server.attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    assert failed_server.status.status_code == StatusCode.ERROR
    assert failed_server.status.description == "INVALID_ARGUMENT"
    assert failed_client.status.status_code == StatusCode.ERROR
    assert failed_client.status.description == "INVALID_ARGUMENT"
    assert not failed_server.events and not failed_client.events

    for metrics, side in ((server_metrics, "server"), (client_metrics, "client")):
        handled = f"im_rpc_{side}_handled_total"
        assert sample(metrics, handled, method=CURRENT, code="OK") == 1
        assert sample(metrics, handled, method=CURRENT, code="INVALID_ARGUMENT") == 1
        latency = f"im_rpc_{side}_latency_seconds_count"
        assert sample(metrics, latency, method=CURRENT) == 2


async def test_a_code_set_without_raising_is_the_calls_code(exporter: InMemorySpanExporter) -> None:
    metrics = Metrics("test")
    async with serving(Echo(), metrics) as address, insecure_channel(address, metrics) as channel:
        stub = seqsvc_pb2_grpc.SeqServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            await stub.Current(seqsvc_pb2.CurrentRequest(key="set-code"))
        await served(metrics, 1)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for side in ("server", "client"):
        handled = f"im_rpc_{side}_handled_total"
        assert sample(metrics, handled, method=CURRENT, code="FAILED_PRECONDITION") == 1
    server_span = next(s for s in exporter.get_finished_spans() if s.kind.name == "SERVER")
    assert server_span.attributes["rpc.grpc.status_code"] == "FAILED_PRECONDITION"


@pytest.mark.parametrize("how", ["instrumented", "handwritten", "interceptor"])
async def test_each_method_is_instrumented_once_not_per_call(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    server_wraps: list[str] = []
    client_wraps: list[str] = []
    real_wrap = telemetry._instrument_unary
    real_init = telemetry._InstrumentedUnaryUnary.__init__

    def counting_wrap(method: str, *args: Any) -> Any:
        server_wraps.append(method)
        return real_wrap(method, *args)

    def counting_init(self: Any, inner: Any, method: str, *args: Any) -> None:
        client_wraps.append(method)
        real_init(self, inner, method, *args)

    monkeypatch.setattr(telemetry, "_instrument_unary", counting_wrap)
    monkeypatch.setattr(telemetry._InstrumentedUnaryUnary, "__init__", counting_init)
    server_metrics, client_metrics = Metrics("server"), Metrics("client")
    calls = 12
    async with serving(Echo(), server_metrics, how) as address:
        registered = sorted(server_wraps)
        # Each async unary method once, though registered both as a generic and
        # as a registered handler (the generated base class's synchronous
        # UNIMPLEMENTED stubs are left as they are). The interceptor wraps a
        # method on its first call.
        assert registered == ([] if how == "interceptor" else sorted([NEXT, CURRENT]))
        async with insecure_channel(address, client_metrics) as channel:
            for i in range(calls):
                # A stub per call, as some callers build them: still no new wrapping.
                stub = seqsvc_pb2_grpc.SeqServiceStub(channel)
                assert (
                    await stub.Current(seqsvc_pb2.CurrentRequest(key="k" * (i + 1)))
                ).value == i + 1
            await asyncio.gather(
                *(stub.Current(seqsvc_pb2.CurrentRequest(key="x")) for _ in range(calls))
            )
    once = [CURRENT] if how == "interceptor" else registered
    assert sorted(server_wraps) == once, "no handler was wrapped per call"
    assert sorted(client_wraps) == sorted(
        f"/{SEQ}/{m}" for m in ("Next", "NextBatch", "Reserve", "Current", "GetRouting")
    )
    # Every call counted exactly once on each side.
    assert (
        sample(server_metrics, "im_rpc_server_handled_total", method=CURRENT, code="OK")
        == 2 * calls
    )
    assert (
        sample(client_metrics, "im_rpc_client_handled_total", method=CURRENT, code="OK")
        == 2 * calls
    )


class Hop(seqsvc_pb2_grpc.SeqServiceServicer):
    """Front service: Current records the trace context it runs in and a log line,
    then calls the back service's Next through an instrumented channel."""

    def __init__(self, back: str, log_stream: io.StringIO) -> None:
        self.back = back
        self.seen: list[SpanContext] = []
        self.log = logging.getLogger("test.hop")
        handler = logging.StreamHandler(log_stream)
        handler.setFormatter(JsonFormatter("front"))
        self.log.addHandler(handler)
        self.log.setLevel(logging.INFO)
        self.log.propagate = False

    async def Current(
        self, request: seqsvc_pb2.CurrentRequest, context: grpc.aio.ServicerContext
    ) -> seqsvc_pb2.CurrentResponse:
        self.seen.append(trace.get_current_span().get_span_context())
        self.log.info("front handled", extra={"key": request.key})
        async with insecure_channel(self.back, Metrics("front-client")) as channel:
            resp = await seqsvc_pb2_grpc.SeqServiceStub(channel).Next(
                seqsvc_pb2.NextRequest(key=request.key)
            )
        return seqsvc_pb2.CurrentResponse(value=resp.value)


class Back(seqsvc_pb2_grpc.SeqServiceServicer):
    """Back service: Next records the traceparent it received and its own context."""

    def __init__(self) -> None:
        self.traceparents: list[str | None] = []
        self.seen: list[SpanContext] = []

    async def Next(
        self, request: seqsvc_pb2.NextRequest, context: grpc.aio.ServicerContext
    ) -> seqsvc_pb2.NextResponse:
        metadata = dict(context.invocation_metadata() or ())
        self.traceparents.append(metadata.get("traceparent"))
        self.seen.append(trace.get_current_span().get_span_context())
        return seqsvc_pb2.NextResponse(value=7)


def parse_traceparent(value: str | None) -> tuple[int, int, int]:
    assert value is not None, "no traceparent reached the next hop"
    _version, trace_id, span_id, flags = value.split("-")
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


@contextlib.asynccontextmanager
async def two_hops() -> AsyncIterator[
    tuple[seqsvc_pb2_grpc.SeqServiceStub, Hop, Back, io.StringIO]
]:
    """A plain client -> front (instrumented) -> back (instrumented)."""
    logs = io.StringIO()
    back = Back()
    async with serving(back, Metrics("back")) as back_address:
        front = Hop(back_address, logs)
        async with (
            serving(front, Metrics("front")) as front_address,
            grpc.aio.insecure_channel(front_address) as channel,
        ):
            yield seqsvc_pb2_grpc.SeqServiceStub(channel), front, back, logs


async def test_without_an_exporter_trace_ids_reach_the_next_hop_and_the_logs() -> None:
    """What services run without OTEL exporter settings: nothing recorded, but a
    served call has a span context of its own under the caller's trace, its logs
    carry it, and an outgoing call carries it on (no client span in between)."""
    with global_provider(IdsOnlyTracerProvider()):
        async with two_hops() as (stub, front, back, logs):
            await stub.Current(
                seqsvc_pb2.CurrentRequest(key="a"), metadata=(("traceparent", TRACEPARENT),)
            )
            await stub.Current(seqsvc_pb2.CurrentRequest(key="b"))  # no incoming context

    with_parent, root = front.seen
    assert with_parent.trace_id == TRACE_ID
    assert with_parent.span_id != SPAN_ID, "the served call has a span id of its own"
    trace_id, parent_span, flags = parse_traceparent(back.traceparents[0])
    assert (trace_id, parent_span) == (TRACE_ID, with_parent.span_id)
    assert flags & TraceFlags.SAMPLED == 0, "nothing is recorded, so nothing is sampled"
    assert back.seen[0].trace_id == TRACE_ID and back.seen[0].span_id != with_parent.span_id

    assert root.is_valid, "a call without trace context starts a trace"
    assert root.trace_id != TRACE_ID
    assert parse_traceparent(back.traceparents[1])[:2] == (root.trace_id, root.span_id)
    assert back.seen[1].trace_id == root.trace_id

    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert [(e["trace_id"], e["span_id"]) for e in lines] == [
        (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}") for ctx in (with_parent, root)
    ]


async def test_with_no_tracer_provider_the_callers_context_passes_through() -> None:
    with global_provider(None):
        async with two_hops() as (stub, front, back, _logs):
            await stub.Current(
                seqsvc_pb2.CurrentRequest(key="a"), metadata=(("traceparent", TRACEPARENT),)
            )
            await stub.Current(seqsvc_pb2.CurrentRequest(key="b"))
    assert (front.seen[0].trace_id, front.seen[0].span_id) == (TRACE_ID, SPAN_ID)
    assert parse_traceparent(back.traceparents[0])[:2] == (TRACE_ID, SPAN_ID)
    assert not front.seen[1].is_valid
    assert back.traceparents[1] is None, "no context, nothing injected"


TRACEPARENTS = [
    TRACEPARENT,
    f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-00",
    f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-03",
    f" \t00-{TRACE_ID:032x}-{SPAN_ID:016x}-01 \t",
    f"01-{TRACE_ID:032x}-{SPAN_ID:016x}-01-future-fields",
    f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01-not-allowed-in-00",
    f"ff-{TRACE_ID:032x}-{SPAN_ID:016x}-01",
    f"00-{0:032x}-{SPAN_ID:016x}-01",
    f"00-{TRACE_ID:032x}-{0:016x}-01",
    f"00-{TRACE_ID:032X}-{SPAN_ID:016x}-01",
    f"00-{TRACE_ID:031x}-{SPAN_ID:016x}-01",
    "",
    "garbage",
]


@pytest.mark.parametrize("header", TRACEPARENTS)
def test_the_traceparent_fast_path_reads_what_the_propagator_reads(header: str) -> None:
    expected = trace.get_current_span(
        TraceContextTextMapPropagator().extract({"traceparent": header})
    ).get_span_context()
    assert telemetry.remote_parent(header) == expected
    if expected.is_valid:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(
            carrier, context=trace.set_span_in_context(NonRecordingSpan(expected))
        )
        assert telemetry.traceparent_of(expected) == carrier["traceparent"]


async def test_without_an_exporter_tracestate_reaches_the_next_hop() -> None:
    with global_provider(IdsOnlyTracerProvider()):
        async with two_hops() as (stub, front, back, _logs):
            await stub.Current(
                seqsvc_pb2.CurrentRequest(key="a"),
                metadata=(("traceparent", TRACEPARENT), ("tracestate", "vendor=x")),
            )
    assert front.seen[0].trace_id == TRACE_ID
    assert front.seen[0].trace_state == TraceState([("vendor", "x")])
    assert back.seen[0].trace_state == TraceState([("vendor", "x")])
    assert parse_traceparent(back.traceparents[0])[:2] == (TRACE_ID, front.seen[0].span_id)


def test_ids_only_spans_match_what_the_sdk_made_without_an_exporter() -> None:
    sdk = TracerProvider(sampler=ALWAYS_OFF).get_tracer("t")
    parent = SpanContext(
        TRACE_ID,
        SPAN_ID,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID),
        trace_state=TraceState([("vendor", "x")]),
    )
    for context in (parent, trace.INVALID_SPAN_CONTEXT):
        ctx = trace.set_span_in_context(NonRecordingSpan(context))
        theirs = sdk.start_span("s", context=ctx).get_span_context()
        ours_span = IdsOnlyTracerProvider().get_tracer("t").start_span("s", context=ctx)
        ours = ours_span.get_span_context()
        assert not ours_span.is_recording()
        assert ours.is_valid and not ours.is_remote
        assert ours.trace_flags == theirs.trace_flags
        assert ours.trace_state == theirs.trace_state
        if context.is_valid:
            assert ours.trace_id == theirs.trace_id == TRACE_ID
        assert ours.span_id not in (SPAN_ID, theirs.span_id)
    assert ids_only_span(parent).get_span_context().trace_id == TRACE_ID


def test_ids_only_tracer_makes_the_span_current_in_its_block() -> None:
    tracer = IdsOnlyTracerProvider().get_tracer("t")
    assert not trace.get_current_span().get_span_context().is_valid
    with tracer.start_as_current_span("outer") as outer:
        assert trace.get_current_span() is outer
        with tracer.start_as_current_span("inner") as inner:
            assert inner.get_span_context().trace_id == outer.get_span_context().trace_id
            assert trace.get_current_span() is inner
        assert trace.get_current_span() is outer
    assert not trace.get_current_span().get_span_context().is_valid


def test_setup_tracing_without_an_exporter_installs_the_ids_only_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed: list[trace.TracerProvider] = []
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)
    for var in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_SAMPLER",
    ):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(tracing.setup_tracing("svc"), IdsOnlyTracerProvider)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    provider = tracing.setup_tracing("svc")
    assert isinstance(provider, TracerProvider)
    provider.shutdown()
    assert len(installed) == 2


async def test_the_call_object_is_grpcs_own(exporter: InMemorySpanExporter) -> None:
    """Callers await the call, read code()/details()/initial_metadata(),
    time_remaining(), cancel it: all of that is grpc's call object; a deadline
    and a cancellation are counted with their codes."""
    metrics = Metrics("test")
    async with serving(Echo(), metrics) as address, insecure_channel(address, metrics) as channel:
        assert isinstance(channel, InstrumentedChannel)
        stub = seqsvc_pb2_grpc.SeqServiceStub(channel)
        call = stub.Current(seqsvc_pb2.CurrentRequest(key="abcd"), timeout=10)
        assert isinstance(call, grpc.aio.UnaryUnaryCall)
        remaining = call.time_remaining()
        assert remaining is not None and 0 < remaining <= 10
        assert (await call).value == 4
        assert await call.code() == grpc.StatusCode.OK
        assert await call.details() == ""
        assert isinstance(await call.initial_metadata(), grpc.aio.Metadata)

        with pytest.raises(grpc.RpcError) as late:
            await stub.Current(seqsvc_pb2.CurrentRequest(key="slow"), timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        slow = stub.Current(seqsvc_pb2.CurrentRequest(key="slow"))
        await asyncio.sleep(0)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert slow.cancelled()
    handled = "im_rpc_client_handled_total"
    assert sample(metrics, handled, method=CURRENT, code="OK") == 1
    assert sample(metrics, handled, method=CURRENT, code="DEADLINE_EXCEEDED") == 1
    assert sample(metrics, handled, method=CURRENT, code="CANCELLED") == 1
    clients = [s for s in exporter.get_finished_spans() if s.kind.name == "CLIENT"]
    assert sorted(str(s.status.description) for s in clients) == [
        "CANCELLED",
        "DEADLINE_EXCEEDED",
        "None",
    ]


async def test_a_channel_without_metrics_still_propagates(exporter: InMemorySpanExporter) -> None:
    async with serving(Echo(), Metrics("s")) as address, insecure_channel(address) as channel:
        with trace.get_tracer("test").start_as_current_span("root") as root:
            await seqsvc_pb2_grpc.SeqServiceStub(channel).Current(
                seqsvc_pb2.CurrentRequest(key="a")
            )
    server_span = next(s for s in exporter.get_finished_spans() if s.kind.name == "SERVER")
    assert server_span.context.trace_id == root.get_span_context().trace_id


@pytest.mark.parametrize("how", ["instrumented", "interceptor"])
async def test_streaming_handlers_and_health_watch_pass_through(how: str) -> None:
    """The health Watch (unary-stream, context.write) is left alone on the
    server, and streaming calls through an instrumented channel are grpc's."""
    metrics = Metrics("test")
    if how == "interceptor":
        raw = grpc.aio.server(
            interceptors=[ServerTelemetryInterceptor(metrics)], options=[EXCLUSIVE_PORT]
        )
        server: grpc.aio.Server = raw
    else:
        raw = grpc.aio.server(options=[EXCLUSIVE_PORT])
        server = instrument_server(raw, metrics)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = raw.add_insecure_port("127.0.0.1:0")
    await raw.start()
    await servicer.set("x", health_pb2.HealthCheckResponse.SERVING)
    try:
        async with insecure_channel(f"127.0.0.1:{port}", metrics) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            call = stub.Watch(health_pb2.HealthCheckRequest(service="x"))
            first = await call.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await servicer.set("x", health_pb2.HealthCheckResponse.NOT_SERVING)
            second = await asyncio.wait_for(call.read(), 10)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            call.cancel()
            check = await stub.Check(health_pb2.HealthCheckRequest(service="x"))
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await raw.stop(None)
    # Health is not ours to count on the server; the client counts its unary call.
    assert not any(
        s.labels.get("method", "").startswith("/grpc.health")
        for m in metrics.rpc_server_handled.collect()
        for s in m.samples
    )
    check_method = "/grpc.health.v1.Health/Check"
    assert sample(metrics, "im_rpc_client_handled_total", method=check_method, code="OK") == 1
