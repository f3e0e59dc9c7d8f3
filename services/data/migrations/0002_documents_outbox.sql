-- The table of 0001 was never written: the service answered UNIMPLEMENTED
-- until this schema replaced it.
drop table if exists documents;

-- Versioned JSON documents, one row per (collection, key). Keys compare
-- bytewise (collation "C"), so keyset pages are stable whatever the
-- database's locale.
create table documents (
    collection  text collate "C" not null,
    key         text collate "C" not null,
    -- 1 on creation, +1 on every write.
    version     bigint      not null check (version > 0),
    -- For containment queries (`document @> filter`, GIN index below).
    document    jsonb       not null,
    -- The document exactly as the caller sent it (a protobuf-encoded
    -- google.protobuf.Struct): JSONB keeps numbers as `numeric`, which has no
    -- -0, so reads return these bytes, never `document`.
    body        bytea       not null,
    created_at  timestamptz not null,
    updated_at  timestamptz not null,
    primary key (collection, key)
);

create index documents_containment on documents using gin (document jsonb_path_ops);

-- Audit events written in the same statement as the change they record,
-- delivered to the audit service (idempotency key: `idempotency_key`, scoped
-- by source service `mesh-data`) and deleted once it has acknowledged them.
create table audit_outbox (
    id               bigint generated always as identity primary key,
    idempotency_key  uuid        not null unique,
    occurred_at      timestamptz not null,
    action           text        not null,
    collection       text        not null,
    key              text        not null,
    version          bigint      not null,
    op_index         int         not null,
    op_count         int         not null,
    actor_id         text        not null,
    session_id       text        not null,
    request_id       text        not null,
    trace_id         text        not null,
    -- W3C traceparent of the call, so a late delivery joins its trace.
    traceparent      text        not null,
    source_ip        text        not null,
    user_agent       text        not null,
    -- Not before: the writing instance delivers at once and has until then.
    next_attempt_at  timestamptz not null,
    attempts         int         not null default 0,
    last_error       text,
    -- Set when the audit service refused the event for good; never retried.
    dead_at          timestamptz
);

create index audit_outbox_due on audit_outbox (next_attempt_at) where dead_at is null;

-- Applies the operations of one Put, Delete or Batch in order, all or
-- nothing, and writes one outbox event per change. One statement, so no
-- transaction is ever left open on a connection whatever happens to the
-- caller. Returns either the index (0-based) of the first operation whose
-- expected_version did not hold and the version it found (NULL: no
-- document), with nothing written; or, per operation, the version written
-- (for a delete: the version deleted, NULL if there was nothing) and the
-- outbox event's id (NULL where a delete found nothing).
create function data_write(
    p_delete      boolean[],
    p_collection  text[],
    p_key         text[],
    p_document    jsonb[],
    p_body        bytea[],
    p_expected    bigint[],
    p_idempotency uuid[],
    p_actor       text,
    p_session     text,
    p_request_id  text,
    p_trace_id    text,
    p_traceparent text,
    p_source_ip   text,
    p_user_agent  text,
    p_grace       interval
) returns table (failed_op int, actual_version bigint, versions bigint[], outbox_ids bigint[], written_at timestamptz)
language plpgsql as $$
declare
    n      int := coalesce(array_length(p_key, 1), 0);
    h      int;
    cur    bigint;
    v      bigint;
    oid    bigint;
    vs     bigint[] := '{}';
    ids    bigint[] := '{}';
    failed int;
begin
    if n > 1 then
        -- Batches over the same documents queue instead of deadlocking: each
        -- first locks the buckets of the documents it touches (256 buckets by
        -- key hash), in one global order, whether or not a document exists yet
        -- (a row lock cannot cover a key about to be inserted). At most 256
        -- locks per batch, held in PostgreSQL's lock table
        -- (max_locks_per_transaction); two batches on distinct keys may share
        -- a bucket and then simply take turns. Single writes lock one row and
        -- cannot deadlock, so they take no bucket.
        for h in
            select distinct (hashtextextended(o.collection || '/' || o.key, 0) & 255)::int
              from unnest(p_collection, p_key) as o(collection, key)
             order by 1
        loop
            -- 1684108385: "data" as a 32-bit number, the lock class of these buckets.
            perform pg_advisory_xact_lock(1684108385, h);
        end loop;
    end if;
    begin
        for i in 1..n loop
            loop
                select d.version into cur from documents d
                 where d.collection = p_collection[i] and d.key = p_key[i]
                   for update;
                if not found then
                    cur := null;
                end if;
                if p_expected[i] is not null and coalesce(cur, 0) <> p_expected[i] then
                    failed := i - 1;
                    raise exception using errcode = 'MD409';
                end if;
                if p_delete[i] then
                    if cur is not null then
                        delete from documents d where d.collection = p_collection[i] and d.key = p_key[i];
                    end if;
                    v := cur;
                    exit;
                elsif cur is not null then
                    v := cur + 1;
                    update documents d
                       set version = v, document = p_document[i], body = p_body[i], updated_at = now()
                     where d.collection = p_collection[i] and d.key = p_key[i];
                    exit;
                else
                    insert into documents (collection, key, version, document, body, created_at, updated_at)
                    values (p_collection[i], p_key[i], 1, p_document[i], p_body[i], now(), now())
                    on conflict do nothing;
                    if found then
                        v := 1;
                        exit;
                    end if;
                    -- Created meanwhile by another call: decide again under its lock.
                end if;
            end loop;
            vs := vs || v;
            if v is null then
                -- A delete that found nothing: no change, no event.
                ids := ids || null::bigint;
                continue;
            end if;
            insert into audit_outbox (
                idempotency_key, occurred_at, action, collection, key, version, op_index, op_count,
                actor_id, session_id, request_id, trace_id, traceparent, source_ip, user_agent,
                next_attempt_at
            ) values (
                p_idempotency[i], now(), case when p_delete[i] then 'document.delete' else 'document.put' end,
                p_collection[i], p_key[i], v, i - 1, n,
                p_actor, p_session, p_request_id, p_trace_id, p_traceparent, p_source_ip, p_user_agent,
                now() + p_grace
            ) returning id into oid;
            ids := ids || oid;
        end loop;
    exception when sqlstate 'MD409' then
        -- Everything this block wrote is rolled back.
        return query select failed, cur, null::bigint[], null::bigint[], now();
        return;
    end;
    return query select null::int, null::bigint, vs, ids, now();
end
$$;
