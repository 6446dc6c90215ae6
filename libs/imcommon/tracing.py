"""OpenTelemetry tracing set up from the standard OTEL_* variables only.

No exporter unless OTEL_TRACES_EXPORTER=otlp or an OTLP endpoint variable is set;
then spans go out through the OTLP/gRPC exporter in batches (OTEL_BSP_* tune the
batching, OTEL_TRACES_SAMPLER the sampling, OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES the resource).

Without an exporter (and without OTEL_TRACES_SAMPLER) spans are not recorded: a
span nobody exports would only cost CPU. Their ids are still generated and
propagated, so log lines keep carrying trace ids and a downstream service that
does export still joins the caller's trace.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF


def _otlp_requested() -> bool:
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporters:
        return "otlp" in exporters.split(",")
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup_tracing(service: str) -> TracerProvider:
    """Installs a global TracerProvider for `service` (OTEL_SERVICE_NAME wins) and
    returns it; call `shutdown()` on it at exit to flush."""
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service)})
    export = _otlp_requested()
    # None: the SDK reads OTEL_TRACES_SAMPLER (default parentbased_always_on).
    sampler = None if export or os.environ.get("OTEL_TRACES_SAMPLER") else ALWAYS_OFF
    provider = TracerProvider(resource=resource, sampler=sampler)
    if export:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider
