"""pusher settings, from `IM_PUSHER_*` environment variables."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from imcommon.config import ConfigError, env_name
from imcommon.settings import ServerSettings


def _float_list(value: Any) -> Any:
    """Accepts "1,2,4", "[1, 2, 4]" or a list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [float(part) for part in text.split(",") if part.strip()]
    return value


class Settings(ServerSettings):
    """Everything pusher reads from its environment.

    The `test_fault_*` fields are TEST-ONLY switches that break the pusher at a
    chosen point on purpose, so that the tests and the chaos harness can show the
    rest of the system copes. They default to off and must stay off in any real
    deployment; pusher logs a warning at start when one is on. All of them are read
    in one place, `pusher.faults.Faults`.
    """

    model_config = SettingsConfigDict(env_prefix="IM_PUSHER_", extra="ignore", frozen=True)
    #: URLs may carry credentials: --print-config masks them.
    secret_fields: ClassVar[frozenset[str]] = frozenset({"redis_url"})

    logic_address: str = Field(
        "", max_length=300, description="host:port of logic (required to start)."
    )
    nats_url: str = Field(
        "", max_length=1000, description="NATS server URL(s), comma-separated (required)."
    )
    nats_stream: str = Field(
        "IM_MESSAGES", min_length=1, max_length=200, description="JetStream stream name."
    )
    nats_subject_prefix: str = Field(
        "im.msg", min_length=1, max_length=200, description="Subject prefix of the triggers."
    )
    nats_durable: str = Field(
        "pusher",
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Durable consumer name, shared by every pusher process.",
    )
    nats_replicas: int = Field(
        1, ge=1, le=5, description="Stream replicas (must match logic's stream settings)."
    )
    redis_url: str = Field(
        "", max_length=500, description="redis:// URL of the presence Redis (required)."
    )
    redis_prefix: str = Field(
        "im:", max_length=100, description="Prefix of the gateway's route keys in Redis."
    )
    redis_timeout_s: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Timeout of one Redis attempt (connect or command); connection errors "
        "and timeouts are retried for up to 1 s more (imcommon.redisconn).",
    )
    ack_wait_s: float = Field(
        10.0,
        ge=1,
        le=3600,
        description="JetStream ack wait: an unacked trigger (e.g. its pusher died) is "
        "redelivered after this long. Long fan-outs send in-progress heartbeats.",
    )
    redelivery_backoff_s: Annotated[list[float], NoDecode] = Field(
        [1.0, 2.0, 5.0, 10.0, 30.0],
        min_length=1,
        description="Nak delays after failed fan-outs, by delivery count (the last repeats); "
        "redelivery is unlimited.",
    )
    fetch_batch: int = Field(64, ge=1, le=10_000, description="Triggers requested per fetch.")
    fetch_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Longest a fetch waits for triggers."
    )
    max_pending: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Triggers held (fetched, not yet acked) by this process at most.",
    )
    max_concurrency: int = Field(
        32,
        ge=1,
        le=10_000,
        description="Fan-out calls (Fanout or FanoutBatch, each with its pushes) in flight at "
        "the same time.",
    )
    max_ack_pending: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Consumer-wide unacked triggers (across all pushers) before JetStream "
        "stops delivering.",
    )
    fanout_max_messages: int = Field(
        256, ge=0, le=100_000, description="max_messages per Fanout call (0 = logic's default)."
    )
    fanout_batch_conversations: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Conversations fanned out by one FanoutBatch call (one logic transaction "
        "and one Deliver per gateway for all of them); 1 = one Fanout call per conversation "
        "as before. Keep it at most logic's IM_LOGIC_FANOUT_BATCH_MAX_CONVERSATIONS.",
    )
    fanout_linger_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long a conversation with new triggers waits for others to share "
        "its FanoutBatch call before the call goes out anyway (0 = at once). A full batch "
        "goes at once.",
    )
    fanout_linger_when_idle: bool = Field(
        False,
        description="Linger even when no fan-out call is in flight. Off (the default since "
        "issue 19): with nothing in flight the first ready conversation goes at once, and "
        "conversations become ready meanwhile wait the linger to share the next call, so "
        "batches still form under load while a quiet conversation pays no linger. On: every "
        "partial batch waits fanout_linger_ms (before issue 19; kept for `make bench-ab`).",
    )
    logic_timeout_s: float = Field(15.0, gt=0, le=300, description="Deadline of one Fanout.")
    deliver_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Deadline of one Deliver call to a gateway."
    )
    deliver_batch_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=32 * 1024 * 1024,
        description="Largest Deliver request (deliveries are split into several).",
    )
    wheel_tick_ms: int = Field(
        100, ge=1, le=60_000, description="Timing wheel tick (timer resolution)."
    )
    wheel_slots: int = Field(512, ge=1, le=1_000_000, description="Timing wheel buckets.")
    retransmit_schedule_ms: Annotated[list[float], NoDecode] = Field(
        [1000.0, 2000.0, 4000.0, 8000.0],
        min_length=1,
        description="Wait before each retransmit of an unacked push, by attempt (the last "
        "repeats), e.g. '1000,2000,4000'.",
    )
    max_attempts: int = Field(
        5,
        ge=1,
        le=1000,
        description="Deliveries of one push (the first included) before giving up; the "
        "device then heals by sync.",
    )
    max_timers: int = Field(
        1_000_000, ge=1, le=100_000_000, description="Retransmit timers held at most."
    )
    consumer_check_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="While idle, how often the consumer is checked to still exist (it is "
        "recreated if the JetStream store was wiped).",
    )
    max_acks_per_call: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Items accepted in one AckDeliveries call (gateways batch delivery ACKs "
        "per pusher); a bigger call fails with INVALID_ARGUMENT. Keep it at or above the "
        "gateways' IM_GATEWAY_ACK_BATCH_MAX.",
    )
    metrics_sample_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often the JetStream consumer lag gauges are sampled (one "
        "consumer info request); only while the metrics port is set.",
    )

    # -- TEST-ONLY fault switches (see the class docstring) ----------------------
    test_fault_crash_before_deliver: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="TEST ONLY: exit at once (status 86, like kill -9) between the N-th "
        "fan-out whose commit returned deliveries and its Deliver calls; 0 = off",
    )

    _lists = field_validator("redelivery_backoff_s", "retransmit_schedule_ms", mode="before")(
        _float_list
    )

    @field_validator("redelivery_backoff_s", "retransmit_schedule_ms")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value):
            raise ValueError("every delay must be positive")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_concurrency > self.max_pending:
            raise ValueError("IM_PUSHER_MAX_CONCURRENCY must not exceed IM_PUSHER_MAX_PENDING")
        return self

    def require_addresses(self) -> None:
        """Raises ConfigError naming every required setting that is empty. Called
        at start (not at load, so `--print-config` works with an empty env)."""
        missing = [
            env_name(type(self), name)
            for name in ("logic_address", "nats_url", "redis_url")
            if not getattr(self, name).strip()
        ]
        if missing:
            raise ConfigError(f"required setting(s) not set: {', '.join(missing)}")
