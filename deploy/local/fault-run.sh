#!/usr/bin/env bash
# The fault run: mixed load over the four services (sessions created,
# validated and revoked, rate-limit checks, audit appends, data puts and gets)
# while, in turn, a Redis master is SIGKILLed (failover), a third of the
# slots are resharded, the PostgreSQL replica and then the primary are
# stopped and started, and service instances are SIGKILLed and restarted.
# It prints errors by status code per phase and the time to recover, then
# checks everything the load generator saw acknowledged (libs/bench/src/bin/
# fault.rs says what, and what counts as a wrong answer). Exit status 0 only
# when nothing acknowledged was lost and no answer was wrong.
#
#   deploy/local/fault-run.sh                        # build (release), run, report
#   MESH_FAULT_NO_BUILD=1 deploy/local/fault-run.sh  # reuse target/release as it is
#   deploy/local/fault-run.sh --workers 8 --kill data   # options of target/release/fault
#
# Loopback only, a few minutes. It never touches the shared local stack
# (55432/55433, 7000-7005) or other tests' infrastructure: it starts its own
# PostgreSQL pair and Redis Cluster on free ports in a temporary directory
# (through deploy/local/infra.sh) and stops and removes them on exit.
# The report goes to stdout and $MESH_FAULT_OUT/report.md (default
# target/fault-run), next to each service's log.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

say() { printf '%s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

# Nothing listens on 127.0.0.1:$1.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Six consecutive Redis ports with their cluster bus ports (+10000), and two
# PostgreSQL ports, all free and below the ephemeral range (as
# mesh_testkit::PrivateInfra picks them).
pick_ports() {
  local try base i ok
  for try in $(seq 1 200); do
    base=$((10000 + RANDOM % 6000)); ok=1
    for i in 0 1 2 3 4 5; do
      if ! port_free $((base + i)) || ! port_free $((base + i + 10000)); then ok=0; break; fi
    done
    [ "$ok" = 1 ] && break
  done
  [ "$ok" = 1 ] || die "no free redis ports found ($try tries)"
  REDIS_PORTS="$base $((base + 1)) $((base + 2)) $((base + 3)) $((base + 4)) $((base + 5))"
  for try in $(seq 1 200); do
    base=$((27000 + RANDOM % 5000))
    if port_free "$base" && port_free $((base + 1)); then PG_PORT=$base; return; fi
  done
  die "no free postgres ports found"
}

OUT=${MESH_FAULT_OUT:-$REPO/target/fault-run}
BIN_DIR="${CARGO_TARGET_DIR:-$REPO/target}/release"
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT/pids" "$OUT/report.md"

if [ "${MESH_FAULT_NO_BUILD:-0}" != 1 ]; then
  say "building release binaries"
  (cd "$REPO" && cargo build --release --locked \
    -p mesh-bench -p mesh-session -p mesh-ratelimit -p mesh-audit -p mesh-data \
    --bin fault --bin mesh-session --bin mesh-ratelimit --bin mesh-audit --bin mesh-data >&2)
fi
for b in fault mesh-session mesh-ratelimit mesh-audit mesh-data; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing (run without MESH_FAULT_NO_BUILD=1)"
done

pick_ports
STATE=$(mktemp -d /tmp/mesh-fault-XXXXXX)
chmod 755 "$STATE" # the postgres user must reach its data directory inside
export MESH_LOCAL_DIR=$STATE
export MESH_PG_PRIMARY_PORT=$PG_PORT
export MESH_PG_REPLICA_PORT=$((PG_PORT + 1))
export MESH_REDIS_PORTS=$REDIS_PORTS
export MESH_TOOLS_DIR=${MESH_TOOLS_DIR:-$REPO/.local/tools}

# shellcheck disable=SC2317 # (called by the trap)
cleanup() {
  local rc=$?
  trap - EXIT
  # Services the run started and could not stop itself (it was killed).
  if [ -f "$OUT/pids" ]; then
    local pid
    while read -r pid; do
      if grep -qs '^mesh-' "/proc/$pid/comm"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done <"$OUT/pids"
  fi
  say "stopping the private infrastructure"
  bash "$HERE/infra.sh" stop all >/dev/null 2>&1 || say "warning: infra.sh stop all failed ($STATE)"
  # infra.sh keeps PostgreSQL's data under /var/tmp when the postgres user
  # cannot write to the state directory (lib.sh pg_root).
  rm -rf "$STATE" "/var/tmp/mesh-pg-$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting private infrastructure in $STATE: postgres $MESH_PG_PRIMARY_PORT/$MESH_PG_REPLICA_PORT, redis ${MESH_REDIS_PORTS// /,}"
bash "$HERE/infra.sh" start all

COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=""
if [ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]; then DIRTY=" (with uncommitted changes)"; fi
{
  echo "## Fault run $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Command: \`deploy/local/fault-run.sh${*:+ $*}\` at commit $COMMIT$DIRTY, $(nproc) cores."
  echo
} | tee "$OUT/report.md"

set +e
timeout 1800 "$BIN_DIR/fault" --bin-dir "$BIN_DIR" --logs "$OUT" "$@" | tee -a "$OUT/report.md"
status=${PIPESTATUS[0]}
set -e
[ "$status" = 124 ] && say "the fault run did not finish within 30 minutes"

# The chain once more, offline, straight from the primary.
# shellcheck disable=SC2016 # (the backquotes are Markdown)
if verify=$("$BIN_DIR/mesh-audit" verify \
  --database-url "postgres://mesh:${MESH_PG_PASSWORD:-mesh}@127.0.0.1:$MESH_PG_PRIMARY_PORT/mesh" \
  --schema fault_audit 2>&1); then
  printf '\n`mesh-audit verify` (offline, whole chain): ok: `%s`\n' "$verify" | tee -a "$OUT/report.md"
else
  printf '\n`mesh-audit verify` (offline, whole chain): **failed**: `%s`\n' "$verify" | tee -a "$OUT/report.md"
  [ "$status" = 0 ] && status=1
fi
say "report: $OUT/report.md; service logs: $OUT/*.log"
exit "$status"
