"""seqsvc settings, from `IM_SEQSVC_*` environment variables."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from imcommon.settings import ServerSettings


class Settings(ServerSettings):
    """Everything seqsvc reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="IM_SEQSVC_", extra="ignore", frozen=True)
    #: URLs may carry credentials: --print-config masks them.
    secret_fields: ClassVar[frozenset[str]] = frozenset({"database_url"})

    database_url: str = Field(
        "",
        validate_default=True,
        description="PostgreSQL conninfo or postgresql:// URL holding the section ceilings "
        "(required).",
    )
    step: int = Field(
        10_000,
        ge=1,
        le=1_000_000_000,
        description="Values reserved per database write: a section's persisted max_seq moves "
        "ahead by at least this much. Larger: fewer writes, larger gaps after a restart.",
    )
    sections: int = Field(
        1024,
        ge=1,
        le=65_536,
        description="Number of sections; each is one row (max_seq) shared by the keys that "
        "hash to it. Changing it is safe: every new section starts above the old highest "
        "ceiling.",
    )
    prefetch_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Reserve the next step in the background once a section's headroom falls "
        "below prefetch_ratio * step (the double buffer).",
    )
    max_step_factor: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description="Adaptive step: a section that uses up its step in less than "
        "step_target_s doubles its step, up to max_step_factor * step (1: fixed step).",
    )
    step_target_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Aim for at most one reservation per section per this many seconds "
        "(see max_step_factor); a section slower than 10x this halves its step again.",
    )
    max_batch: int = Field(
        10_000, ge=1, le=1_000_000, description="Most keys accepted in one NextBatch call."
    )
    max_reserve: int = Field(
        1_000_000,
        ge=1,
        le=1_000_000_000,
        description="Largest count accepted by Reserve.",
    )
    max_keys: int = Field(
        1_000_000,
        ge=1_000,
        le=1_000_000_000,
        description="Most keys whose cur_seq is kept in memory; past it the oldest are "
        "evicted (safe: an evicted key resumes above every value it was given).",
    )
    store_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Timeout of one database call (connect or statement)."
    )
    wait_timeout_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Longest a call waits for a step reservation when its section has no "
        "headroom left, before failing with UNAVAILABLE.",
    )
    retry_min_s: float = Field(
        0.05, gt=0, le=10, description="First backoff after a failed database write."
    )
    retry_max_s: float = Field(
        2.0, gt=0, le=60, description="Longest backoff between database retries."
    )
    lease_s: float = Field(
        10.0,
        ge=1,
        le=600,
        description="Lease on each section (and on the instance's registration). The owner "
        "renews them every lease_s/4 and stops serving a section 0.8 * lease_s after the "
        "start of its last renewal; another instance takes a section only after its lease "
        "expired by the database clock, or was released.",
    )
    instance_id: str = Field(
        "",
        max_length=200,
        description="Identity of this instance in the registry and the leases, unique among "
        "live instances (default: hostname:port). A restart with the same id takes over at "
        "once only if it listens where the old holder did (which proves it gone); otherwise "
        "it waits for the old registration to expire, and exits if the holder renews it.",
    )
    standby_poll_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often an instance that cannot register yet (its id held by a "
        "process not proved gone, an older seqsvc holding every section) tries again.",
    )

    routing_poll_s: float = Field(
        0.1,
        gt=0,
        le=10,
        description="How often an instance reads the routing version, the live instances "
        "and the free sections (one small query), to claim or release sections. A graceful "
        "move takes about this long plus one transaction.",
    )
    serve_log: str = Field(
        "",
        json_schema_extra={"deploy": "optional"},
        description="Path of a file to which this instance appends, as JSON lines, every "
        "window in which it serves a section (instance, section, epoch, from, until; wall "
        "clock): the evidence that two instances never serve one section at once. Empty: off.",
    )
    test_unsafe_serve_past_lease: bool = Field(
        False,
        description="TEST ONLY, breaks I6: serve a section past its lease, until the "
        "instance itself notices that another took it (shows that the fault tests catch it).",
    )

    teams_file: str = Field(
        "",
        description="YAML or JSON file of the teams that may call (credentials, key "
        "prefixes, quotas; see seqsvc/teams.py). Empty: no namespaces, every caller may use "
        "every key (the IM backend alone). Reloaded on SIGHUP and when it changes.",
    )
    teams_poll_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="How often the teams file is checked for changes (0: only on SIGHUP).",
    )

    @field_validator("database_url")
    @classmethod
    def _required(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("required: a libpq conninfo or postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("IM_SEQSVC_RETRY_MAX_S must be >= IM_SEQSVC_RETRY_MIN_S")
        return self
