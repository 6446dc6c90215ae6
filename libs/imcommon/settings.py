"""Settings every service has, whatever it does."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from imcommon.config import BaseServiceSettings
from imcommon.tls import ClientTLS, ServerTLS


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
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port serving only grpc.health.v1, in plaintext, for probes that cannot "
        "speak TLS (Kubernetes' native gRPC probes) when the gRPC port serves TLS; it "
        "reports the same status as the gRPC port. 0 = none.",
    )
    tls_cert_file: str = Field(
        "",
        max_length=1000,
        json_schema_extra={"deploy": "optional"},
        description="PEM certificate chain the gRPC port serves with TLS (for the gateway: "
        "the client port). Empty = plaintext. Re-read when the file changes (a renewed "
        "Kubernetes Secret): new connections get the new certificate, open ones go on.",
    )
    tls_key_file: str = Field(
        "",
        max_length=1000,
        json_schema_extra={"deploy": "optional"},
        description="PEM private key of TLS_CERT_FILE (reloaded with it).",
    )
    tls_client_ca_file: str = Field(
        "",
        max_length=1000,
        json_schema_extra={"deploy": "optional"},
        description="PEM CA certificates: when set, the TLS gRPC port accepts only callers "
        "presenting a certificate signed by one of them (mutual TLS). Needs TLS_CERT_FILE.",
    )
    tls_ca_file: str = Field(
        "",
        max_length=1000,
        json_schema_extra={"deploy": "optional"},
        description="PEM CA certificates that sign the other services' certificates. When "
        "set, every call this process makes to another of our services (logic, seqsvc, "
        "pushers, gateways) uses TLS and checks the callee's certificate against them; "
        "empty = those calls are plaintext.",
    )
    tls_client_cert_file: str = Field(
        "",
        max_length=1000,
        json_schema_extra={"deploy": "optional"},
        description="PEM certificate this process presents on calls to other services "
        "(mutual TLS; callees with TLS_CLIENT_CA_FILE require one). Needs TLS_CA_FILE. Read "
        "when a channel opens: a renewed one is used by channels opened after the change.",
    )
    tls_client_key_file: str = Field(
        "",
        max_length=1000,
        json_schema_extra={"deploy": "optional"},
        description="PEM private key of TLS_CLIENT_CERT_FILE.",
    )
    tls_server_name: str = Field(
        "",
        max_length=253,
        json_schema_extra={"deploy": "optional"},
        description="Name checked in the certificates of the services this process calls, "
        "instead of the host dialled. Needed when callees are dialled by pod IP (the "
        "gateway and pusher addresses in Redis): give every internal certificate this name. "
        "Empty = check the dialled host name.",
    )

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        prefix = str(self.model_config.get("env_prefix", "")).upper()
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError(f"{prefix}TLS_CERT_FILE and {prefix}TLS_KEY_FILE go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError(f"{prefix}TLS_CLIENT_CA_FILE needs {prefix}TLS_CERT_FILE")
        if bool(self.tls_client_cert_file) != bool(self.tls_client_key_file):
            raise ValueError(
                f"{prefix}TLS_CLIENT_CERT_FILE and {prefix}TLS_CLIENT_KEY_FILE go together"
            )
        if (self.tls_client_cert_file or self.tls_server_name) and not self.tls_ca_file:
            raise ValueError(
                f"{prefix}TLS_CLIENT_CERT_FILE and {prefix}TLS_SERVER_NAME need {prefix}TLS_CA_FILE"
            )
        return self

    def server_tls(self) -> ServerTLS | None:
        """What the gRPC port serves: TLS from these files, or None (plaintext)."""
        if not self.tls_cert_file:
            return None
        return ServerTLS(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)

    def client_tls(self) -> ClientTLS | None:
        """How channels to our other services are secured, or None (plaintext)."""
        if not self.tls_ca_file:
            return None
        return ClientTLS(
            self.tls_ca_file,
            self.tls_client_cert_file,
            self.tls_client_key_file,
            self.tls_server_name,
        )
