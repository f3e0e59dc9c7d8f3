#!/usr/bin/env bash
# The dependency policy (deny.toml) for CI: licences, bans (duplicate
# versions warn, wildcards fail) and sources (crates.io only), with
# cargo-deny 0.20.2 (installed by .ci/rust-tool.sh on first use).
# Advisories are left out: they need the RustSec database from GitHub, which
# CI cannot reach (see deny.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

deny=$(.ci/rust-tool.sh cargo-deny 0.20.2)
[ "$#" -gt 0 ] || set -- licenses bans sources
exec "$deny" --locked check "$@"
