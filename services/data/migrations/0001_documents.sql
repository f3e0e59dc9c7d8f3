-- Versioned JSON documents, one row per (collection, key).
create table documents (
    collection  text        not null,
    key         text        not null,
    document    jsonb       not null,
    version     bigint      not null check (version > 0),
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    primary key (collection, key)
);

-- Query: JSON containment (`document @> filter`) within a collection.
create index documents_containment on documents using gin (document jsonb_path_ops);
