"""OpenTelemetry tracing set up from the standard OTEL_* variables only.

No exporter unless OTEL_TRACES_EXPORTER=otlp or an OTLP endpoint variable is set;
then spans go out through the OTLP/gRPC exporter in batches (OTEL_BSP_* tune the
batching, OTEL_TRACES_SAMPLER the sampling, OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES the resource).

Without an exporter (and without OTEL_TRACES_SAMPLER) spans are not recorded: a
span nobody exports would only cost CPU. Their ids are still generated and
propagated, so log lines keep carrying trace ids and a downstream service that
does export still joins the caller's trace. That case uses `IdsOnlyTracerProvider`,
which makes the same span contexts the SDK made with an ALWAYS_OFF sampler (a new
span id under the parent's trace id, a new trace id at a root, the flags and trace
state the SDK would set) without the SDK's sampler, span-limit and self-metrics work.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
)

_ROOT_FLAGS = TraceFlags(TraceFlags.RANDOM_TRACE_ID)


def _otlp_requested() -> bool:
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporters:
        return "otlp" in exporters.split(",")
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup_tracing(service: str) -> TracerProvider | IdsOnlyTracerProvider:
    """Installs a global tracer provider for `service` (OTEL_SERVICE_NAME wins) and
    returns it; call `shutdown()` on it at exit to flush.

    With an exporter (or an explicit OTEL_TRACES_SAMPLER) it is the SDK's
    TracerProvider; otherwise an `IdsOnlyTracerProvider`."""
    export = _otlp_requested()
    if not export and not os.environ.get("OTEL_TRACES_SAMPLER"):
        ids_only = IdsOnlyTracerProvider()
        trace.set_tracer_provider(ids_only)
        return ids_only
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service)})
    # sampler=None: the SDK reads OTEL_TRACES_SAMPLER (default parentbased_always_on).
    provider = TracerProvider(resource=resource)
    if export:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def new_span_id() -> int:
    span_id = random.getrandbits(64)
    while span_id == INVALID_SPAN_ID:
        span_id = random.getrandbits(64)
    return span_id


def new_trace_id() -> int:
    trace_id = random.getrandbits(128)
    while trace_id == INVALID_TRACE_ID:
        trace_id = random.getrandbits(128)
    return trace_id


def ids_only_span(parent: SpanContext) -> NonRecordingSpan:
    """A span that records nothing but has ids of its own: a child of `parent`
    when that is valid, else the root of a new trace. Its context is what the SDK
    gives an unsampled span (flags: not sampled; the random-trace-id flag as the
    SDK sets it; the parent's trace state)."""
    if parent.is_valid:
        return NonRecordingSpan(
            SpanContext(
                parent.trace_id,
                new_span_id(),
                is_remote=False,
                trace_flags=TraceFlags(parent.trace_flags & TraceFlags.RANDOM_TRACE_ID),
                trace_state=parent.trace_state,
            )
        )
    return NonRecordingSpan(
        SpanContext(new_trace_id(), new_span_id(), is_remote=False, trace_flags=_ROOT_FLAGS)
    )


class _CurrentSpan:
    """`start_as_current_span` of `IdsOnlyTracer`: makes the span current for the
    block (no generator-based context managers: this runs on every span)."""

    __slots__ = ("_token", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self._token: object = None

    def __enter__(self) -> Span:
        self._token = context_api.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        context_api.detach(self._token)  # type: ignore[arg-type]


class IdsOnlyTracer(trace.Tracer):
    """Spans with real ids that record nothing (see `ids_only_span`)."""

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        return ids_only_span(trace.get_current_span(context).get_span_context())

    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> contextlib.AbstractContextManager[Span]:
        return _CurrentSpan(ids_only_span(trace.get_current_span(context).get_span_context()))


class IdsOnlyTracerProvider(trace.TracerProvider):
    """The tracer provider of a process that exports no spans: trace ids are made
    and propagated (logs and downstream services see them), nothing is recorded."""

    def __init__(self) -> None:
        self._tracer = IdsOnlyTracer()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> trace.Tracer:
        return self._tracer

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def is_recording_provider(provider: trace.TracerProvider) -> bool:
    """Whether spans from `provider` may be recorded (an SDK or other real
    provider), as opposed to ours without an exporter or OpenTelemetry's no-op."""
    return not isinstance(
        provider, IdsOnlyTracerProvider | trace.NoOpTracerProvider | trace.ProxyTracerProvider
    )
