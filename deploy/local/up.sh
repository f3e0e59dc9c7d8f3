#!/usr/bin/env bash
# Brings the whole mesh up on this machine, without containers: PostgreSQL
# primary + replica, a 6-node Redis Cluster, and the four services built from
# this checkout. Idempotent: what runs already is left running (a service is
# restarted only when its binary was rebuilt). OTEL_* and RUST_LOG from this
# environment reach every service.
#
#   MESH_PROFILE=release deploy/local/up.sh    # optimised build (default: dev)
source "$(dirname "$0")/lib.sh"

RUN_DIR="$MESH_LOCAL_DIR/run"
PROFILE=${MESH_PROFILE:-dev}
SERVICES=(session:50051 ratelimit:50052 audit:50053 data:50054)

with_lock
ensure_tools
pg_start
redis_start

say "building the services ($PROFILE profile)"
(cd "$MESH_REPO" && cargo build --locked --profile "$PROFILE" \
  -p mesh-session -p mesh-ratelimit -p mesh-audit -p mesh-data --bins >&2)
case "$PROFILE" in dev) TARGET=debug ;; *) TARGET=$PROFILE ;; esac
BIN_DIR="${CARGO_TARGET_DIR:-$MESH_REPO/target}/$TARGET"

mkdir -p "$RUN_DIR"
redis_urls=$(for p in $MESH_REDIS_PORTS; do printf '127.0.0.1:%s,' "$p"; done)
export MESH_REDIS_URLS=${redis_urls%,}
export MESH_DATABASE_WRITE_URL="postgres://mesh:$MESH_PG_PASSWORD@127.0.0.1:$MESH_PG_PRIMARY_PORT/mesh"
export MESH_DATABASE_READ_URLS="postgres://mesh:$MESH_PG_PASSWORD@127.0.0.1:$MESH_PG_REPLICA_PORT/mesh"
export MESH_RATELIMIT_RULES="$MESH_REPO/deploy/local/ratelimit.yaml"
# Downstream endpoints, the same for every service: session calls ratelimit
# and audit; data calls all three (mesh-data refuses to start without
# MESH_SESSION_ADDR: every data call is authenticated).
export MESH_SESSION_ADDR=http://127.0.0.1:50051
export MESH_RATELIMIT_ADDR=http://127.0.0.1:50052
export MESH_AUDIT_ADDR=http://127.0.0.1:50053

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

for entry in "${SERVICES[@]}"; do
  svc=${entry%%:*}; port=${entry##*:}
  bin="$BIN_DIR/mesh-$svc" pid="$RUN_DIR/$svc.pid" log="$RUN_DIR/$svc.log"
  if alive "$pid"; then
    if [ "$bin" -nt "$pid" ]; then
      say "restarting mesh-$svc (rebuilt)"
      kill -TERM "$(cat "$pid")"; for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
    else
      continue
    fi
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is taken by another process; mesh-$svc cannot start"
  fi
  MESH_LISTEN_ADDR="127.0.0.1:$port" MESH_METRICS_ADDR="127.0.0.1:$((port + 1000))" \
    setsid "$bin" >>"$log" 2>&1 </dev/null 9>&- &
  echo $! >"$pid"
done

for entry in "${SERVICES[@]}"; do
  svc=${entry%%:*}; port=${entry##*:}
  for i in $(seq 1 120); do
    GRPCURL -plaintext -max-time 1 -d '{"service":"readiness"}' "127.0.0.1:$port" grpc.health.v1.Health/Check 2>/dev/null \
      | grep -q '"SERVING"' && break
    alive "$RUN_DIR/$svc.pid" || { tail -n 20 "$RUN_DIR/$svc.log" >&2; die "mesh-$svc exited"; }
    [ "$i" = 120 ] && { tail -n 20 "$RUN_DIR/$svc.log" >&2; die "mesh-$svc not ready after 60s"; }
    sleep 0.5
  done
done

cat <<INFO

mesh is up.
  session    127.0.0.1:50051   metrics http://127.0.0.1:51051/metrics
  ratelimit  127.0.0.1:50052   metrics http://127.0.0.1:51052/metrics   rules $MESH_RATELIMIT_RULES (hot-reloaded)
  audit      127.0.0.1:50053   metrics http://127.0.0.1:51053/metrics
  data       127.0.0.1:50054   metrics http://127.0.0.1:51054/metrics
  postgres   primary 127.0.0.1:$MESH_PG_PRIMARY_PORT, replica 127.0.0.1:$MESH_PG_REPLICA_PORT (database mesh, user mesh)
  redis      cluster on 127.0.0.1 ports ${MESH_REDIS_PORTS// /,}
  logs       $RUN_DIR/<service>.log
  traces     ${OTEL_EXPORTER_OTLP_ENDPOINT:-not exported (set OTEL_EXPORTER_OTLP_ENDPOINT, e.g. http://127.0.0.1:4317)}
  grpcurl    $MESH_TOOLS_DIR/venv/bin/grpcurl -plaintext 127.0.0.1:50052 list

Stop everything with deploy/local/down.sh
INFO
