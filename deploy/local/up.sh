#!/usr/bin/env bash
# Brings the whole mesh up on this machine, without containers: PostgreSQL
# primary + replica, a 6-node Redis Cluster, a local OTLP trace sink
# (mesh-trace sink) and the four services built from this checkout.
#
# Idempotent: what runs already is left running, except a process whose
# binary was rebuilt or whose environment changed since it started (each
# one's is recorded in .local/run/<name>.env): that one is restarted, and
# up.sh says which variables changed. OTEL_* and RUST_LOG from this
# environment reach every service; OTEL_EXPORTER_OTLP_ENDPOINT defaults to
# the local sink, so `mesh-trace --last` prints the last request's trace.
#
#   MESH_PROFILE=release deploy/local/up.sh    # optimised build (default: dev)
#   RUST_LOG=debug deploy/local/up.sh          # restarts the services with debug logs
#   MESH_LOCAL_TLS=1 deploy/local/up.sh        # mutual TLS on every hop: a local CA and one
#                                              # certificate per service in .local/tls (openssl);
#                                              # run again without it to go back to plaintext
#   OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 deploy/local/up.sh   # your own collector
#                                              # (then set MESH_TRACE_SINK_ADDR to another port)
source "$(dirname "$0")/lib.sh"

PROFILE=${MESH_PROFILE:-dev}
SERVICES=(session:50051 ratelimit:50052 audit:50053 data:50054)

with_lock
ensure_tools
pg_start
redis_start

say "building the services ($PROFILE profile)"
(cd "$MESH_REPO" && cargo build --locked --profile "$PROFILE" \
  -p mesh-session -p mesh-ratelimit -p mesh-audit -p mesh-data -p mesh-trace --bins >&2)
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
# MESH_LOCAL_TLS=1: every service presents .local/tls/<service>.pem (identity
# spiffe://mesh.local/ns/default/sa/<service>), requires a certificate from the
# local CA of its callers and dials the others over TLS (the addresses above stay
# as they are: the client dials TLS because MESH_TLS_* are set). Plaintext health
# for probes stays on each gRPC port + 2000. The `ops` certificate is for you
# (grpcurl), and the one identity allowed admin RPCs.
TLS_DIR=""
if [ "${MESH_LOCAL_TLS:-0}" = 1 ]; then
  TLS_DIR="$MESH_LOCAL_DIR/tls"
  tls_local_pki "$TLS_DIR" session ratelimit audit data ops
  export MESH_TLS_CA_FILE="$TLS_DIR/ca.pem" MESH_REQUIRE_TLS=true
  export MESH_ADMIN_IDENTITIES=${MESH_ADMIN_IDENTITIES:-$(spiffe_id ops)}
fi
# Traces go to the local sink unless this environment names another endpoint.
export OTEL_EXPORTER_OTLP_ENDPOINT=${OTEL_EXPORTER_OTLP_ENDPOINT:-http://$MESH_TRACE_SINK_ADDR}
# Spans leave in batches every 500 ms here (the SDK's default is 5 s), so a
# call's trace can be printed right after its answer.
export OTEL_BSP_SCHEDULE_DELAY=${OTEL_BSP_SCHEDULE_DELAY:-500}

traces_endpoint=${OTEL_EXPORTER_OTLP_TRACES_ENDPOINT:-$OTEL_EXPORTER_OTLP_ENDPOINT}
if [ "$traces_endpoint" = "http://$MESH_TRACE_SINK_ADDR" ] && [ "${OTEL_TRACES_EXPORTER:-otlp}" = otlp ]; then
  svc_ensure trace-sink "${MESH_TRACE_SINK_ADDR##*:}" "listen=$MESH_TRACE_SINK_ADDR file=$MESH_TRACE_FILE" \
    "$BIN_DIR/mesh-trace" sink --listen "$MESH_TRACE_SINK_ADDR" --file "$MESH_TRACE_FILE"
  [ "$SVC_ACTION" = running ] || say "trace sink $SVC_ACTION on $MESH_TRACE_SINK_ADDR"
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/${MESH_TRACE_SINK_ADDR%:*}/${MESH_TRACE_SINK_ADDR##*:}") 2>/dev/null && break
    svc_alive trace-sink || { tail -n 5 "$RUN_DIR/trace-sink.log" >&2; die "the trace sink exited"; }
    [ "$i" = 100 ] && die "the trace sink is not listening on $MESH_TRACE_SINK_ADDR after 10s"
    sleep 0.1
  done
elif svc_alive trace-sink; then
  say "stopping the trace sink (traces go to $traces_endpoint)"
  svc_stop trace-sink 10
fi

# Audit signs a checkpoint of its chain head every 10 s into .local/audit/checkpoints
# with a key made here once (kept in .local, never in PostgreSQL); check with
#   mesh-audit verify --checkpoints .local/audit/checkpoints --public-key .local/audit/checkpoint.pub
AUDIT_DIR="$MESH_LOCAL_DIR/audit"
if [ ! -f "$AUDIT_DIR/checkpoint.key" ]; then
  (umask 077 && mkdir -p "$AUDIT_DIR")
  rm -f "$AUDIT_DIR/checkpoint.pub"
  "$BIN_DIR/mesh-audit" keygen --name mesh.local/audit \
    --private-key "$AUDIT_DIR/checkpoint.key" --public-key "$AUDIT_DIR/checkpoint.pub" >/dev/null
fi

declare -A action
for entry in "${SERVICES[@]}"; do
  svc=${entry%%:*}; port=${entry##*:}
  export MESH_LISTEN_ADDR="127.0.0.1:$port" MESH_METRICS_ADDR="127.0.0.1:$((port + 1000))"
  if [ "$svc" = audit ]; then
    export MESH_AUDIT_CHECKPOINT_DIR="$AUDIT_DIR/checkpoints" MESH_AUDIT_CHECKPOINT_KEY_FILE="$AUDIT_DIR/checkpoint.key" \
      MESH_AUDIT_CHECKPOINT_INTERVAL_MS=10000
  else
    unset MESH_AUDIT_CHECKPOINT_DIR MESH_AUDIT_CHECKPOINT_KEY_FILE MESH_AUDIT_CHECKPOINT_INTERVAL_MS
  fi
  if [ -n "$TLS_DIR" ]; then
    export MESH_TLS_CERT_FILE="$TLS_DIR/$svc.pem" MESH_TLS_KEY_FILE="$TLS_DIR/$svc-key.pem"
  fi
  svc_ensure "$svc" "$port" "$(svc_env)" "$BIN_DIR/mesh-$svc"
  action[$svc]=$SVC_ACTION
done

for entry in "${SERVICES[@]}"; do
  svc=${entry%%:*}; port=${entry##*:}
  # With TLS, asked over TLS as ops (grpcurl needs reflection, which the
  # plaintext health-only port does not serve).
  # shellcheck disable=SC2046  # the flags are words
  for i in $(seq 1 120); do
    GRPCURL $(grpcurl_flags "$TLS_DIR") -max-time 1 -d '{"service":"readiness"}' "127.0.0.1:$port" grpc.health.v1.Health/Check 2>/dev/null \
      | grep -q '"SERVING"' && break
    svc_alive "$svc" || { tail -n 20 "$RUN_DIR/$svc.log" >&2; die "mesh-$svc exited"; }
    [ "$i" = 120 ] && { tail -n 20 "$RUN_DIR/$svc.log" >&2; die "mesh-$svc not ready after 60s"; }
    sleep 0.5
  done
done

env_file=$(local_env_file "$BIN_DIR" "$TLS_DIR")
if [ -n "$TLS_DIR" ]; then
  transport="mutual TLS on every hop (MESH_LOCAL_TLS=1): CA and certificates in $TLS_DIR,
             admin RPCs for $MESH_ADMIN_IDENTITIES, plaintext health only on each port + 2000"
else
  transport="plaintext (MESH_LOCAL_TLS=1 deploy/local/up.sh for mutual TLS)"
fi

cat <<INFO

mesh is up.
  session    127.0.0.1:50051   metrics http://127.0.0.1:51051/metrics   (${action[session]})
  ratelimit  127.0.0.1:50052   metrics http://127.0.0.1:51052/metrics   (${action[ratelimit]})   rules $MESH_RATELIMIT_RULES (hot-reloaded)
  audit      127.0.0.1:50053   metrics http://127.0.0.1:51053/metrics   (${action[audit]})
  data       127.0.0.1:50054   metrics http://127.0.0.1:51054/metrics   (${action[data]})
  postgres   primary 127.0.0.1:$MESH_PG_PRIMARY_PORT, replica 127.0.0.1:$MESH_PG_REPLICA_PORT (database mesh, user mesh)
  redis      cluster on 127.0.0.1 ports ${MESH_REDIS_PORTS// /,}
  logs       $RUN_DIR/<service>.log (each service logs at start where its traces go)
  traces     $(traces_banner)
  transport  $transport
  grpcurl    $MESH_TOOLS_DIR/venv/bin/grpcurl $(grpcurl_flags "$TLS_DIR") 127.0.0.1:50052 list

Tools (mesh-audit verify|export|retention, mesh-trace) with the stack's database URL:
  source $env_file
  mesh-audit verify --checkpoints $AUDIT_DIR/checkpoints --public-key $AUDIT_DIR/checkpoint.pub

Stop everything with deploy/local/down.sh
INFO
