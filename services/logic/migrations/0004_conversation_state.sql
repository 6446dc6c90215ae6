-- Conversation state (docs/protocol.md, "Conversation state"): every state change
-- a user makes (edit, recall, read, delivered, delete for me) is a row of
-- `messages` with its own conv_seq, stored by the send path, so order, dedup, the
-- outbox and fan-out carry over. `kind` is im.common.v1.MessageKind (1: a chat
-- message). Adding columns with constant defaults rewrites no rows.
ALTER TABLE messages
    ADD COLUMN kind            smallint NOT NULL DEFAULT 1 CHECK (kind BETWEEN 1 AND 6),
    -- EDIT, RECALL, DELETE_FOR_ME: the conv_seq acted on; READ, DELIVERED: the position.
    ADD COLUMN target_conv_seq bigint,
    -- A chat message whose body an EDIT replaced: when (Unix ms).
    ADD COLUMN edited_at_ms    bigint,
    -- A chat message or EDIT whose body a RECALL deleted (body is then empty).
    ADD COLUMN recalled        boolean NOT NULL DEFAULT false;

-- The EDITs of a message, for its recall (which deletes their bodies too).
CREATE INDEX messages_edits ON messages (conversation_id, target_conv_seq) WHERE kind = 2;

-- Per (conversation, user): the highest conv_seq read and received. Only ever
-- raised, by the READ / DELIVERED event's own transaction (under the
-- conversation's send lock and the user's lock). Receipts read it by conversation.
CREATE TABLE read_positions (
    conversation_id    text NOT NULL,
    user_id            text NOT NULL,
    read_conv_seq      bigint NOT NULL DEFAULT 0,
    delivered_conv_seq bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX read_positions_by_user ON read_positions (user_id);

-- Messages a user deleted for itself: served to that user with an empty body.
-- Retention deletes a message's rows here with the message (by msg_id).
CREATE TABLE hidden_messages (
    user_id text NOT NULL,
    msg_id  bigint NOT NULL,
    PRIMARY KEY (user_id, msg_id)
);
CREATE INDEX hidden_messages_msg ON hidden_messages (msg_id);
