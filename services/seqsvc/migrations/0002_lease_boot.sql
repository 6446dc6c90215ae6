-- Which start of which process holds the lease (see Boot in allocator.py): a random
-- nonce per start, so that a process with the same instance id can tell its own
-- lease from a live twin's, and the address the holder listens on
-- ('<boot id>/<network namespace>/<host>:<port>'), so that a restart that has bound
-- that address can prove its crashed predecessor gone. '' for a lease taken before
-- this migration (or where the address is unknown): such a holder is never proved
-- gone, only waited out.
ALTER TABLE seqsvc_owner
    ADD COLUMN nonce text NOT NULL DEFAULT '',
    ADD COLUMN listener text NOT NULL DEFAULT '';
