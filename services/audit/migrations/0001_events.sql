-- Audit log storage. Tables live in the service's schema (the connection's
-- search_path, `MESH_DATABASE_SCHEMA`); only the writer role is cluster-wide.
--
-- Append-only, in three layers:
--   1. The service logs in as the schema owner only to run this migration; it
--      serves as `mesh_audit_writer` (SET ROLE through the connection's startup
--      options), which may SELECT and INSERT events but has no UPDATE, DELETE
--      or TRUNCATE on them.
--   2. Triggers refuse UPDATE, DELETE and TRUNCATE of events for everyone,
--      the owner included. (A superuser can still switch triggers off; that
--      is what the hash chain and Verify are for.)
--   3. Every event is hash-chained to its predecessor (see `src/chain.rs`).
-- Retention drops whole monthly partitions through an owner-only function
-- that first checkpoints the chain at the dropped boundary.

-- The writer role. Roles are shared by every schema of the cluster, so it is
-- created once and reused; the login role must be a member to SET ROLE to it.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'mesh_audit_writer') then
        create role mesh_audit_writer nologin;
    end if;
exception when duplicate_object or unique_violation then
    null; -- created at the same moment by another schema's migration
end $$;

do $$
begin
    if not pg_has_role(current_user, 'mesh_audit_writer', 'member') then
        execute format('grant mesh_audit_writer to %I', current_user);
    end if;
exception when others then
    -- a concurrent grant of the same membership is fine; anything else is not
    if not pg_has_role(current_user, 'mesh_audit_writer', 'member') then
        raise;
    end if;
end $$;

-- One row per event, in chain order. Partitioned by month of recorded_at,
-- which the service keeps non-decreasing along the chain, so each partition
-- holds one contiguous run of sequences and retention cuts only at the old end.
create table audit_events (
    sequence          bigint      not null,
    id                uuid        not null,
    occurred_at       timestamptz not null,
    recorded_at       timestamptz not null,
    actor_type        text        not null,
    actor_id          text        not null,
    action            text        not null,
    resource_type     text        not null,
    resource_id       text        not null,
    outcome           smallint    not null,
    source_ip         text        not null,
    source_user_agent text        not null,
    source_service    text        not null,
    request_id        text        not null,
    trace_id          text        not null,
    metadata          jsonb       not null,
    prev_hash         bytea       not null,
    hash              bytea       not null,
    -- A partitioned table's keys must include the partition column; sequence
    -- alone is kept unique by the chain head every append serialises on.
    primary key (sequence, recorded_at)
) partition by range (recorded_at);

-- Query filters: each index leads with one filter column and ends in the
-- keyset order (occurred_at, sequence), so a page is one index range scan.
create index audit_events_occurred on audit_events (occurred_at, sequence);
create index audit_events_actor on audit_events (actor_id, occurred_at, sequence);
create index audit_events_action on audit_events (action, occurred_at, sequence);
create index audit_events_resource_type on audit_events (resource_type, occurred_at, sequence);
create index audit_events_resource_id on audit_events (resource_id, occurred_at, sequence);
create index audit_events_outcome on audit_events (outcome, occurred_at, sequence);

-- The chain head: one row, locked by each append batch for its transaction,
-- which is what makes sequences gapless across every instance.
create table audit_chain_head (
    chain         smallint    primary key default 1 check (chain = 1),
    next_sequence bigint      not null,
    head_hash     bytea       not null,
    -- recorded_at of the last event: the next batch never records earlier
    recorded_at   timestamptz
);
insert into audit_chain_head (chain, next_sequence, head_hash) values (1, 1, decode(repeat('00', 32), 'hex'));

-- First result per (source service, idempotency key). Separate from the
-- events because a unique constraint on a partitioned table would have to
-- include the partition column.
create table audit_idempotency (
    source_service  text   not null,
    idempotency_key text   not null,
    sequence        bigint not null,
    id              uuid   not null,
    hash            bytea  not null,
    primary key (source_service, idempotency_key)
);
create index audit_idempotency_sequence on audit_idempotency (sequence);

-- The chain hash at each boundary retention dropped: Verify anchors the
-- oldest retained event on the newest checkpoint.
create table audit_checkpoints (
    last_sequence  bigint      primary key,
    last_hash      bytea       not null,
    partition_name text        not null,
    range_from     timestamptz not null,
    range_to       timestamptz not null,
    events         bigint      not null,
    created_at     timestamptz not null default now()
);

-- The monthly partitions that exist, with their bounds.
create table audit_partitions (
    name       text        primary key,
    range_from timestamptz not null unique,
    range_to   timestamptz not null
);

create function audit_refuse_change() returns trigger
language plpgsql as $$
begin
    raise exception 'the audit log is append-only: % on % is refused', tg_op, tg_table_name
        using errcode = 'insufficient_privilege';
end $$;

create trigger audit_events_append_only before update or delete on audit_events
    for each row execute function audit_refuse_change();
create trigger audit_events_no_truncate before truncate on audit_events
    for each statement execute function audit_refuse_change();
create trigger audit_checkpoints_append_only before update or delete on audit_checkpoints
    for each row execute function audit_refuse_change();
create trigger audit_checkpoints_no_truncate before truncate on audit_checkpoints
    for each statement execute function audit_refuse_change();
create trigger audit_chain_head_no_delete before delete on audit_chain_head
    for each row execute function audit_refuse_change();
create trigger audit_chain_head_no_truncate before truncate on audit_chain_head
    for each statement execute function audit_refuse_change();

-- Creates the partition holding `at` if it is missing. SECURITY DEFINER so
-- the writer role can make room for new months without owning the table.
create function audit_ensure_partition(at timestamptz) returns text
language plpgsql security definer set timezone = 'UTC' as $$
declare
    lo   timestamptz := date_trunc('month', at);
    hi   timestamptz := date_trunc('month', at) + interval '1 month';
    name text        := 'audit_events_' || to_char(date_trunc('month', at), 'YYYY_MM');
begin
    if exists (select 1 from audit_partitions p where p.range_from = lo) then
        return name;
    end if;
    -- instances racing to create the same month take turns
    perform pg_advisory_xact_lock(hashtext(current_schema() || '.audit_partitions'));
    if exists (select 1 from audit_partitions p where p.range_from = lo) then
        return name;
    end if;
    execute format('create table %I partition of audit_events for values from (%L) to (%L)', name, lo, hi);
    -- statement triggers are not inherited: TRUNCATE of the partition itself
    execute format('create trigger audit_no_truncate before truncate on %I '
                   'for each statement execute function audit_refuse_change()', name);
    insert into audit_partitions (name, range_from, range_to) values (name, lo, hi);
    return name;
end $$;

-- Retention (owner only): drops every partition that ends at or before
-- `cutoff`, oldest first, checkpointing the chain at each dropped boundary
-- and forgetting the idempotency keys of the dropped events.
create function audit_drop_partitions_before(cutoff timestamptz)
returns table (dropped text, dropped_events bigint, dropped_through bigint)
language plpgsql set timezone = 'UTC' as $$
declare
    p    record;
    n    bigint;
    last bigint;
    h    bytea;
begin
    -- appends hold the chain head for their batch: never drop under one
    perform 1 from audit_chain_head where chain = 1 for update;
    for p in select * from audit_partitions where range_to <= cutoff order by range_from loop
        execute format('select count(*), max(sequence) from %I', p.name) into n, last;
        if last is not null then
            execute format('select hash from %I where sequence = $1', p.name) into h using last;
            insert into audit_checkpoints (last_sequence, last_hash, partition_name, range_from, range_to, events)
                values (last, h, p.name, p.range_from, p.range_to, n);
            delete from audit_idempotency where sequence <= last;
        end if;
        execute format('drop table %I', p.name);
        delete from audit_partitions where name = p.name;
        dropped := p.name;
        dropped_events := n;
        dropped_through := last;
        return next;
    end loop;
end $$;

-- SECURITY DEFINER functions must not resolve names through a caller's
-- search_path; pin both to this schema.
do $$
begin
    execute format('alter function audit_ensure_partition(timestamptz) set search_path = %I, pg_temp',
                   current_schema());
    execute format('alter function audit_drop_partitions_before(timestamptz) set search_path = %I, pg_temp',
                   current_schema());
    execute format('grant usage on schema %I to mesh_audit_writer', current_schema());
end $$;

revoke all on function audit_ensure_partition(timestamptz) from public;
revoke all on function audit_drop_partitions_before(timestamptz) from public;
grant execute on function audit_ensure_partition(timestamptz) to mesh_audit_writer;
grant select, insert on audit_events, audit_idempotency to mesh_audit_writer;
grant select, update on audit_chain_head to mesh_audit_writer;
grant select on audit_checkpoints, audit_partitions to mesh_audit_writer;

select audit_ensure_partition(now());
select audit_ensure_partition(now() + interval '1 month');
