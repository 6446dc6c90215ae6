-- Data lifecycle (logic/retention.py): what the pruner needs besides the tables it
-- prunes. Numbered 0003 so that it never collides with another branch's 0002.

-- Per user, the highest seq the pruner has deleted from the timeline. It keeps I1
-- whole after a user's rows are all gone: the user's last committed seq is
-- greatest(max(timeline.seq), floor_seq), so a new seq must still be above every
-- seq ever committed. Sync reports it to a cursor below it ("entries up to here
-- may have been deleted"). Written only by the pruner, in the statement that
-- deletes the rows, so every snapshot sees either the rows or the floor.
CREATE TABLE timeline_floor (
    user_id   text PRIMARY KEY,
    floor_seq bigint NOT NULL
);

-- The pruner's progress (one row). Each pruning batch locks this row for its own
-- short transaction, so pruners in several logic processes never run a batch at
-- the same time and never repeat each other's work; sends never touch it.
--
-- Timeline passes: a pass visits every user in user_id order and deletes the rows
-- whose msg_id is below tl_cutoff (messages older than the timeline retention);
-- tl_after is the last user done (NULL: no pass running). tl_done is the cutoff of
-- the last completed pass: no timeline row references a msg_id below it (fan-out
-- writes no row for a message that old), so messages below it may be deleted.
-- Message passes scan msg_id upward from 0 to msg_bound (msg_after: last msg_id
-- scanned, NULL: no pass). Dedup passes visit every sender (dedup_after). The
-- *_last_pass times space the passes out (IM_LOGIC_RETENTION_PASS_INTERVAL_S).
CREATE TABLE retention_state (
    one           boolean PRIMARY KEY DEFAULT true CHECK (one),
    tl_cutoff     bigint NOT NULL DEFAULT 0,
    tl_after      text,
    tl_done       bigint NOT NULL DEFAULT 0,
    tl_last_pass  timestamptz NOT NULL DEFAULT '-infinity',
    msg_bound     bigint NOT NULL DEFAULT 0,
    msg_after     bigint,
    msg_last_pass timestamptz NOT NULL DEFAULT '-infinity',
    dedup_after   text,
    dedup_last_pass timestamptz NOT NULL DEFAULT '-infinity',
    updated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO retention_state DEFAULT VALUES;
