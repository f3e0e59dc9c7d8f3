#!/usr/bin/env bash
# The dependency policy (deny.toml) for CI: licences, bans (duplicate
# versions warn, wildcards fail) and sources (crates.io only). Installs
# cargo-deny from crates.io into the project's tool directory on first use.
# Advisories are left out: they need the RustSec database from GitHub, which
# CI cannot reach (see deny.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

tools=$PWD/.local/tools/cargo
if [ ! -x "$tools/bin/cargo-deny" ]; then
  cargo install --locked cargo-deny --version 0.20.2 --root "$tools"
fi
[ "$#" -gt 0 ] || set -- licenses bans sources
exec "$tools/bin/cargo-deny" --locked check "$@"
