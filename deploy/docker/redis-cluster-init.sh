#!/usr/bin/env bash
# One-shot Redis Cluster bootstrap (docker-compose service redis-cluster-init,
# redis image). Idempotent: a cluster formed on an earlier start (volumes kept)
# is only checked (cluster_state:ok on every node, all 16384 slots served),
# so `docker compose up` can run it every time.
#
# Environment:
#   MESH_REDIS_NODES   space-separated host:port of the nodes (6: redis-cli makes
#                      3 masters and gives each one replica)
#   MESH_REDIS_WAIT_S  how long to wait for nodes and for the cluster (default: 120)
set -euo pipefail

read -r -a nodes <<<"${MESH_REDIS_NODES:?MESH_REDIS_NODES must list the cluster nodes}"
wait_s=${MESH_REDIS_WAIT_S:-120}

log() { printf 'redis-cluster-init: %s\n' "$*" >&2; }
host() { printf '%s' "${1%:*}"; }
port() { printf '%s' "${1##*:}"; }
rcli() { local n=$1; shift; redis-cli -h "$(host "$n")" -p "$(port "$n")" "$@"; }
field() { rcli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"; }

[ "${#nodes[@]}" -ge 6 ] || { log "need at least 6 nodes for 3 masters + 3 replicas, got ${#nodes[@]}"; exit 1; }

# CLUSTER MEET takes IP addresses, not names: resolve every node once.
addrs=()
for n in "${nodes[@]}"; do
  ip=""
  for _ in $(seq 1 "$wait_s"); do
    ip=$(getent hosts "$(host "$n")" | awk '{ print $1; exit }') && [ -n "$ip" ] && break
    sleep 1
  done
  [ -n "$ip" ] || { log "cannot resolve $(host "$n")"; exit 1; }
  addrs+=("$ip:$(port "$n")")
done

for n in "${nodes[@]}"; do
  for _ in $(seq 1 "$wait_s"); do
    [ "$(rcli "$n" ping 2>/dev/null)" = PONG ] && break
    sleep 1
  done
  [ "$(rcli "$n" ping 2>/dev/null)" = PONG ] || { log "$n does not answer PING"; exit 1; }
done

cluster_ok() {
  local n
  for n in "${nodes[@]}"; do
    [ "$(field "$n" cluster_state)" = ok ] || return 1
    [ "$(field "$n" cluster_slots_assigned)" = 16384 ] || return 1
  done
}

wait_ok() {
  local _
  for _ in $(seq 1 "$wait_s"); do
    cluster_ok && return 0
    sleep 1
  done
  return 1
}

if cluster_ok; then
  log "cluster already formed (${addrs[*]})"
  exit 0
fi

if [ "$(field "${nodes[0]}" cluster_known_nodes)" = 1 ] && [ "$(field "${nodes[0]}" cluster_slots_assigned)" = 0 ]; then
  log "creating the cluster: ${addrs[*]}"
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
else
  # Formed before (volumes kept) but not ok yet: nodes are still finding each
  # other or failing over. Give it time, then let redis-cli repair slot coverage.
  log "cluster exists but is not ok yet; waiting"
  if ! wait_ok; then
    log "still not ok: running redis-cli --cluster fix"
    redis-cli --cluster fix "${addrs[0]}" --cluster-yes >/dev/null || true
  fi
fi

if wait_ok && redis-cli --cluster check "${addrs[0]}" >/dev/null; then
  log "cluster ok"
  exit 0
fi
log "cluster did not reach cluster_state:ok within ${wait_s}s"
rcli "${nodes[0]}" cluster nodes >&2 || true
exit 1
