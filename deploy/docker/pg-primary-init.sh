#!/usr/bin/env bash
# PostgreSQL primary, first start only: mounted into /docker-entrypoint-initdb.d
# of the official postgres image, which runs it as `postgres` against a
# temporary socket-only server, then restarts the server for real (so the
# ALTER SYSTEM settings below, wal_level included, are in force from then on).
#
# The entrypoint executes this file when it is executable and sources it
# otherwise, so it changes no shell options: everything runs in a function,
# in a subshell, with its own `set -euo pipefail`.
#
# Environment:
#   MESH_PG_PASSWORD   password of the `mesh` (application) and `replicator` roles
#   POSTGRES_USER      superuser (set by the image; default postgres)
#   PGDATA             data directory (set by the image)

mesh_init_primary() (
  set -euo pipefail
  if [ -z "${MESH_PG_PASSWORD:-}" ]; then
    echo "pg-primary-init: MESH_PG_PASSWORD is not set" >&2
    exit 1
  fi

  # psql's :'pw' quotes the value as a literal, so any password is safe here.
  psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
    --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    -v pw="$MESH_PG_PASSWORD" <<'SQL'
-- Streaming replication: a login role with REPLICATION and nothing else.
create role replicator with replication login password :'pw';

-- The services' role owns the mesh database; the audit service's migrations
-- create its tables and the restricted roles that make the log append-only.
create role mesh with login createrole password :'pw';
create database mesh owner mesh;

-- The replica streams from this slot, so the primary keeps the WAL it still
-- needs; max_slot_wal_keep_size bounds that if the replica goes away for good.
select pg_create_physical_replication_slot('mesh_replica');

-- Written to postgresql.auto.conf. pg_basebackup copies that file, so the
-- replica starts with the same values (a hot standby refuses to start with
-- max_connections lower than its primary's).
alter system set wal_level = 'replica';
alter system set max_wal_senders = 10;
alter system set max_replication_slots = 10;
alter system set wal_keep_size = '256MB';
alter system set max_slot_wal_keep_size = '2GB';
alter system set hot_standby = on;
alter system set hot_standby_feedback = on;
alter system set max_connections = 300;
-- mesh-data's Batch takes up to 256 advisory locks (one per key bucket it
-- touches); the default 64 would leave room for few concurrent batches.
alter system set max_locks_per_transaction = 256;
alter system set log_min_duration_statement = 1000;
SQL

  # The image's pg_hba.conf lets every database be reached with a password, but
  # the keyword `all` does not match replication connections: allow those for
  # the replicator role only.
  printf '%s\n' '# mesh: streaming replication (deploy/docker/pg-primary-init.sh)' \
    'host replication replicator all scram-sha-256' >>"$PGDATA/pg_hba.conf"

  echo "pg-primary-init: roles mesh and replicator, database mesh, slot mesh_replica created"
)

mesh_init_primary
