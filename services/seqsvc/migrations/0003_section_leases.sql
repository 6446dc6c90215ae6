-- Several active instances (issue 17): every section has its own lease. A section
-- is served only by `owner`, under its fencing `epoch`, while `lease_until`
-- (database clock) is ahead; a new owner bumps `epoch`, so every write of the old
-- one (conditional on its epoch) changes nothing.
ALTER TABLE seqsvc_sections
    ADD COLUMN owner text NOT NULL DEFAULT '',
    ADD COLUMN lease_until timestamptz NOT NULL DEFAULT '-infinity';

-- The live instances: who they are, where clients reach them, which start of
-- which process (nonce, listener: see Boot in allocator.py), and until when they
-- count as alive. Sections are split over the instances whose lease is ahead.
CREATE TABLE seqsvc_instances (
    instance text PRIMARY KEY,
    address text NOT NULL,
    nonce text NOT NULL,
    listener text NOT NULL DEFAULT '',
    lease_until timestamptz NOT NULL
);

-- The routing table's version: bumped by every change of ownership, so instances
-- (and through them, clients) notice a change with one small read.
ALTER TABLE seqsvc_owner ADD COLUMN version bigint NOT NULL DEFAULT 0;
