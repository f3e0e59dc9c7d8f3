#!/usr/bin/env bash
# Stops what deploy/local/up.sh started: the four services (SIGTERM, then
# SIGKILL after 30 s), the trace sink, the Redis Cluster and the PostgreSQL
# pair. State (and the trace file) stays in .local/ for the next up.sh;
# delete that directory to start afresh.
source "$(dirname "$0")/lib.sh"
with_lock
for svc in data session ratelimit audit; do
  svc_stop "$svc" 30
done
# After the services: their last spans are flushed to it on SIGTERM.
svc_stop trace-sink 10
redis_stop
pg_stop all
say "mesh is down (state kept in $MESH_LOCAL_DIR)"
