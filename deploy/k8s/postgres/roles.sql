-- The PostgreSQL roles mesh runs as: one login role per service, none with
-- CREATEROLE, CREATEDB or superuser. Run once, as an administrator, in the
-- mesh database, before the first deployment:
--
--   psql "postgres://admin@pg-primary.example:5432/mesh?sslmode=verify-full&sslrootcert=ca.pem" \
--     -v ON_ERROR_STOP=1 -v data_password="$DATA_PW" -v audit_password="$AUDIT_PW" \
--     -f deploy/k8s/postgres/roles.sql
--
-- then put the passwords in the Secrets mesh-database-data and
-- mesh-database-audit (deploy/README.md). Re-running it changes the
-- passwords and nothing else.
--
--   mesh_data          login; owns schema `data` (documents, outbox): runs
--                      data's migrations at start, reads and writes its own
--                      tables; no right on schema `audit`.
--   mesh_audit         login; owns schema `audit`: runs audit's migrations at
--                      start and the retention job's partition drops. Not
--                      CREATEROLE: the writer role below exists beforehand, so
--                      the migration's `create role` and `grant` are skipped.
--   mesh_audit_writer  nologin; what the audit service serves as (SET ROLE at
--                      connect): SELECT and INSERT on events, no UPDATE,
--                      DELETE, TRUNCATE or DDL (the grants are in
--                      services/audit/migrations).
--
-- Not separated yet: the audit pods hold mesh_audit's credentials, because
-- the binary migrates at start (there is no migrate-only command); a
-- compromised audit pod can therefore run DDL on schema `audit` (the
-- triggers refuse UPDATE/DELETE of events even to the owner, and the hash
-- chain with its signed checkpoints shows a rewrite).

\set ON_ERROR_STOP on

select format('create role mesh_data login nocreaterole nocreatedb nosuperuser noinherit')
where not exists (select 1 from pg_roles where rolname = 'mesh_data') \gexec
select format('create role mesh_audit login nocreaterole nocreatedb nosuperuser inherit')
where not exists (select 1 from pg_roles where rolname = 'mesh_audit') \gexec
select format('create role mesh_audit_writer nologin')
where not exists (select 1 from pg_roles where rolname = 'mesh_audit_writer') \gexec

alter role mesh_data password :'data_password';
alter role mesh_audit password :'audit_password';

-- audit's login role switches to the writer role for serving.
grant mesh_audit_writer to mesh_audit;

-- Each service's schema, owned by its role. The migrations run
-- `create schema if not exists`, which PostgreSQL checks against CREATE on
-- the database even when the schema exists.
create schema if not exists data authorization mesh_data;
create schema if not exists audit authorization mesh_audit;
select format('grant connect, create on database %I to mesh_data, mesh_audit', current_database()) \gexec

-- Nothing in `public` for anyone but its owner (PostgreSQL 15's default too).
revoke create on schema public from public;
