#!/usr/bin/env bash
# Local infrastructure: a PostgreSQL primary + streaming replica and a 6-node
# Redis Cluster on loopback. Idempotent; installs what is missing.
#
#   deploy/local/infra.sh start [all|pg|redis]
#   deploy/local/infra.sh stop  [all|pg|pg-primary|pg-replica|redis]
#   deploy/local/infra.sh status
#
# Ports and the state directory come from the environment (see lib.sh), so
# tests can run private copies for fault injection.
source "$(dirname "$0")/lib.sh"

cmd=${1:-start}; what=${2:-all}
with_lock
case "$cmd:$what" in
  start:all) pg_start; redis_start ;;
  start:pg) pg_start ;;
  start:redis) redis_start ;;
  stop:all) redis_stop; pg_stop all ;;
  stop:pg) pg_stop all ;;
  stop:pg-primary) pg_stop primary ;;
  stop:pg-replica) pg_stop replica ;;
  stop:redis) redis_stop ;;
  status:*)
    ensure_postgres >/dev/null 2>&1 || true
    root=$(pg_root)
    for d in primary replica; do
      if pg_running "$root/$d" 2>/dev/null; then echo "postgres $d: up"; else echo "postgres $d: down"; fi
    done
    for p in $MESH_REDIS_PORTS; do
      if redis_up "$p"; then echo "redis $p: up"; else echo "redis $p: down"; fi
    done ;;
  *) die "usage: $0 start|stop|status [all|pg|pg-primary|pg-replica|redis]" ;;
esac
