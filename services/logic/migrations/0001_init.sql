-- logic's message store. PostgreSQL is the source of truth (I8): JetStream only
-- carries triggers that say "this conversation has new committed messages".
--
-- No foreign keys on the hot tables (messages, timeline, send_dedup, outbox):
-- every row is written by one transaction that holds the referenced row already,
-- and an FK check would add a lookup and a row lock to each insert.

-- Everyone logic has seen as a sender or a group member (bookkeeping only: the
-- gateway authenticates users, logic never stores credentials).
CREATE TABLE users (
    user_id    text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Every (user, device) that has sent a message.
CREATE TABLE devices (
    user_id    text NOT NULL,
    device_id  text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, device_id)
);

-- Groups (made by CreateGroup) and the direct conversations that have messages
-- (inserted by their first send). kind: im.common.v1.ConversationKind.
CREATE TABLE conversations (
    conversation_id text PRIMARY KEY,
    kind            smallint NOT NULL CHECK (kind IN (1, 2)),
    name            text NOT NULL DEFAULT '',
    owner_id        text,
    direct_user_a   text,
    direct_user_b   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 1) = (direct_user_a IS NOT NULL AND direct_user_b IS NOT NULL))
);
CREATE INDEX conversations_direct_a ON conversations (direct_user_a) WHERE kind = 1;
CREATE INDEX conversations_direct_b ON conversations (direct_user_b) WHERE kind = 1;

-- Group membership as conv_seq ranges: the member receives exactly the messages with
-- joined_after < conv_seq <= left_after (left_after NULL: still a member). Changes
-- hold the conversation's send lock, so each boundary is the conversation's last
-- committed conv_seq at that moment and no send falls on the wrong side of it.
CREATE TABLE members (
    conversation_id text NOT NULL REFERENCES conversations,
    user_id         text NOT NULL,
    joined_after    bigint NOT NULL,
    left_after      bigint,
    PRIMARY KEY (conversation_id, user_id, joined_after),
    CHECK (left_after IS NULL OR left_after >= joined_after)
);
CREATE UNIQUE INDEX members_current ON members (conversation_id, user_id)
    WHERE left_after IS NULL;
CREATE INDEX members_current_by_user ON members (user_id) WHERE left_after IS NULL;

-- Stored messages. conv_seq is the conversation's display order; sender_seq is the
-- position of the sender's own timeline row (part of the send ACK).
CREATE TABLE messages (
    msg_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id  text NOT NULL,
    conv_seq         bigint NOT NULL,
    sender_id        text NOT NULL,
    sender_device_id text NOT NULL,
    client_msg_id    text NOT NULL,
    sender_seq       bigint NOT NULL,
    content_type     smallint NOT NULL,
    body             bytea NOT NULL,
    server_time_ms   bigint NOT NULL,
    UNIQUE (conversation_id, conv_seq)
);

-- The idempotency key of sends (I2): one message per (sender, client_msg_id).
CREATE TABLE send_dedup (
    sender_id     text NOT NULL,
    client_msg_id text NOT NULL,
    msg_id        bigint NOT NULL,
    PRIMARY KEY (sender_id, client_msg_id)
);

-- Per-user timelines (I1, I2): seq strictly increasing per user, each message at
-- most once per user.
CREATE TABLE timeline (
    user_id text NOT NULL,
    seq     bigint NOT NULL,
    msg_id  bigint NOT NULL,
    PRIMARY KEY (user_id, seq),
    UNIQUE (user_id, msg_id)
);

-- Triggers committed with their message and not yet confirmed by JetStream (I4).
CREATE TABLE outbox (
    msg_id          bigint PRIMARY KEY,
    conversation_id text NOT NULL,
    conv_seq        bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_created ON outbox (created_at);

-- Each conversation's fan-out progress: every message with conv_seq <= watermark
-- is in every recipient's timeline; of the message just above it (if a big group
-- needed several calls), the recipients with user_id <= cursor_user are done.
-- Written only by Fanout, under the conversation's fan-out lock.
CREATE TABLE fanout_state (
    conversation_id text PRIMARY KEY,
    watermark       bigint NOT NULL,
    cursor_user     text NOT NULL DEFAULT '',
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Conversations with committed messages above their watermark (I8). A send upserts
-- its row; a Fanout that catches up deletes it (only if no newer send has raised
-- upto_conv_seq meanwhile); the repair loop claims rows whose repair_at has passed.
CREATE TABLE fanout_pending (
    conversation_id text PRIMARY KEY,
    upto_conv_seq   bigint NOT NULL,
    upto_msg_id     bigint NOT NULL,
    attempts        int NOT NULL DEFAULT 0,
    repair_at       timestamptz NOT NULL
);
CREATE INDEX fanout_pending_due ON fanout_pending (repair_at);
