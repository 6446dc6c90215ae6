"""Every unary RPC between our services gets a span (trace context carried in
metadata, W3C traceparent) and RPC metrics, on both the server and the client side.

This runs on every internal call, so none of it goes through grpc.aio's
interceptor machinery, which costs an extra task and call object per client call
and a new handler and closure per served call:

- server side, `instrument_server(server, metrics)` wraps each unary-unary method
  handler once, when a servicer registers it (generated `add_*_to_server` and
  hand-written `add_to_server` functions alike); the wrapper reads the trace
  context from the call's metadata;
- client side, `internal_channel()` returns a channel whose `unary_unary`
  multicallables are wrapped once per method; a call returns grpc's own call
  object, and its metrics (and span, when tracing records) are finished by a
  done callback.

The Prometheus label children of a method are looked up once and kept. With an
exporter (`imcommon.tracing`) the spans are what they always were: a SERVER span
per served call and a CLIENT span per outgoing call. Without one nothing is
recorded and no client span is made: a served call gets a span context of its
own (a new span id under the caller's trace id, or a new trace), so logs carry
trace ids, and an outgoing call carries the current context to the next hop.

Streaming RPCs pass through untouched: wrapping them breaks handlers that use
`context.write` (opentelemetry-python-contrib issue 3066; the aio health `Watch` is
one), and a span as long as a client connection says nothing. Services open spans
for the units of work inside a stream themselves (the gateway: one span per Send).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import grpc
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as context_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import (
    INVALID_SPAN,
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter, Histogram

from imcommon.metrics import Metrics
from imcommon.tls import ChannelTLS
from imcommon.tracing import IdsOnlyTracerProvider, ids_only_span, is_recording_provider

log = logging.getLogger(__name__)

_SKIP = ("/grpc.health.v1.Health/", "/grpc.reflection.")
#: The parent of a served call that arrives without trace context: a root, never
#: whatever context the server's own task happens to hold.
_NO_PARENT = Context()
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_TRACEPARENT = "traceparent"
_TRACEPARENT_RE = TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT_RE
_TRACEPARENT_MAX = TraceContextTextMapPropagator._TRACEPARENT_MAXIMUM_LENGTH


def _is_default_w3c(textmap: TextMapPropagator) -> bool:
    """Whether `textmap` is OpenTelemetry's default propagator (W3C trace context,
    then W3C baggage), whose work on a lone traceparent header this module can
    do itself, without building contexts it would only unpack again."""
    inner = getattr(textmap, "_propagators", None)
    return (
        isinstance(textmap, CompositePropagator)
        and isinstance(inner, list | tuple)
        and [type(p) for p in inner] == [TraceContextTextMapPropagator, W3CBaggagePropagator]
    )


def remote_parent(traceparent: str) -> SpanContext:
    """The span context TraceContextTextMapPropagator extracts from a lone
    traceparent header (no tracestate, no baggage); INVALID_SPAN_CONTEXT where it
    extracts none. The caller sends headers over the maximum length to the
    propagator itself (it logs them)."""
    match = _TRACEPARENT_RE.search(traceparent)
    if not match:
        return INVALID_SPAN_CONTEXT
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16 or (version == "00" and rest) or version == "ff":
        return INVALID_SPAN_CONTEXT
    return SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )


def traceparent_of(span_context: SpanContext) -> str:
    """The traceparent header TraceContextTextMapPropagator injects for a valid
    `span_context`."""
    ctx = span_context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


class _Tracing:
    """The global tracer provider and propagator as of the current call. Both are
    process globals that tests (and set-up order) may change, so every call
    checks them, which costs two function calls; anything derived from them is
    recomputed only when one changes."""

    __slots__ = (
        "_name",
        "_provider",
        "_textmap",
        "fields",
        "ids_only",
        "recording",
        "tracer",
        "w3c",
    )

    def __init__(self, name: str) -> None:
        self._name = name
        self._provider: trace.TracerProvider | None = None
        self._textmap: TextMapPropagator | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.recording = False
        self.ids_only = False
        self.fields: frozenset[str] = frozenset()
        self.w3c = False

    def refresh(self) -> TextMapPropagator:
        provider = trace.get_tracer_provider()
        if provider is not self._provider:
            self._provider = provider
            self.tracer = provider.get_tracer(self._name)
            self.recording = is_recording_provider(provider)
            self.ids_only = isinstance(provider, IdsOnlyTracerProvider)
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:
            self._textmap = textmap
            self.fields = frozenset(textmap.fields)
            self.w3c = _is_default_w3c(textmap)
        return textmap


class _ByCode:
    """A labelled counter's child per status code for one method, each looked up
    once (created on first use, so no series appears before its first call)."""

    __slots__ = ("_children", "_counter", "_method")

    def __init__(self, counter: Counter, method: str) -> None:
        self._counter = counter
        self._method = method
        self._children: dict[str, Counter] = {}

    def inc(self, code: str) -> None:
        child = self._children.get(code)
        if child is None:
            child = self._children[code] = self._counter.labels(self._method, code)
        child.inc()


# -- server side -----------------------------------------------------------------


def _instrument_unary(
    method: str, handler: grpc.RpcMethodHandler, metrics: Metrics, tracing: _Tracing
) -> grpc.RpcMethodHandler:
    """`handler` with a SERVER span (when tracing records; else a span context of
    its own) and the server RPC metrics. Built once per method."""
    inner = handler.unary_unary
    name = method.lstrip("/")
    handled = _ByCode(metrics.rpc_server_handled, method)
    latency: Histogram = metrics.rpc_server_latency.labels(method)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        textmap = tracing.refresh()
        fields = tracing.fields
        carrier: dict[str, str] | None = None
        for key, value in context.invocation_metadata() or ():
            if key in fields and isinstance(value, str):
                if carrier is None:
                    carrier = {}
                carrier[key] = value
        start = time.perf_counter()
        recording = tracing.recording
        span: Span
        if recording:
            parent = textmap.extract(carrier) if carrier is not None else _NO_PARENT
            span = tracing.tracer.start_span(
                name, context=parent, kind=SpanKind.SERVER,
                record_exception=False, set_status_on_exception=False,
            )  # fmt: skip
        else:
            remote = INVALID_SPAN_CONTEXT
            if carrier is not None:
                traceparent = carrier.get(_TRACEPARENT)
                if (
                    tracing.w3c
                    and len(carrier) == 1
                    and traceparent is not None
                    and len(traceparent) <= _TRACEPARENT_MAX
                ):
                    remote = remote_parent(traceparent)
                else:
                    remote = trace.get_current_span(textmap.extract(carrier)).get_span_context()
            if tracing.ids_only:
                span = ids_only_span(remote)
            else:  # no tracer provider at all: the caller's context passes through
                span = NonRecordingSpan(remote) if remote.is_valid else INVALID_SPAN
        token = context_api.attach(trace.set_span_in_context(span))
        code = "OK"
        try:
            return await inner(request, context)
        except BaseException:
            status = context.code()
            code = status.name if status is not None else "UNKNOWN"
            if recording:
                span.set_status(Status(StatusCode.ERROR, code))
            raise
        finally:
            if code == "OK":
                status = context.code()
                if status is not None and status != grpc.StatusCode.OK:
                    code = status.name
            if recording:
                span.set_attribute("rpc.grpc.status_code", code)
            handled.inc(code)
            latency.observe(time.perf_counter() - start)
            context_api.detach(token)
            if recording:
                span.end()

    return grpc.unary_unary_rpc_method_handler(
        unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _ServerMethods:
    """The instrumented handler of every method of one server, made once each."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.tracing = _Tracing("im.grpc.server")
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler | None) -> Any:
        """The instrumented `handler` of `method`; streaming, health and
        reflection handlers (and synchronous ones) come back as they are."""
        if (
            handler is None
            or handler.unary_unary is None
            or method.startswith(_SKIP)
            or not inspect.iscoroutinefunction(handler.unary_unary)
        ):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _instrument_unary(method, handler, self.metrics, self.tracing)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _InstrumentedGenericHandler(grpc.GenericRpcHandler):
    """A registered generic handler whose unary handlers come back instrumented
    (looked up per call by grpc, but wrapped once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler, methods: _ServerMethods) -> None:
        self._inner = inner
        self._methods = methods

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        return self._methods.wrap(handler_call_details.method, handler)


class InstrumentedServer(grpc.aio.Server):
    """A grpc.aio server whose servicers' unary-unary handlers get a span and RPC
    metrics, wrapped once at registration. Everything else is the wrapped
    server's own (`raw`)."""

    def __init__(self, server: grpc.aio.Server, metrics: Metrics) -> None:
        self.raw = server
        self._methods = _ServerMethods(metrics)

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]
    ) -> None:
        self.raw.add_generic_rpc_handlers(
            tuple(_InstrumentedGenericHandler(h, self._methods) for h in generic_rpc_handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.raw.add_registered_method_handlers(
            service_name,
            {
                name: self._methods.wrap(f"/{service_name}/{name}", handler)
                for name, handler in method_handlers.items()
            },
        )

    def add_insecure_port(self, address: str) -> int:
        return self.raw.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self.raw.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self.raw.start()

    async def stop(self, grace: float | None) -> None:
        await self.raw.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.raw.wait_for_termination(timeout)

    def __getattr__(self, name: str) -> Any:
        if name == "raw":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.raw, name)


def instrument_server(server: grpc.aio.Server, metrics: Metrics) -> InstrumentedServer:
    """`server` with telemetry on every unary RPC registered through the result."""
    return InstrumentedServer(server, metrics)


class ServerTelemetryInterceptor(grpc.aio.ServerInterceptor):
    """The same telemetry as `instrument_server`, for a server built with
    interceptors. Handlers are still wrapped once per method, but grpc runs the
    interceptor on every call: prefer `instrument_server`."""

    def __init__(self, metrics: Metrics) -> None:
        self._methods = _ServerMethods(metrics)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return self._methods.wrap(details.method, await continuation(details))


# -- client side -----------------------------------------------------------------


def _with_context(metadata: Any, items: tuple[tuple[str, str], ...]) -> Any:
    if not items:
        return metadata
    if not metadata:
        return items
    return (*metadata, *items)


class _InstrumentedUnaryUnary(grpc.aio.UnaryUnaryMultiCallable):
    """One method's multicallable: the trace context goes into the metadata (when
    there is one), a CLIENT span is made only when tracing records, and the call's
    metrics (and span) are finished by the call's done callback. Returns grpc's own
    call object, so awaiting it, `code()`, `initial_metadata()`,
    `time_remaining()`, `cancel()` and the AioRpcError it raises are grpc's."""

    def __init__(
        self,
        inner: grpc.aio.UnaryUnaryMultiCallable,
        method: str,
        metrics: Metrics | None,
        tracing: _Tracing,
    ) -> None:
        self._inner = inner
        self._name = method.lstrip("/")
        self._tracing = tracing
        self._handled = _ByCode(metrics.rpc_client_handled, method) if metrics else None
        self._latency: Histogram | None = (
            metrics.rpc_client_latency.labels(method) if metrics else None
        )

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        tracing = self._tracing
        textmap = tracing.refresh()
        span: Span | None = None
        carrier: dict[str, str] = {}
        if tracing.recording:
            span = tracing.tracer.start_span(self._name, kind=SpanKind.CLIENT)
            textmap.inject(carrier, context=trace.set_span_in_context(span))
            metadata = _with_context(metadata, tuple(carrier.items()))
        else:
            current = trace.get_current_span().get_span_context()
            if current.is_valid:
                if tracing.w3c and not current.trace_state and not baggage.get_all():
                    metadata = _with_context(metadata, ((_TRACEPARENT, traceparent_of(current)),))
                else:
                    textmap.inject(carrier)
                    metadata = _with_context(metadata, tuple(carrier.items()))
        start = time.perf_counter()
        try:
            call = self._inner(
                request, timeout=timeout, metadata=metadata, credentials=credentials,
                wait_for_ready=wait_for_ready, compression=compression,
            )  # fmt: skip
        except BaseException as exc:
            code = exc.code() if isinstance(exc, grpc.RpcError) else None
            self._finish(start, span, code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN")
            raise
        if span is not None or self._handled is not None:
            call.add_done_callback(partial(self._done, start, span))
        return call

    def _done(self, start: float, span: Span | None, call: Any) -> None:
        try:
            # The status is set before done callbacks run; grpc's own __await__
            # reads it the same way. code() would be a coroutine.
            code = _CODE_NAMES.get(call._cython_call._status.code(), "UNKNOWN")
        except AttributeError:  # pragma: no cover - a grpc without that attribute
            log.exception("cannot read the status of a finished call")
            code = "UNKNOWN"
        self._finish(start, span, code)

    def _finish(self, start: float, span: Span | None, code: str) -> None:
        if self._handled is not None and self._latency is not None:
            self._handled.inc(code)
            self._latency.observe(time.perf_counter() - start)
        if span is not None:
            if code != "OK":
                span.set_status(Status(StatusCode.ERROR, code))
            span.end()


class InstrumentedChannel(grpc.aio.Channel):
    """A grpc.aio channel whose unary-unary calls carry the trace context and
    record client metrics (see `_InstrumentedUnaryUnary`). Each method's
    multicallable is made once, however many stubs are built on the channel.
    Streaming calls are the wrapped channel's own."""

    def __init__(self, channel: grpc.aio.Channel, metrics: Metrics | None) -> None:
        self.raw = channel
        self._metrics = metrics
        self._tracing = _Tracing("im.grpc.client")
        self._methods: dict[tuple[Any, ...], _InstrumentedUnaryUnary] = {}

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        key = (method, request_serializer, response_deserializer, _registered_method)
        multicallable = self._methods.get(key)
        if multicallable is None:
            inner = self.raw.unary_unary(
                method, request_serializer, response_deserializer, _registered_method
            )
            multicallable = _InstrumentedUnaryUnary(inner, method, self._metrics, self._tracing)
            self._methods[key] = multicallable
        return multicallable

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return self.raw.unary_stream(
            method, request_serializer, response_deserializer, _registered_method
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return self.raw.stream_unary(
            method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return self.raw.stream_stream(
            method, request_serializer, response_deserializer, _registered_method
        )

    async def __aenter__(self) -> InstrumentedChannel:
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.raw.__aexit__(exc_type, exc_val, exc_tb)

    async def close(self, grace: float | None = None) -> None:
        await self.raw.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.raw.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.raw.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.raw.channel_ready()

    def __getattr__(self, name: str) -> Any:
        if name == "raw":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.raw, name)


def internal_channel(
    address: str,
    metrics: Metrics | None = None,
    options: list[tuple[str, Any]] | None = None,
    tls: ChannelTLS | None = None,
) -> InstrumentedChannel:
    """A grpc.aio channel to another of our services, with trace propagation and
    client metrics. TLS when `tls` is given (from the settings' `client_tls()`:
    the callee's certificate checked against its CA, a client certificate for
    mutual TLS), else plaintext on the cluster network, where NetworkPolicies
    restrict who can reach whom. Calls are spread round-robin over every address
    the name resolves to (a headless Service lists every pod)."""
    opts = [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        *(tls.options() if tls is not None else []),
        *(options or []),
    ]
    if tls is None:
        return InstrumentedChannel(grpc.aio.insecure_channel(address, options=opts), metrics)
    return InstrumentedChannel(
        grpc.aio.secure_channel(address, tls.credentials(), options=opts), metrics
    )


def insecure_channel(
    address: str,
    metrics: Metrics | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> InstrumentedChannel:
    """`internal_channel` in plaintext."""
    return internal_channel(address, metrics, options)
