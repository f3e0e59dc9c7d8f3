#!/usr/bin/env bash
# Bounded fuzzing of every target in fuzz/ (see fuzz/README.md), for CI:
# builds them with cargo-fuzz on the stable toolchain, then runs each from
# its checked-in corpus (fuzz/corpus/<target>, read only) for an equal share
# of MESH_FUZZ_SECONDS (default 110: all targets together, under 2 minutes).
# A crash, panic, timeout or out-of-memory fails the script and leaves the
# input in fuzz/artifacts/<target>/: fix the code, then add it to the corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-fuzz 0.13.2 (installed by .ci/rust-tool.sh on first use).
fuzz=$(.ci/rust-tool.sh cargo-fuzz 0.13.2)
export PATH=${fuzz%/*}:$PATH
# cargo fuzz passes -Z flags to rustc; CI and new machines have only the
# stable toolchain, which accepts them with RUSTC_BOOTSTRAP. No sanitizer:
# the stable toolchain ships no sanitizer runtimes, and the code under test
# has no `unsafe` (the lints deny it); libFuzzer still catches panics
# (overflow checks on: `--debug-assertions`), hangs and memory blow-ups.
export RUSTC_BOOTSTRAP=1
# Unoptimised (`--dev`): the release build of every service crate with
# coverage instrumentation took 20 minutes on a loaded CI-sized machine; the
# budget is in seconds, so slower runs only mean fewer executions.
flags=(--fuzz-dir fuzz --target-dir "$PWD/fuzz/target" --sanitizer none --dev --debug-assertions)

budget=${MESH_FUZZ_SECONDS:-110}
mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
per=$(( budget / ${#targets[@]} ))
[ "$per" -ge 1 ] || per=1

cargo fuzz build "${flags[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
  printf '%s: %ss\n' "$t" "$per"
  mkdir -p "$work/$t"
  # New inputs go to the first (scratch) directory; the checked-in corpus is
  # only read. -timeout: one input taking 5 s is a hang.
  if ! cargo fuzz run "${flags[@]}" "$t" "$work/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$per" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$work/$t.log" 2>&1; then
    tail -n 40 "$work/$t.log"
    failed+=("$t")
  else
    grep -E '^stat::number_of_executed_units|^Done' "$work/$t.log" | tr '\n' ' '; echo
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz targets failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
