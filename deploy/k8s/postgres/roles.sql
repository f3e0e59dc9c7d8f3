-- The PostgreSQL roles mesh runs as: per service, an owner that migrates and
-- a serving login that owns nothing; none with CREATEROLE, CREATEDB or
-- superuser. Run once, as an administrator, in the mesh database, before the
-- first deployment:
--
--   psql "postgres://admin@pg-primary.example:5432/mesh?sslmode=verify-full&sslrootcert=ca.pem" \
--     -v ON_ERROR_STOP=1 \
--     -v data_password="$DATA_OWNER_PW" -v data_app_password="$DATA_APP_PW" \
--     -v audit_password="$AUDIT_OWNER_PW" -v audit_app_password="$AUDIT_APP_PW" \
--     -f deploy/k8s/postgres/roles.sql
--
-- then put the passwords in the Secrets (deploy/README.md):
--   mesh-database-data-owner    mesh_data       (data's `migrate` initContainer)
--   mesh-database-data          mesh_data_app   (the data pods)
--   mesh-database-audit-owner   mesh_audit      (audit's `migrate` initContainer, retention CronJob)
--   mesh-database-audit         mesh_audit_app  (the audit pods)
-- Re-running it changes the passwords and nothing else.
--
--   mesh_data          login; owns schema `data` (documents, outbox). Only
--                      `mesh-data migrate` logs in as it (the initContainer).
--   mesh_data_app      login; what the data pods serve as: SELECT, INSERT,
--                      UPDATE, DELETE on data's tables and USAGE on its
--                      sequences (for tables the owner creates later too:
--                      default privileges), no DDL, no TRUNCATE; no right on
--                      schema `audit`. The pods run with
--                      MESH_DATABASE_MIGRATE=verify: they check the migrations
--                      are applied and run none. The migration history
--                      (`_sqlx_migrations`) is readable by every role and
--                      writable by the owner only (`migrate` revokes what the
--                      default privileges grant on it).
--   mesh_audit         login; owns schema `audit`: `mesh-audit migrate` (the
--                      initContainer) and the retention job's partition drops.
--                      Not CREATEROLE: the writer role below exists
--                      beforehand, so the migration's `create role` and
--                      `grant` are skipped.
--   mesh_audit_writer  nologin; what the audit service serves as (SET ROLE at
--                      connect): SELECT and INSERT on events, no UPDATE,
--                      DELETE, TRUNCATE or DDL (the grants are in
--                      services/audit/migrations).
--   mesh_audit_app     login; what the audit pods log in as: a member of
--                      mesh_audit_writer and nothing else (NOINHERIT: without
--                      the SET ROLE it holds no privilege at all).
--
-- The names are psql variables (data_role, data_app_role, data_schema,
-- audit_role, audit_app_role, audit_schema) defaulting to the ones above, so
-- the tests run this very file with names of their own
-- (services/*/tests/api/roles.rs). mesh_audit_writer is fixed: the
-- migrations name it.

\set ON_ERROR_STOP on
\if :{?data_role}
\else
\set data_role mesh_data
\endif
\if :{?data_app_role}
\else
\set data_app_role mesh_data_app
\endif
\if :{?data_schema}
\else
\set data_schema data
\endif
\if :{?audit_role}
\else
\set audit_role mesh_audit
\endif
\if :{?audit_app_role}
\else
\set audit_app_role mesh_audit_app
\endif
\if :{?audit_schema}
\else
\set audit_schema audit
\endif

select format('create role %I login nocreaterole nocreatedb nosuperuser noinherit', :'data_role')
where not exists (select 1 from pg_roles where rolname = :'data_role') \gexec
select format('create role %I login nocreaterole nocreatedb nosuperuser noinherit', :'data_app_role')
where not exists (select 1 from pg_roles where rolname = :'data_app_role') \gexec
select format('create role %I login nocreaterole nocreatedb nosuperuser inherit', :'audit_role')
where not exists (select 1 from pg_roles where rolname = :'audit_role') \gexec
select format('create role %I login nocreaterole nocreatedb nosuperuser noinherit', :'audit_app_role')
where not exists (select 1 from pg_roles where rolname = :'audit_app_role') \gexec
select format('create role mesh_audit_writer nologin')
where not exists (select 1 from pg_roles where rolname = 'mesh_audit_writer') \gexec

alter role :"data_role" password :'data_password';
alter role :"data_app_role" password :'data_app_password';
alter role :"audit_role" password :'audit_password';
alter role :"audit_app_role" password :'audit_app_password';

-- audit's owner (for the migration's own grants) and its serving login both
-- switch to the writer role; the serving login can do nothing else.
grant mesh_audit_writer to :"audit_role";
grant mesh_audit_writer to :"audit_app_role";

-- Each service's schema, owned by its owner role. The migrations run
-- `create schema if not exists`, which PostgreSQL checks against CREATE on
-- the database even when the schema exists: only the owners get it.
create schema if not exists :"data_schema" authorization :"data_role";
create schema if not exists :"audit_schema" authorization :"audit_role";
select format('grant connect, create on database %I to %I, %I', current_database(), :'data_role', :'audit_role') \gexec
select format('grant connect on database %I to %I, %I', current_database(), :'data_app_role', :'audit_app_role') \gexec

-- data's serving role: rows, never the tables themselves. Default privileges
-- cover what later migrations create; the grants cover what exists.
grant usage on schema :"data_schema" to :"data_app_role";
alter default privileges for role :"data_role" in schema :"data_schema"
    grant select, insert, update, delete on tables to :"data_app_role";
alter default privileges for role :"data_role" in schema :"data_schema"
    grant usage, select on sequences to :"data_app_role";
grant select, insert, update, delete on all tables in schema :"data_schema" to :"data_app_role";
grant usage, select on all sequences in schema :"data_schema" to :"data_app_role";

-- Nothing in `public` for anyone but its owner (PostgreSQL 15's default too).
revoke create on schema public from public;
