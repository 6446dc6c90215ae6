-- One row per section: the persisted ceiling (max_seq) that every value handed out
-- for a key of that section is at most, and the fencing epoch of its owner.
CREATE TABLE seqsvc_sections (
    section int PRIMARY KEY CHECK (section >= 0),
    max_seq bigint NOT NULL CHECK (max_seq >= 0),
    epoch bigint NOT NULL DEFAULT 0
);

-- The single owner of all sections: who serves them, under which fencing epoch,
-- until when its lease runs (database clock), and how many sections there are.
CREATE TABLE seqsvc_owner (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    sections int NOT NULL CHECK (sections > 0),
    epoch bigint NOT NULL DEFAULT 0,
    owner text NOT NULL DEFAULT '',
    lease_until timestamptz NOT NULL DEFAULT '-infinity'
);
