#!/usr/bin/env bash
# Entrypoint of the PostgreSQL streaming replica (docker-compose service
# pg-replica, official postgres image, started as root).
#
# First start: wait for the primary, clone it with pg_basebackup -R (which
# writes standby.signal and primary_conninfo), then hand over to the image's
# own entrypoint, which finds an existing data directory, skips initdb and runs
# postgres as the postgres user. Later starts go straight to the hand-over.
# The clone goes to a scratch directory first and is renamed into place only
# when complete, so an interrupted clone is redone rather than started from.
#
# Environment:
#   PGDATA                 data directory (a subdirectory of the volume)
#   MESH_PG_PRIMARY_HOST   primary host            (default: pg-primary)
#   MESH_PG_PRIMARY_PORT   primary port            (default: 5432)
#   MESH_PG_SLOT           replication slot        (default: mesh_replica)
#   PGPASSWORD             password of role replicator
set -euo pipefail

: "${PGDATA:?PGDATA must be set}"
: "${PGPASSWORD:?PGPASSWORD (the replicator password) must be set}"
primary_host=${MESH_PG_PRIMARY_HOST:-pg-primary}
primary_port=${MESH_PG_PRIMARY_PORT:-5432}
slot=${MESH_PG_SLOT:-mesh_replica}

log() { printf 'pg-replica: %s\n' "$*" >&2; }

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  log "waiting for the primary at $primary_host:$primary_port"
  # Over TCP: during its first-start initialisation the primary listens on its
  # socket only, so this answers once the real server is up.
  for _ in $(seq 1 300); do
    if pg_isready -q -h "$primary_host" -p "$primary_port" -U replicator -d postgres; then
      break
    fi
    sleep 1
  done
  pg_isready -q -h "$primary_host" -p "$primary_port" -U replicator -d postgres \
    || { log "primary did not become ready"; exit 1; }

  partial="$PGDATA.partial"
  rm -rf "$partial"
  mkdir -p "$partial"
  chown postgres:postgres "$partial" "$(dirname "$PGDATA")"
  chmod 0700 "$partial"
  log "cloning the primary (slot $slot)"
  gosu postgres pg_basebackup \
    --host "$primary_host" --port "$primary_port" --username replicator \
    --pgdata "$partial" --write-recovery-conf --wal-method stream \
    --slot "$slot" --checkpoint fast --no-password
  mv "$partial" "$PGDATA"
  log "clone complete"
fi

exec docker-entrypoint.sh "$@"
