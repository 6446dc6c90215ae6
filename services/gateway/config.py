"""gateway settings, from `IM_GATEWAY_*` environment variables."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

# The dev secret is defined with the token format (re-exported here).
from imclient.tokens import DEV_TOKEN_SECRET as DEV_TOKEN_SECRET
from imcommon.config import ConfigError, env_name
from imcommon.settings import ServerSettings
from imcommon.tls import ServerTLS

#: Part of the liveness bound left for reading and pushing the missing entries.
LIVENESS_SYNC_MARGIN_S = 2.0


class Settings(ServerSettings):
    """Everything the gateway reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="IM_GATEWAY_", extra="ignore", frozen=True)
    secret_fields: ClassVar[frozenset[str]] = frozenset({"token_secret", "redis_url"})

    logic_address: str = Field(
        "", max_length=300, description="host:port of logic (required to start)."
    )
    redis_url: str = Field(
        "",
        max_length=500,
        description="redis:// URL of the presence Redis holding the routes (required to start).",
    )
    redis_prefix: str = Field(
        "im:", max_length=100, description="Prefix of every Redis key the gateway writes."
    )
    token_secret: str = Field(
        DEV_TOKEN_SECRET,
        min_length=16,
        description="HMAC secret that signs client tokens. The default is a DEV secret "
        "anyone can use; set a random one (>= 32 bytes) in every real deployment.",
    )
    internal_port: int = Field(
        0,
        ge=0,
        le=65535,
        json_schema_extra={"deploy": "optional"},
        description="Port serving GatewayInternal (Deliver, Kick) for pushers and other "
        "gateways, apart from the client port. 0 = serve it on the client port too: "
        "development only, since any client could then call it. Set it in deployments "
        "and let only pushers and gateways reach it.",
    )
    internal_advertise_address: str = Field(
        "",
        max_length=300,
        json_schema_extra={"deploy": "optional"},
        description="host:port pushers and gateways use to call GatewayInternal here; it is "
        "what the routes in Redis hold (default: the advertise address's host, else host, "
        "with internal_port; when internal_port is 0, the advertise address).",
    )
    allow_plaintext: bool = Field(
        False,
        description="The client port may serve plaintext (no TLS_CERT_FILE) without the "
        "warning at start: for development, or behind a load balancer that terminates TLS "
        "and speaks HTTP/2 (h2c) to the gateway. Clients then need TLS from that balancer.",
    )
    internal_tls_cert_file: str = Field(
        "",
        max_length=1000,
        json_schema_extra={"deploy": "optional"},
        description="PEM certificate chain the internal port (INTERNAL_PORT, GatewayInternal) "
        "serves with TLS; empty = plaintext. Reloaded when it changes, like TLS_CERT_FILE. "
        "Pushers and gateways check it against their TLS_CA_FILE (and TLS_SERVER_NAME).",
    )
    internal_tls_key_file: str = Field(
        "",
        max_length=1000,
        json_schema_extra={"deploy": "optional"},
        description="PEM private key of INTERNAL_TLS_CERT_FILE.",
    )
    internal_tls_client_ca_file: str = Field(
        "",
        max_length=1000,
        json_schema_extra={"deploy": "optional"},
        description="PEM CA certificates: when set, the internal port accepts only callers "
        "presenting a certificate signed by one of them (mutual TLS with pushers and "
        "gateways). Needs INTERNAL_TLS_CERT_FILE.",
    )
    route_ttl_s: float = Field(
        30.0,
        ge=2,
        le=3600,
        description="Lifetime of a device's route in Redis; refreshed while the stream is open, "
        "so a crashed gateway's routes vanish after at most this long.",
    )
    route_refresh_s: float = Field(
        0.0,
        ge=0,
        le=1200,
        description="How often the routes of open streams are refreshed (0 = route_ttl_s / 3).",
    )
    route_check_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="While streams are open, how often the gateway checks that Redis still "
        "holds its routes (one EVALSHA of a sentinel key per gateway); a flush or restart "
        "found this way re-registers every route at once, not at the next refresh.",
    )
    redis_timeout_s: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Timeout of one Redis attempt (connect or command); connection errors "
        "and timeouts are retried for up to 1 s more (imcommon.redisconn).",
    )
    redis_max_connections: int = Field(
        32,
        ge=1,
        le=10_000,
        description="Most connections the gateway opens to Redis (one pool for routes, "
        "presence and typing). A call that finds them all busy waits for one (a burst of "
        "connects or disconnects queues instead of failing); they stay open once made.",
    )
    max_body_bytes: int = Field(
        64 * 1024,
        ge=1,
        le=16 * 1024 * 1024,
        description="Largest message body accepted in a Send; bigger ones get SendError "
        "INVALID_ARGUMENT and the stream stays usable.",
    )
    send_window: int = Field(
        64, ge=1, le=10_000, description="Sends a connection may have in flight (unanswered)."
    )
    send_rate_per_s: float = Field(
        200.0, gt=0, le=1_000_000, description="Sustained sends per second per connection."
    )
    send_burst: int = Field(
        200, ge=1, le=1_000_000, description="Token-bucket burst of sends per connection."
    )
    ack_memory: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Recent SendAcks kept per connection to answer retransmits (at least "
        "send_window are always kept).",
    )
    outbound_queue: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Frames queued per connection towards the client; a push finding it full "
        "is answered NOT_CONNECTED (the pusher retransmits, the client syncs).",
    )
    logic_timeout_s: float = Field(5.0, gt=0, le=120, description="Deadline of one call to logic.")
    logic_retry_s: float = Field(
        3.0,
        ge=0,
        le=120,
        description="How long a Send keeps retrying logic while it is UNAVAILABLE before "
        "answering SendError UNAVAILABLE (retryable).",
    )
    internal_timeout_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="Deadline of calls to pushers (AckDelivery) and other gateways (Kick).",
    )
    goaway_reconnect_ms: int = Field(
        500,
        ge=0,
        le=600_000,
        description="reconnect_after_ms in the GoAway sent to every client on SIGTERM.",
    )
    close_grace_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="After a Kick or GoAway, how long a client gets to read the final frame "
        "before its stream is cancelled.",
    )
    max_pushers_per_connection: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Pushers remembered per connection as targets of its DeliverAcks (LRU).",
    )
    ack_batch_ms: int = Field(
        10,
        ge=0,
        le=10_000,
        description="Delivery ACKs are collected per pusher for up to this long and sent as "
        "one AckDeliveries call, so an ACK reaches the pusher up to this much later (keep it "
        "far under the pusher's first retransmit, 1 s by default). 0 = one AckDelivery per "
        "ACK, sent at once (the behaviour before batching).",
    )
    ack_batch_max: int = Field(
        500,
        ge=1,
        le=100_000,
        description="A pusher's ACK batch is sent at once when this many devices are waiting. "
        "Must not exceed the pushers' IM_PUSHER_MAX_ACKS_PER_CALL.",
    )
    ack_queue_max: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="Devices whose ACK may wait per pusher (behind a slow or failing call); "
        "beyond it the oldest waiting ACK is dropped (counted; it costs a retransmit).",
    )
    send_batch_max: int = Field(
        64,
        ge=1,
        le=1000,
        description="Most sends of all connections sent to logic in one SendMessages call "
        "(concurrent sends leave together; a lone send is not delayed). 1 = one SendMessage "
        "call per send (the behaviour before batching). Keep it at or below logic's "
        "IM_LOGIC_SEND_MESSAGES_MAX_ITEMS.",
    )
    send_batch_linger_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long sends wait behind a call to logic still in flight before they "
        "leave in a call of their own (calls then overlap). 0 = until that call returns "
        "(at most IM_GATEWAY_LOGIC_TIMEOUT_S). With no call in flight sends leave at once.",
    )
    send_max_inflight: int = Field(
        1,
        ge=1,
        le=64,
        description="Calls to logic (SendMessages or SendMessage) a gateway starts without "
        "waiting: sends queued while fewer are in flight leave at once, in a call of their "
        "own. 1 = sends wait behind the call in flight (or IM_GATEWAY_SEND_BATCH_LINGER_MS). "
        "Logic batches what arrives meanwhile into its next transaction anyway.",
    )
    # -- WebSocket (gateway/websocket.py) -----------------------------------------
    ws_port: int = Field(
        0,
        ge=0,
        le=65535,
        json_schema_extra={"deploy": "optional"},
        description="Port of the WebSocket listener (path /v1/connect): the device protocol "
        "for browsers. 0 = no WebSocket listener. TLS (wss) with TLS_CERT_FILE/KEY_FILE like "
        "the gRPC port.",
    )
    ws_origins: str = Field(
        "",
        max_length=4000,
        json_schema_extra={"deploy": "optional"},
        description="Comma-separated Origin values of the web pages allowed to open a socket "
        "(e.g. https://chat.example.com); clients that send no Origin (not browsers) are always "
        "allowed. '*' = any origin: development only.",
    )
    ws_max_message_bytes: int = Field(
        256 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest WebSocket message accepted (a larger one closes the socket with "
        "1009). Must exceed MAX_BODY_BYTES plus the frame's envelope.",
    )
    ws_hello_timeout_s: float = Field(
        10.0, gt=0, le=300, description="How long a new socket may take to send its Hello."
    )
    ws_ping_interval_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="A socket silent this long gets a WebSocket ping (one sweep per gateway).",
    )
    ws_ping_timeout_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description='A socket silent this long after its ping is closed with 1011 "ping '
        'timeout" (a dead peer); one whose unsent frames do not drain for this long is closed '
        'with 1011 "not reading" (a peer that stopped reading, even if it still sends).',
    )
    ws_max_unary_in_flight: int = Field(
        16, ge=1, le=1024, description="Unary calls one socket may have in flight at once."
    )
    liveness_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="The delivery bound of a connected device (I9, docs/protocol.md "
        "'Liveness'): every timeline entry reaches an open stream within this long after it "
        "is in the timeline and the gateway can read the store, whatever failed on the push "
        "path. Sets the heads check interval. 0 = off: no heads in Welcome/Pong, no Head "
        "frames, no catch-up pushes (the behaviour before, for before/after benchmarks).",
    )
    heads_interval_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="How often each open stream's timeline head is checked (one batched "
        "Logic.GetHeads per tick for every stream due; each stream gets a random phase). "
        "0 = 0.4 x IM_GATEWAY_LIVENESS_S.",
    )
    catchup_grace_s: float = Field(
        1.0,
        gt=0,
        le=600,
        description="A head above what a stream acknowledged is checked again after this "
        "long; if the stream is still below it, the gateway pushes the missing entries "
        "itself (read from logic) instead of waiting for the pusher.",
    )
    catchup_max_entries: int = Field(
        500,
        ge=1,
        le=100_000,
        description="Most entries one catch-up pushes to one stream; the rest follow on the "
        "stream's next check.",
    )
    heads_batch_max: int = Field(
        500,
        ge=1,
        le=100_000,
        description="Most users per Logic.GetHeads call. Keep it at or below logic's "
        "IM_LOGIC_HEADS_MAX_USERS.",
    )
    heads_timeout_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How long a new stream waits for its timeline head before the Welcome "
        "goes out without it (head_seq 0; the first check then sets the stream's cursor).",
    )

    typing_min_interval_ms: int = Field(
        1000,
        ge=0,
        le=60_000,
        description="Least time between two forwarded Typing notices of one connection in one "
        "conversation with the same typing state (a change of state passes at once); a repeat "
        "sooner gets FrameError RATE_LIMITED.",
    )
    typing_rate_per_s: float = Field(
        5.0,
        gt=0,
        le=10_000,
        description="Sustained Typing frames per second per connection (token bucket, all "
        "conversations together); beyond it FrameError RATE_LIMITED, the stream stays open.",
    )
    typing_burst: int = Field(
        10, ge=1, le=10_000, description="Token-bucket burst of Typing frames per connection."
    )
    typing_expires_ms: int = Field(
        6000,
        ge=500,
        le=600_000,
        description="TypingNotice.expires_in_ms: receivers drop a typing state this long "
        "after its last notice.",
    )
    typing_max_members: int = Field(
        500,
        ge=2,
        le=1_000_000,
        description="Typing is relayed in conversations of at most this many members; in "
        "bigger ones a Typing frame gets FrameError INVALID_ARGUMENT.",
    )
    typing_members_cache_s: float = Field(
        3.0,
        ge=0,
        le=600,
        description="How long a conversation's member list (Logic.GetMembers) is reused for "
        "typing fan-out. A member added meanwhile is asked for again; one removed may see "
        "typing for up to this long. 0 = ask logic for every relayed Typing frame.",
    )
    typing_members_cache_max: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="Most conversations whose member list is cached (oldest dropped first).",
    )
    signal_timeout_s: float = Field(
        0.5,
        gt=0,
        le=30,
        description="Deadline of a GatewayInternal.Signal call to another gateway (typing, "
        "best effort, never retried).",
    )
    presence_poll_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often the presence of subscribed users is read from Redis (one "
        "pipelined round for all of them). A change is pushed at most this long after Redis "
        "shows it: a user whose gateway died shows offline within route_ttl_s + this.",
    )
    presence_max_subscriptions: int = Field(
        500,
        ge=1,
        le=100_000,
        description="Most users one connection may subscribe to (SubscribePresence); beyond "
        "it the frame gets FrameError INVALID_ARGUMENT.",
    )
    presence_subscribe_rate_per_s: float = Field(
        2.0,
        gt=0,
        le=10_000,
        description="Sustained SubscribePresence frames per second per connection.",
    )
    presence_subscribe_burst: int = Field(
        10, ge=1, le=10_000, description="Token-bucket burst of SubscribePresence frames."
    )
    last_seen_ttl_s: float = Field(
        30 * 86400.0,
        ge=60,
        le=10 * 365 * 86400.0,
        description="How long Redis keeps a user's last-seen time (the <prefix>lastseen:<user> "
        "key) after their last connection; then it is 0 (unknown).",
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.route_refresh_s and self.route_refresh_s >= self.route_ttl_s:
            raise ValueError("IM_GATEWAY_ROUTE_REFRESH_S must be below IM_GATEWAY_ROUTE_TTL_S")
        if self.ack_queue_max < self.ack_batch_max:
            raise ValueError("IM_GATEWAY_ACK_QUEUE_MAX must be at least IM_GATEWAY_ACK_BATCH_MAX")
        if self.liveness_s and self.head_check_interval_s + self.catchup_grace_s > (
            self.liveness_s - LIVENESS_SYNC_MARGIN_S
        ):
            raise ValueError(
                "IM_GATEWAY_HEADS_INTERVAL_S + IM_GATEWAY_CATCHUP_GRACE_S must leave "
                f"{LIVENESS_SYNC_MARGIN_S:g} s of IM_GATEWAY_LIVENESS_S for the catch-up itself"
            )
        return self

    @model_validator(mode="after")
    def _check_internal_tls(self) -> Settings:
        if bool(self.internal_tls_cert_file) != bool(self.internal_tls_key_file):
            raise ValueError(
                "IM_GATEWAY_INTERNAL_TLS_CERT_FILE and IM_GATEWAY_INTERNAL_TLS_KEY_FILE go together"
            )
        if self.internal_tls_client_ca_file and not self.internal_tls_cert_file:
            raise ValueError(
                "IM_GATEWAY_INTERNAL_TLS_CLIENT_CA_FILE needs IM_GATEWAY_INTERNAL_TLS_CERT_FILE"
            )
        if self.internal_tls_cert_file and not self.internal_port:
            raise ValueError(
                "IM_GATEWAY_INTERNAL_TLS_CERT_FILE needs IM_GATEWAY_INTERNAL_PORT (with 0, "
                "GatewayInternal is served on the client port, with TLS_CERT_FILE)"
            )
        return self

    def internal_server_tls(self) -> ServerTLS | None:
        """What the internal port serves: TLS from these files, or None (plaintext)."""
        if not self.internal_tls_cert_file:
            return None
        return ServerTLS(
            self.internal_tls_cert_file,
            self.internal_tls_key_file,
            self.internal_tls_client_ca_file,
        )

    @property
    def head_check_interval_s(self) -> float:
        """Seconds between two head checks of one stream (0 when liveness is off)."""
        if not self.liveness_s:
            return 0.0
        return self.heads_interval_s or self.liveness_s * 0.4

    @property
    def refresh_interval_s(self) -> float:
        return self.route_refresh_s or self.route_ttl_s / 3

    @property
    def uses_dev_secret(self) -> bool:
        return self.token_secret == DEV_TOKEN_SECRET

    def require_addresses(self) -> None:
        """Raises ConfigError naming every required setting that is empty. Called
        at start (not at load, so `--print-config` works with an empty env)."""
        missing = [
            env_name(type(self), name)
            for name in ("logic_address", "redis_url")
            if not getattr(self, name).strip()
        ]
        if missing:
            raise ConfigError(f"required setting(s) not set: {', '.join(missing)}")
