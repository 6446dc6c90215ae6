"""Settings every service has, whatever it does."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from imcommon.config import BaseServiceSettings


class ServerSettings(BaseServiceSettings):
    """gRPC server, logging and shutdown settings shared by every service."""

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    advertise_address: str = Field(
        "",
        description="host:port other services use to reach this process "
        "(default: host:port as bound).",
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus /metrics HTTP port (0 = disabled)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Minimum log level."
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="After SIGTERM, seconds to stay up NOT_SERVING before stopping, "
        "so load balancers stop sending new work.",
    )
    shutdown_grace_s: float = Field(
        5.0, gt=0, le=300, description="Seconds in-flight RPCs get to finish after SIGTERM."
    )
    shutdown_deadline_s: float = Field(
        15.0,
        gt=0,
        le=600,
        description="Hard limit for the whole shutdown; past it the process exits with status 1.",
    )
    max_connection_age_s: float = Field(
        0.0,
        ge=0,
        le=86400,
        description="Close client connections after this many seconds (0 = never), so "
        "callers re-resolve and spread over new replicas. Leave 0 where clients hold "
        "long-lived streams.",
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest gRPC message accepted or sent.",
    )
    gc_gen0_threshold: int = Field(
        50_000,
        ge=0,
        le=10_000_000,
        description="Python GC generation-0 threshold set once the service is built, "
        "together with gc.freeze() of everything allocated during start-up, so "
        "collections run less often and never walk long-lived start-up objects "
        "(0 = leave Python's GC settings as they are).",
    )
