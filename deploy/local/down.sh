#!/usr/bin/env bash
# Stops what deploy/local/up.sh started: the four services (SIGTERM, then
# SIGKILL after 30 s), the Redis Cluster and the PostgreSQL pair. State stays
# in .local/ for the next up.sh; delete that directory to start afresh.
source "$(dirname "$0")/lib.sh"
RUN_DIR="$MESH_LOCAL_DIR/run"
with_lock
for svc in data session ratelimit audit; do
  pid="$RUN_DIR/$svc.pid"
  [ -f "$pid" ] || continue
  p=$(cat "$pid")
  if kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p"
    for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && { say "mesh-$svc did not drain in 30s, killing"; kill -KILL "$p"; }
  fi
  rm -f "$pid"
done
redis_stop
pg_stop all
say "mesh is down (state kept in $MESH_LOCAL_DIR)"
