-- Exact metadata (hash version 2). Before this, metadata lived only in
-- `jsonb` and the hash folded -0 into +0; the service read `jsonb` back
-- with an approximate number parser, so some values came back altered
-- (and failed their hash) or could not be read at all.
--
-- From now on each event says which rule its hash follows:
--   hash_version 1: every event written before this migration (the default,
--     so no row is rewritten and no hash changes); metadata is the `jsonb`.
--   hash_version 2: metadata_pb holds the metadata's protobuf encoding,
--     which reads decode and the hash covers bit for bit; `jsonb` is a copy
--     for SQL that Verify checks against it.
-- Both columns are added without rewriting the table (a constant default
-- and a nullable column), under a brief lock. An instance still running the
-- old code keeps writing version-1 rows, which verify under their own rule.
alter table audit_events
    add column hash_version smallint not null default 1,
    add column metadata_pb  bytea;
