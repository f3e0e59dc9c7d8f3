#!/usr/bin/env bash
# `buf breaking` against a previous commit: fails when proto/ (as it is in the
# working tree) breaks wire or source compatibility with that commit under
# buf.yaml's `breaking` rules (FILE).
#
#   .ci/buf-breaking.sh                      # against HEAD~1, the previous commit on main
#   MESH_BUF_AGAINST=origin/main .ci/buf-breaking.sh   # e.g. on a pull request branch
#
# First it proves the check can fail: a copy of proto/ with one field renamed
# must be reported as breaking, or the script fails.
#
# Works in a shallow CI clone (fetches the one commit it needs) and on a
# repository whose first commit this is (nothing to compare: says so, exit 0).
# The previous tree is read with `git archive` into a temporary directory, so
# the working tree and the index are never touched.
#
# Environment: MESH_BUF_AGAINST (default HEAD~1), BUF (default: the buf that
#              deploy/local/tools.sh installs, else buf on PATH).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AGAINST=${MESH_BUF_AGAINST:-HEAD~1}
BUF=${BUF:-$REPO/.local/tools/npm/node_modules/.bin/buf}
if [ ! -x "$BUF" ]; then
  BUF=$(command -v buf) || { echo "buf-breaking: no buf (run deploy/local/tools.sh)" >&2; exit 1; }
fi
cd "$REPO"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

resolves() { git rev-parse -q --verify "$1^{commit}" >/dev/null 2>&1; }

# ---------------------------------------------------------------- self-test
# Rename the first field of the first mesh message: buf must call it breaking.
mkdir -p "$WORK/renamed"
cp -R buf.yaml proto "$WORK/renamed/"
proto=$(find "$WORK/renamed/proto/mesh" -name '*.proto' | sort | head -n1)
python3 - "$proto" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
m = re.search(r"^(\s+(?:repeated |optional )?[\w.]+ )(\w+)( = \d+;)", text, re.M)
if not m:
    sys.exit(f"no field to rename in {path}")
open(path, "w").write(text[:m.start(2)] + m.group(2) + "_renamed" + text[m.end(2):])
PY
# buf exits 100 when it finds breaking changes (anything else: it did not run).
rc=0
(cd "$WORK/renamed" && "$BUF" breaking --against "$REPO" >"$WORK/self-test.log" 2>&1) || rc=$?
if [ "$rc" -ne 100 ] || ! grep -q '_renamed' "$WORK/self-test.log"; then
  echo "buf-breaking: self-test failed: a renamed field in ${proto#"$WORK/renamed/"} was not reported (buf exit $rc)" >&2
  cat "$WORK/self-test.log" >&2
  exit 1
fi

# ---------------------------------------------------------------- the check
if ! resolves "$AGAINST" && [ "$(git rev-parse --is-shallow-repository)" = true ]; then
  echo "buf-breaking: shallow clone, fetching the history $AGAINST needs" >&2
  case $AGAINST in
    HEAD~*) git fetch -q --deepen="${AGAINST#HEAD~}" ;;
    *) git fetch -q --depth=1 origin "$AGAINST" || git fetch -q --deepen=1 ;;
  esac
fi
if ! resolves "$AGAINST"; then
  if [ "$AGAINST" = HEAD~1 ] && [ "$(git rev-list --count HEAD)" = 1 ]; then
    echo "buf-breaking: HEAD is the first commit, nothing to compare against"
    exit 0
  fi
  echo "buf-breaking: cannot resolve $AGAINST" >&2
  exit 1
fi
commit=$(git rev-parse --short "$AGAINST^{commit}")
mkdir -p "$WORK/against"
if ! git cat-file -e "$commit:proto" 2>/dev/null; then
  echo "buf-breaking: $AGAINST ($commit) has no proto/, nothing to compare against"
  exit 0
fi
git archive "$commit" -- buf.yaml proto | tar -x -C "$WORK/against"
"$BUF" breaking --against "$WORK/against"
echo "buf-breaking: proto/ is compatible with $AGAINST ($commit) under buf.yaml's breaking rules"
