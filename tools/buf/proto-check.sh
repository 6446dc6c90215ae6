#!/usr/bin/env bash
# `make proto-check`: buf lint on protos/, then buf breaking against the protos of
# the baseline, the contract clients already build on (docs/protocol.md,
# "Versioning"). The baseline, first that applies:
#   1. $PROTO_AGAINST, any git ref (e.g. to check a release branch by hand);
#   2. the last release tag (v*) reachable from HEAD;
#   3. the merge base with main (origin/main, else a local main), when HEAD has
#      commits of its own: what this branch changes;
#   4. the first commit that has protos/: on main before any release, nothing
#      published since the API began may break.
# The baseline's protos/ is exported with `git archive`, so this works in any
# clone with history (a fresh `git clone` has it) and needs no network.
set -euo pipefail
trap 'echo "proto-check: failed at line $LINENO" >&2' ERR
cd "$(dirname "$0")/../.."
BUF=${BUF:-tools/buf/node_modules/.bin/buf}

"$BUF" lint
echo "proto-check: buf lint passed"

if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "proto-check: not a git checkout, no baseline to compare with: buf breaking skipped" >&2
  exit 0
fi

commit_of() { git rev-parse --verify --quiet "$1^{commit}" 2>/dev/null; }

head=$(git rev-parse HEAD)
base="" why=""
if [ -n "${PROTO_AGAINST:-}" ]; then
  base=$(commit_of "$PROTO_AGAINST") || { echo "proto-check: PROTO_AGAINST=$PROTO_AGAINST is not a commit" >&2; exit 2; }
  why="PROTO_AGAINST=$PROTO_AGAINST"
fi
if [ -z "$base" ] && tag=$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null); then
  base=$(commit_of "$tag") why="the last release tag $tag"
fi
if [ -z "$base" ]; then
  for main in origin/main main; do
    if commit_of "$main" >/dev/null && mb=$(git merge-base HEAD "$main" 2>/dev/null) && [ "$mb" != "$head" ]; then
      base=$mb why="the merge base with $main"
      break
    fi
  done
fi
if [ -z "$base" ]; then
  base=$(git log --format=%H -- protos | tail -n 1)
  why="the first commit with protos/"
fi
if [ -z "$base" ] || [ -z "$(git ls-tree -d "$base" protos)" ]; then
  echo "proto-check: no earlier protos/ in the history (a new API?): buf breaking skipped" >&2
  exit 0
fi

against=$(mktemp -d)
trap 'rm -rf "$against"' EXIT
git archive "$base" protos | tar -x -C "$against"
echo "proto-check: buf breaking against $why ($(git rev-parse --short "$base"))"
"$BUF" breaking --against "$against/protos"
echo "proto-check: buf breaking passed"
