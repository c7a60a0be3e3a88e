#!/usr/bin/env bash
# The TypeScript test environment: sdk/typescript/node_modules installed
# with `npm ci` from the committed package-lock.json (exact versions,
# checked against their integrity hashes, no resolution).
#
#     tools/npmenv.sh        # prints the package's directory
#
# The one definition of that environment: the TypeScript suite
# (crates/mayfly-cli/tests/typescript.rs) and .ci/run both call it. It is
# installed on first use and kept; it is installed anew when the lockfile,
# package.json or this script changes (a stamp of their hashes, written
# once `npm ci` is done, so an interrupted run leaves nothing that looks
# finished). Concurrent callers take a lock: one installs, the others wait
# and reuse it.
#
# It needs Node.js 20 or newer with npm; progress goes to stderr, the
# directory alone to stdout.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
pkg="$repo/sdk/typescript"

command -v node >/dev/null 2>&1 || {
  echo "no node on the PATH: the TypeScript suite needs Node.js 20 or newer with npm" >&2
  exit 3
}
major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$major" -ge 20 ] || {
  echo "node is $(node --version): the TypeScript suite needs Node.js 20 or newer" >&2
  exit 3
}
command -v npm >/dev/null 2>&1 || {
  echo "node has no npm on the PATH: install npm (Debian: apt-get install npm)" >&2
  exit 3
}

stamp="$(
  {
    sha256sum "$pkg/package-lock.json" "$pkg/package.json" "$0" | cut -d' ' -f1
    node --version
  } | sha256sum | cut -d' ' -f1
)"
mark="$pkg/node_modules/.mayfly-stamp"

exec 9>"${TMPDIR:-/tmp}/mayfly-npmenv-$(echo "$pkg" | sha256sum | cut -c1-16).lock"
flock 9
if [ "$(cat "$mark" 2>/dev/null)" != "$stamp" ]; then
  echo "installing the TypeScript test environment (npm ci) in $pkg" >&2
  (cd "$pkg" && npm ci --no-audit --no-fund --loglevel=error >&2)
  echo "$stamp" > "$mark"
fi
echo "$pkg"
