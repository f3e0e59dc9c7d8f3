#!/usr/bin/env bash
# Regenerates BENCHMARKS.md at the repository root: starts the local
# infrastructure if it is down, builds the benchmark programs and the service
# binaries once (release), runs each program in libs/bench/src/bin in turn
# with one short shape, and writes their Markdown output under a header that
# names the commit, the machine and the toolchain. Every program also appends
# its CPU-per-call rows as JSON lines to target/benchmarks/results.jsonl
# (MESH_BENCH_JSON), and the last one, capacity, computes the capacity model
# from them. The peer comparison runs only with LIMITADOR_BIN set (a
# limitador-server built outside this repository: libs/bench/src/bin/peer.rs).
#
#   libs/bench/scripts/benchmarks.sh                                  # all, ~13 min on 2 cores + the build
#   BENCH_ONLY="ratelimit session" libs/bench/scripts/benchmarks.sh   # a subset
#   BENCH_DURATION=2 BENCH_WARMUP=1 libs/bench/scripts/benchmarks.sh  # a quick check
#
# Environment (defaults):
#   BENCH_ONLY          benchmarks to run, in this order    ("ratelimit session audit client data scaling peer capacity")
#   BENCH_DURATION      measured seconds per target          (5)
#   BENCH_WARMUP        warm-up seconds per target           (2; audit's is fixed at 2)
#   BENCH_CONCURRENCY   concurrent callers                   (64; client runs 1 and this)
#   BENCH_AUDIT_ROWS    events seeded before audit's queries (100000)
#   BENCH_DATA_DOCS     documents seeded for data's queries  (100000)
#   BENCH_CLIENT_ROUNDS alternating rounds per client level  (3)
#   BENCH_TIMEOUT       seconds before a benchmark is killed (900)
#   LIMITADOR_BIN       the peer's limitador-server binary  (unset: peer is skipped)
#
# A benchmark that fails gets its exit status and the end of its stderr in its
# section; the others still run, the file is still written, and the script
# exits non-zero. Each program's stderr is kept in target/benchmarks/<name>.log.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
ROOT=$PWD

ALL="ratelimit session audit client data scaling peer capacity"
ONLY=${BENCH_ONLY:-$ALL}
DURATION=${BENCH_DURATION:-5}
WARMUP=${BENCH_WARMUP:-2}
CONCURRENCY=${BENCH_CONCURRENCY:-64}
AUDIT_ROWS=${BENCH_AUDIT_ROWS:-100000}
DATA_DOCS=${BENCH_DATA_DOCS:-100000}
CLIENT_ROUNDS=${BENCH_CLIENT_ROUNDS:-3}
TIMEOUT=${BENCH_TIMEOUT:-900}
LIMITADOR=${LIMITADOR_BIN:-}
OUT=BENCHMARKS.md
LOGS=target/benchmarks
JSON=$LOGS/results.jsonl

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

for n in "$DURATION" "$WARMUP" "$CONCURRENCY" "$AUDIT_ROWS" "$DATA_DOCS" "$CLIENT_ROUNDS" "$TIMEOUT"; do
  [[ $n =~ ^[0-9]+$ ]] || die "not a whole number: $n"
done
read -r -a benches <<<"$ONLY"
[[ ${#benches[@]} -gt 0 ]] || die "BENCH_ONLY names no benchmark"
for b in "${benches[@]}"; do
  [[ " $ALL " == *" $b "* ]] || die "unknown benchmark $b (known: $ALL)"
done

# The exact command line of each benchmark, run from the repository root.
bench_args() {
  case $1 in
    ratelimit | session)
      echo "--concurrency $CONCURRENCY --duration $DURATION --warmup $WARMUP" ;;
    audit)
      echo "--concurrency $CONCURRENCY --seconds $DURATION --rows $AUDIT_ROWS" ;;
    client)
      echo "--concurrency 1,$CONCURRENCY --duration-secs $DURATION --warmup-secs $WARMUP --rounds $CLIENT_ROUNDS" ;;
    data)
      echo "--concurrency $CONCURRENCY --seconds $DURATION --warmup $WARMUP --docs $DATA_DOCS" ;;
    scaling)
      echo "--duration $DURATION --warmup $WARMUP" ;;
    peer)
      echo "--limitador $LIMITADOR --concurrency $CONCURRENCY --duration $DURATION --warmup 1" ;;
    capacity)
      echo "--input $JSON" ;;
  esac
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", b - a }'; }
human() { local s=$1; if ((s >= 60)); then printf '%d min %02d s' $((s / 60)) $((s % 60)); else printf '%d s' "$s"; fi; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
# The program's headings one level down, so they nest under its section.
nest_headings() { awk '/^```/ { fence = !fence } !fence && /^#/ { $0 = "#" $0 } { print }'; }

mkdir -p "$LOGS"
: >"$JSON"
export MESH_BENCH_JSON=$JSON
tmp=$(mktemp "$LOGS/BENCHMARKS.md.XXXXXX")
body=$(mktemp "$LOGS/body.XXXXXX")
trap 'rm -f "$tmp" "$body"' EXIT
started=$(now)
load_before=$(loadavg)

say "local infrastructure (deploy/local/infra.sh start all)"
bash deploy/local/infra.sh start all >"$LOGS/infra.log" 2>&1 ||
  die "deploy/local/infra.sh start all failed, see $LOGS/infra.log"

say "release build (log: $LOGS/build.log)"
cargo build --release --locked -p mesh-bench -p mesh-ratelimit -p mesh-session -p mesh-audit -p mesh-data \
  2>&1 | tee "$LOGS/build.log" >&2 || die "cargo build failed, see $LOGS/build.log"

# The machine and the tree, before any load.
date_utc=$(date -u '+%Y-%m-%d %H:%M UTC')
commit=$(git rev-parse --short=12 HEAD)
subject=$(git log -1 --format=%s)
((${#subject} <= 80)) || subject="${subject:0:79}…"
mapfile -t changed < <(git --no-optional-locks status --porcelain --untracked-files=no -- . ":(exclude)$OUT" | cut -c4-)
if ((${#changed[@]} == 0)); then
  tree="clean"
else
  tree="dirty (uncommitted changes to ${#changed[@]} tracked files: $(printf "\`%s\` " "${changed[@]:0:10}")"
  ((${#changed[@]} <= 10)) || tree+="… "
  tree="${tree% })"
fi
cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
[[ -n $cpu_model ]] || cpu_model=$(lscpu 2>/dev/null | awk -F': *' '/^Model name/ { print $2; exit }')
cores=$(nproc)
memory=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
kernel=$(uname -sr)
rustc_version=$(rustc --version)

failed=()
summary=""
for b in "${benches[@]}"; do
  if [[ $b == peer && -z $LIMITADOR ]]; then
    say "peer: skipped (LIMITADOR_BIN is not set)"
    {
      echo "## peer"
      echo
      echo "Skipped: \`LIMITADOR_BIN\` was not set. The peer, Kuadrant's limitador-server, is built outside" \
        "this repository (how: [\`libs/bench/src/bin/peer.rs\`](libs/bench/src/bin/peer.rs)); the last" \
        "comparison is in [\`libs/bench/results/peer.md\`](libs/bench/results/peer.md)."
      echo
    } >>"$body"
    summary+="| [peer](#peer) | skipped (LIMITADOR_BIN unset) | 0 s |"$'\n'
    continue
  fi
  read -r -a args <<<"$(bench_args "$b")"
  cmd="target/release/$b ${args[*]}"
  log="$LOGS/$b.log"
  stdout="$LOGS/$b.out"
  load=$(loadavg)
  say "$b: $cmd (stderr: $log)"
  t0=$(now)
  status=0
  timeout --kill-after=30 "$TIMEOUT" "target/release/$b" "${args[@]}" \
    </dev/null >"$stdout" 2>"$log" || status=$?
  secs=$(elapsed "$t0" "$(now)")
  {
    echo "## $b"
    echo
    echo "Program [\`libs/bench/src/bin/$b.rs\`](libs/bench/src/bin/$b.rs);" \
      "longer runs and their history: [\`libs/bench/results/$b.md\`](libs/bench/results/$b.md)."
    echo
    echo '```sh'
    echo "$cmd"
    echo '```'
    echo
    echo "Wall time $(human "$secs"); load average at its start $load."
    echo
    if ((status != 0)); then
      if ((status == 124 || status == 137)); then what="killed after ${TIMEOUT} s by BENCH_TIMEOUT"; else what="exit status $status"; fi
      echo "**Failed: $what.** The end of its stderr (all of it: \`$log\`):"
      echo
      echo '```text'
      if [[ -s $log ]]; then tail -n 30 "$log"; else echo "(nothing on stderr)"; fi
      echo '```'
      echo
      if [[ -s $stdout ]]; then
        echo "What it printed before failing:"
        echo
      fi
    fi
    nest_headings <"$stdout"
    echo
  } >>"$body"
  if ((status == 0)); then
    result="ok"
    say "$b: ok in $(human "$secs")"
  else
    result="**failed** ($what)"
    failed+=("$b")
    say "$b: FAILED ($what) in $(human "$secs"), see $log"
  fi
  summary+="| [$b](#$b) | $result | $(human "$secs") |"$'\n'
done
total=$(elapsed "$started" "$(now)")

{
  cat <<EOF
# Benchmarks

Generated by \`libs/bench/scripts/benchmarks.sh\` (do not edit by hand: run it again).
Each section below is the standard output of one benchmark program in
[\`libs/bench/src/bin\`](libs/bench/src/bin), run one after another on one machine, with its
headings nested one level down. Every program measures its baselines in the same run as
the mesh: a plain tonic echo server (gRPC alone), \`redis-benchmark\` (Redis alone) and
\`pgbench\` (PostgreSQL alone). **The ratios to those baselines are the numbers to compare**
between runs and commits; absolute calls/s and latencies drift with the machine and with
whatever else shares it (hence the load averages). CPU per call comes from \`/proc\`
accounting ([\`libs/bench/src/cpu.rs\`](libs/bench/src/cpu.rs)): the CPU time of every
process on the machine during each measured window, divided by the calls it completed,
split into the load generator, the services, Redis or PostgreSQL, and the rest;
"machine busy" near 100 % means the cores, not the code under test, set the pace. These
runs are short (${DURATION} s measured per target); longer runs, the questions they answered
and older results are in [\`libs/bench/results/*.md\`](libs/bench/results).

- date: $date_utc
- commit: \`$commit\` "$subject", tree $tree
- machine: $cpu_model, $cores cores, $memory memory, $kernel; load average before the run (before the build) $load_before
- toolchain: $rustc_version
- shape: \`BENCH_DURATION=$DURATION BENCH_WARMUP=$WARMUP BENCH_CONCURRENCY=$CONCURRENCY BENCH_AUDIT_ROWS=$AUDIT_ROWS BENCH_DATA_DOCS=$DATA_DOCS BENCH_CLIENT_ROUNDS=$CLIENT_ROUNDS\`; local PostgreSQL primary and replica and a 6-node Redis Cluster (\`deploy/local/infra.sh\`)
- total wall time $(human "$total"), release build included

| benchmark | result | wall time |
| --- | --- | ---: |
EOF
  printf '%s\n' "$summary"
  cat "$body"
} >"$tmp"
chmod 644 "$tmp"
mv "$tmp" "$OUT"
say "wrote $ROOT/$OUT in $(human "$total")"
if ((${#failed[@]} > 0)); then
  die "failed: ${failed[*]} (see $LOGS/<name>.log)"
fi
