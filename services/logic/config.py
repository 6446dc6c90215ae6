"""logic settings, from `IM_LOGIC_*` environment variables."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from imcommon.config import ConfigError
from imcommon.settings import ServerSettings

#: Room kept in every paged response for what is not an entry (field tags,
#: has_more, the watermark), so that the entries' accounted sizes can fill the rest.
RESPONSE_HEADROOM_BYTES = 4096
#: Upper bound of one entry's protobuf size besides its body (ids of at most 64 to
#: 131 characters, sequence numbers, field tags).
ENTRY_OVERHEAD_BYTES = 1024


class Settings(ServerSettings):
    """Everything logic reads from its environment.

    The `test_fault_*` fields are TEST-ONLY switches that break a guarantee on
    purpose, so that the tests and the chaos harness can show the checks catch it.
    They default to off and must stay off in any real deployment; logic logs a
    warning at start when one is on. All of them are read in one place,
    `logic.faults.Faults`.
    """

    model_config = SettingsConfigDict(env_prefix="IM_LOGIC_", extra="ignore", frozen=True)
    secret_fields: ClassVar[frozenset[str]] = frozenset({"database_url", "seqsvc_token"})

    # -- where the dependencies are ---------------------------------------------
    database_url: str = Field(
        "",
        description="PostgreSQL conninfo or postgresql:// URL of the message store (required).",
    )
    seqsvc_address: str = Field("", description="host:port of seqsvc (required).")
    seqsvc_token: str = Field(
        "",
        description="Bearer token of logic's team at seqsvc (prefixes u: and c:), when seqsvc "
        "has team namespaces (IM_SEQSVC_TEAMS_FILE). Empty: calls carry no credential.",
    )
    nats_url: str = Field(
        "",
        description="NATS server URL(s), comma-separated (required). logic keeps serving "
        "while NATS is down: the outbox relay and the repair loop catch up afterwards.",
    )
    nats_stream: str = Field(
        "IM_MESSAGES",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="JetStream stream of MessageCommitted triggers (shared with pusher).",
    )
    nats_subject_prefix: str = Field(
        "im.msg",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="Subject prefix of the triggers (shared with pusher).",
    )
    nats_replicas: int = Field(
        1, ge=1, le=5, description="Stream replicas when logic creates the stream (3 in a cluster)."
    )

    # -- PostgreSQL ---------------------------------------------------------------
    db_pool_min: int = Field(2, ge=1, le=100, description="Connections kept open.")
    db_pool_max: int = Field(20, ge=1, le=500, description="Most connections opened.")
    db_pool_timeout_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Longest a call waits for a free connection before failing UNAVAILABLE.",
    )
    db_connect_timeout_s: int = Field(
        5, ge=1, le=60, description="Timeout of one PostgreSQL connection attempt."
    )
    db_startup_wait_s: float = Field(
        120.0,
        ge=0,
        le=3600,
        description="At start, how long logic retries reaching PostgreSQL (to apply its "
        "migrations) before exiting with status 1.",
    )
    db_statement_timeout_ms: int = Field(
        30_000,
        ge=100,
        le=600_000,
        description="statement_timeout of every logic connection (also bounds lock waits).",
    )

    # -- seqsvc client ----------------------------------------------------------
    seqsvc_deadline_s: float = Field(2.0, gt=0, le=60, description="Deadline of one seqsvc call.")
    seqsvc_max_retries: int = Field(
        3, ge=0, le=20, description="Retries of an UNAVAILABLE seqsvc call before giving up."
    )
    seqsvc_coalesce_window_ms: float = Field(
        0.0,
        ge=0,
        le=50,
        description="How long concurrent sends wait to share one NextBatch call "
        "(0: until the next event-loop turn).",
    )

    # -- limits -----------------------------------------------------------------
    max_body_bytes: int = Field(
        64 * 1024, ge=1, le=1024 * 1024, description="Largest message body accepted."
    )
    max_group_size: int = Field(
        2000, ge=2, le=100_000, description="Most members a group may have."
    )
    max_group_name_chars: int = Field(
        128, ge=1, le=1024, description="Longest group name accepted, in characters."
    )
    max_response_bytes: int = Field(
        2 * 1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024 * 1024,
        description="Sync, History and Fanout stop adding entries once a response would "
        "exceed this (has_more tells the caller to continue). Must stay below the callers' "
        "gRPC receive limit (4 MiB by default).",
    )
    # -- conversation state (state.py, conversations.py) -------------------------
    edit_window_s: float = Field(
        86_400.0,
        ge=0,
        le=365 * 86_400,
        description="How long after a message its sender may edit it (seconds).",
    )
    recall_window_s: float = Field(
        86_400.0,
        ge=0,
        le=365 * 86_400,
        description="How long after a message its sender (or a group's owner) may recall it "
        "(seconds).",
    )
    unread_count_cap: int = Field(
        9999,
        ge=1,
        le=1_000_000,
        description="ListConversations counts unread messages up to this many per "
        "conversation (Conversation.unread_capped says the cap was hit).",
    )
    conversations_default_page: int = Field(
        100, ge=1, le=500, description="ListConversations page size when the request says 0."
    )
    conversations_max_page: int = Field(
        500, ge=1, le=5000, description="Largest ListConversations page."
    )
    receipts_max_page: int = Field(
        1000, ge=1, le=10_000, description="Most reader ids in one GetReceipts page."
    )
    sync_default_limit: int = Field(
        100, ge=1, le=10_000, description="SyncMessages page size when the request says 0."
    )
    sync_max_limit: int = Field(
        500, ge=1, le=10_000, description="Largest SyncMessages page; bigger limits are capped."
    )
    heads_max_users: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Most users one GetHeads call may ask for (the gateways' liveness checks).",
    )
    history_default_limit: int = Field(
        50, ge=1, le=10_000, description="History page size when the request says 0."
    )
    history_max_limit: int = Field(
        200, ge=1, le=10_000, description="Largest History page; bigger limits are capped."
    )

    # -- fan-out ----------------------------------------------------------------
    fanout_default_messages: int = Field(
        100, ge=1, le=10_000, description="Messages per Fanout call when the request says 0."
    )
    fanout_max_messages: int = Field(
        1000, ge=1, le=100_000, description="Largest max_messages a Fanout call honours."
    )
    fanout_max_rows: int = Field(
        500,
        ge=1,
        le=10_000,
        description="Most timeline rows (recipient x message) one Fanout transaction "
        "writes. It also bounds the user advisory locks held at once by one transaction: "
        "keep (concurrent fan-outs x this) well below PostgreSQL's lock table, "
        "max_locks_per_transaction x max_connections. A bigger group takes several calls "
        "(has_more).",
    )
    fanout_batch_max_conversations: int = Field(
        256,
        ge=1,
        le=10_000,
        description="Most conversations one FanoutBatch call may name (more is "
        "INVALID_ARGUMENT). The whole call is one transaction bounded by "
        "IM_LOGIC_FANOUT_MAX_ROWS and IM_LOGIC_MAX_RESPONSE_BYTES like one Fanout.",
    )

    # -- outbox and repair ------------------------------------------------------
    publish_timeout_s: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Longest a send waits for JetStream to confirm its trigger after the "
        "commit; on timeout the send still succeeds and the outbox relay publishes later.",
    )
    ack_before_publish: bool = Field(
        True,
        description="Answer a send as soon as its transaction commits and publish its "
        "trigger after the answer (the outbox row already makes the trigger durable, I4). "
        "Off: the answer waits for JetStream to confirm the publish (or publish_timeout_s), "
        "as before issue 19; kept for `make bench-ab`.",
    )
    outbox_relay_interval_s: float = Field(
        1.0, gt=0, le=3600, description="How often the outbox relay looks for leftovers."
    )
    outbox_relay_min_age_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="The relay republishes outbox rows older than this only, so it does not "
        "race the send that is publishing its own row.",
    )
    outbox_relay_batch: int = Field(
        500, ge=1, le=100_000, description="Outbox rows the relay publishes per round."
    )
    outbox_delete_batch: int = Field(
        500, ge=1, le=100_000, description="Published outbox rows deleted per statement."
    )
    outbox_delete_delay_ms: float = Field(
        20.0,
        ge=0,
        le=10_000,
        description="How long published outbox rows wait to be deleted together.",
    )
    repair_interval_s: float = Field(
        1.0, gt=0, le=3600, description="How often the repair loop looks for stuck fan-outs."
    )
    repair_after_s: float = Field(
        5.0,
        gt=0,
        le=86_400,
        description="A conversation whose committed messages stay above its fan-out "
        "watermark this long is repaired (I8).",
    )
    repair_max_backoff_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Repairs of one conversation back off exponentially up to this.",
    )
    repair_direct_after: int = Field(
        3,
        ge=0,
        le=1000,
        description="After this many repair triggers did not get a conversation fanned out "
        "(pusher down or slow), the repair loop fans it out into the timelines itself "
        "(devices then heal by sync). 0: always fan out directly.",
    )
    repair_batch: int = Field(
        100, ge=1, le=10_000, description="Conversations the repair loop claims per round."
    )
    metrics_sample_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often the backlog gauges (outbox, pending fan-outs) are sampled "
        "with one cheap query; only while the metrics port is set.",
    )

    # -- data lifecycle (retention.py; docs/operations.md "Data lifecycle") ------
    retention_timeline_days: float = Field(
        0.0,
        ge=0,
        le=36_500,
        description="Timeline rows of messages older than this are deleted (0: kept "
        "forever, the default: deleting users' history is a product decision). A cursor "
        "below the deleted rows syncs on from what is left, and Sync says so "
        "(pruned_through_seq). A message this old is no longer fanned out into timelines.",
    )
    retention_messages_days: float = Field(
        0.0,
        ge=0,
        le=36_500,
        description="Messages older than this are deleted (0: kept forever, the default), "
        "except each conversation's newest and any not yet fanned out. Needs "
        "IM_LOGIC_RETENTION_TIMELINE_DAYS set and not above it: a message goes only once "
        "no timeline row can name it.",
    )
    retention_dedup_days: float = Field(
        30.0,
        ge=0,
        le=36_500,
        description="The dedup window: dedup keys (sender, client_msg_id) whose id is a "
        "UUIDv7 made longer ago than this are deleted, and a send whose UUIDv7 id is that "
        "old and not known is refused (FAILED_PRECONDITION), never stored as a possible "
        "second copy. Other ids carry no age: their keys are kept forever. 0: keep every "
        "key, refuse nothing. Must exceed the longest time a client keeps resending one "
        "message (docs/operations.md, 'The dedup window').",
    )
    retention_outbox_s: float = Field(
        600.0,
        ge=0,
        le=86_400 * 365,
        description="Outbox rows older than this whose conversation is already fanned out "
        "past them (their trigger can change nothing) are deleted. Published rows are "
        "deleted right after publishing anyway; rows not fanned out are never deleted "
        "(the relay publishes them). 0: never.",
    )
    retention_margin_s: float = Field(
        3600.0,
        ge=0,
        le=86_400,
        description="Safety margin added to the timeline and dedup retention by the pruner: "
        "covers clock differences between logic hosts and PostgreSQL and the longest "
        "transaction (a fan-out or a send that checked a message's or an id's age).",
    )
    retention_interval_s: float = Field(
        60.0, gt=0, le=86_400, description="How often an idle pruner looks for work."
    )
    retention_pass_interval_s: float = Field(
        3600.0,
        ge=0,
        le=86_400 * 30,
        description="A pass over every user (timeline), sender (dedup keys) or message "
        "starts at most this often: data is deleted at most this long after it expired.",
    )
    retention_batch_rows: int = Field(
        2000,
        ge=1,
        le=100_000,
        description="Most rows one pruning transaction deletes (small batches: short "
        "transactions, no long locks).",
    )
    retention_batch_users: int = Field(
        200,
        ge=1,
        le=100_000,
        description="Most users (or senders) one timeline (or dedup) pruning transaction visits.",
    )
    retention_batch_pause_ms: float = Field(
        20.0,
        ge=0,
        le=60_000,
        description="Shortest pause between two pruning transactions while there is work.",
    )
    retention_busy_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Most share of the time the pruner spends in its transactions while "
        "it has a backlog: after a transaction that took t seconds it pauses "
        "t * (1/share - 1) (at least the batch pause). 1: back to back. Bounds what a large "
        "backlog (retention switched on for old data) costs the sends (docs/lifecycle.md).",
    )

    # -- TEST-ONLY fault switches (see the class docstring) ----------------------
    test_fault_crash_after_commit: bool = Field(
        False,
        description="TEST ONLY: the process exits (os._exit) right after a send commits, "
        "before it publishes its trigger or answers.",
    )
    test_fault_skip_dedup: bool = Field(
        False,
        description="TEST ONLY, breaks I2: no dedup on (sender, client_msg_id); a "
        "retransmit stores a second message.",
    )
    test_fault_skip_outbox: bool = Field(
        False,
        description="TEST ONLY, breaks I4: sends write no outbox row and publish nothing; "
        "only the repair loop (unless skipped too) gets them fanned out.",
    )
    test_fault_skip_seq_check: bool = Field(
        False,
        description="TEST ONLY, breaks I1/I5: a seq or conv_seq from seqsvc that is not "
        "above the last committed one is stored anyway.",
    )
    test_fault_skip_locks: bool = Field(
        False,
        description="TEST ONLY, breaks I1/I5: no conversation or user advisory locks.",
    )
    test_fault_skip_repair: bool = Field(
        False, description="TEST ONLY, breaks I8: the repair loop does not run."
    )

    # -- group commit of SendMessage --------------------------------------------
    send_batch_max: int = Field(
        64,
        ge=1,
        le=1000,
        description="Most sends stored by one transaction (group commit): concurrent "
        "SendMessage calls queue and the committer takes up to this many at once as soon "
        "as it is free. 1: every send is its own transaction in its own task (no queue), "
        "the behaviour before group commit. A batch holds up to 2 x this many advisory "
        "locks (its conversations and senders) until it commits.",
    )
    send_linger_ms: float = Field(
        0.0,
        ge=0,
        le=50,
        description="How long the committer waits for more sends before taking a batch "
        "smaller than send_batch_max (0: take what is queued at once; while one batch "
        "commits the next one fills anyway).",
    )
    send_committers: int = Field(
        1,
        ge=1,
        le=64,
        description="Send batches committed at once by one logic process (each holds one "
        "database connection). Ignored when send_batch_max is 1.",
    )
    send_messages_max_items: int = Field(
        256,
        ge=1,
        le=10_000,
        description="Most items one SendMessages call may carry (the gateway's batched "
        "sends); a call with more fails as a whole with INVALID_ARGUMENT. Keep it at or "
        "above the gateways' IM_GATEWAY_SEND_BATCH_MAX.",
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.db_pool_max < self.db_pool_min:
            raise ValueError("IM_LOGIC_DB_POOL_MAX must be >= IM_LOGIC_DB_POOL_MIN")
        if self.sync_default_limit > self.sync_max_limit:
            raise ValueError("IM_LOGIC_SYNC_DEFAULT_LIMIT must be <= IM_LOGIC_SYNC_MAX_LIMIT")
        if self.history_default_limit > self.history_max_limit:
            raise ValueError("IM_LOGIC_HISTORY_DEFAULT_LIMIT must be <= IM_LOGIC_HISTORY_MAX_LIMIT")
        if self.fanout_default_messages > self.fanout_max_messages:
            raise ValueError(
                "IM_LOGIC_FANOUT_DEFAULT_MESSAGES must be <= IM_LOGIC_FANOUT_MAX_MESSAGES"
            )
        room = RESPONSE_HEADROOM_BYTES + ENTRY_OVERHEAD_BYTES
        if self.max_response_bytes < self.max_body_bytes + room:
            # Otherwise a single message could not fit in a response.
            raise ValueError(
                "IM_LOGIC_MAX_RESPONSE_BYTES must exceed IM_LOGIC_MAX_BODY_BYTES by at least "
                f"{room}"
            )
        if self.retention_messages_days and not (
            0 < self.retention_timeline_days <= self.retention_messages_days
        ):
            # Timeline rows name messages: a message may go only after every row
            # that could name it (see retention.py).
            raise ValueError(
                "IM_LOGIC_RETENTION_MESSAGES_DAYS needs IM_LOGIC_RETENTION_TIMELINE_DAYS set "
                "(> 0) and not above it"
            )
        if self.max_response_bytes > self.max_message_bytes:
            raise ValueError("IM_LOGIC_MAX_RESPONSE_BYTES must be <= IM_LOGIC_MAX_MESSAGE_BYTES")
        return self

    def require_dependencies(self) -> None:
        """Raises ConfigError naming every missing required address. Checked at start,
        not at load, so that `--print-config` works on an empty environment."""
        missing = [
            f"IM_LOGIC_{name.upper()}"
            for name in ("database_url", "seqsvc_address", "nats_url")
            if not getattr(self, name).strip()
        ]
        if missing:
            raise ConfigError(f"required setting(s) not set: {', '.join(missing)}")
