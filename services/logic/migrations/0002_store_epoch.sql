-- The store epoch: an opaque id of this database, made once when the schema is
-- created. Seqs and msg_ids are positions in one database; a device's sync cursor
-- means nothing in another (a wiped and re-created store, a `make clean`). logic
-- hands the epoch to clients with every Sync and Welcome, so a device whose cursor
-- belongs to another epoch resyncs from 0 instead of waiting above an empty
-- timeline. One row; a new database gets a new epoch by running this migration.
CREATE TABLE store_epoch (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    epoch      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO store_epoch (epoch) VALUES (gen_random_uuid()::text);
