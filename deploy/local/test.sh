#!/usr/bin/env bash
# Runs the full test suite: starts the local infrastructure (PostgreSQL pair,
# Redis Cluster) and tools if needed, then every test of the workspace.
# Extra arguments go to cargo nextest, e.g. `deploy/local/test.sh -p mesh-ratelimit`.
source "$(dirname "$0")/lib.sh"
(
  with_lock
  ensure_tools
  pg_start
  redis_start
)
cd "$MESH_REPO"
if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install --locked cargo-nextest >&2
fi
exec cargo nextest run --workspace --locked "$@"
