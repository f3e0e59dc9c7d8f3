#!/usr/bin/env bash
# Redis's cost of one rate-limit decision, script against script: each
# check.lua given runs N times under redis-benchmark (64 connections, one
# fixed-window descriptor, keys rotating over 10,000 counters in one slot of
# node 7000), alternating, 3 rounds. Prints Redis's own EVALSHA time and the
# CPU of the master and of the replicas per decision. PIPELINE=k sends k
# commands per write (redis-benchmark -P; default 1, as fred sends EVALSHA:
# it flushes the socket after every script command), so the difference
# between PIPELINE=1 and PIPELINE=8 is Redis's cost of one read and one
# write per decision.
#
#   libs/bench/scripts/lua-ab.sh <(git show HEAD~1:services/ratelimit/src/lua/check.lua) \
#                                services/ratelimit/src/lua/check.lua
#
# Needs the local cluster (deploy/local/infra.sh start redis) and bc.
set -euo pipefail
N=${N:-100000}
PIPELINE=${PIPELINE:-1}
MASTER=${MASTER:-7000}
REPLICAS=${REPLICAS:-"7003 7004 7005"}
cpu() { local t=0 v; for p in "$@"; do
  v=$(redis-cli -p "$p" INFO cpu | awk -F: '/^used_cpu_(sys|user):/ {s+=$2} END {print s}')
  t=$(echo "$t + $v" | bc -l); done; echo "$t"; }
# A hash tag the master owns.
tag=""
for i in $(seq 0 200); do
  if [[ $(redis-cli -p "$MASTER" EXISTS "{ab$i}") != *MOVED* ]]; then tag="ab$i"; break; fi
done
[[ -n $tag ]] || { echo "no hash tag on $MASTER" >&2; exit 1; }
files=("$@"); texts=()
for f in "${files[@]}"; do texts+=("$(cat "$f")"); done
for round in 1 2 3; do
  for i in "${!files[@]}"; do
    sha=$(redis-cli -p "$MASTER" SCRIPT LOAD "${texts[$i]}")
    redis-cli -p "$MASTER" CONFIG RESETSTAT >/dev/null
    m0=$(cpu "$MASTER"); r0=$(cpu $REPLICAS)
    rps=$(redis-benchmark -p "$MASTER" -c 64 -P "$PIPELINE" -n "$N" -r 10000 -q --csv \
      EVALSHA "$sha" 1 "lua-ab$i:{$tag}:__rand_int__" "" 60000 "" 1 100000000 60000 100000000 1 0 |
      tail -1 | cut -d, -f2 | tr -d '"')
    m1=$(cpu "$MASTER"); r1=$(cpu $REPLICAS)
    us=$(redis-cli -p "$MASTER" INFO commandstats | grep evalsha | sed 's/.*usec_per_call=\([0-9.]*\).*/\1/')
    printf "round %d script %d (-P %d): %8.0f calls/s  EVALSHA %6.2f µs  master %6.2f µs/decision  replicas %6.2f µs/decision\n" \
      "$round" "$((i + 1))" "$PIPELINE" "$rps" "$us" "$(echo "($m1-$m0)*1000000/$N" | bc -l)" "$(echo "($r1-$r0)*1000000/$N" | bc -l)"
  done
done
