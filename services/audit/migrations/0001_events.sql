-- Audit events, one row per acknowledged event, in chain order.
create table audit_events (
    sequence        bigint      primary key,
    id              uuid        not null unique,
    occurred_at     timestamptz not null,
    recorded_at     timestamptz not null default now(),
    actor_type      text        not null,
    actor_id        text        not null,
    action          text        not null,
    resource_type   text        not null,
    resource_id     text        not null,
    outcome         smallint    not null,
    source_ip       text        not null,
    source_agent    text        not null,
    source_service  text        not null,
    request_id      text        not null,
    trace_id        text        not null,
    metadata        jsonb       not null,
    prev_hash       bytea       not null,
    hash            bytea       not null
);
