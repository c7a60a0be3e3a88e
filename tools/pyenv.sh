#!/usr/bin/env bash
# The Python test environment: a virtual environment in DIR/venv with the
# locked packages (sdk/python/requirements-dev.lock: exact versions,
# checked against their hashes, no resolution) and the SDK from
# ./sdk/python with its extras, which together give the SDK's and the MCP
# example's tests, linters and stub check everything they import.
#
#     tools/pyenv.sh DIR     # prints the environment's interpreter
#
# The one definition of that environment: the Python suites
# (crates/mayfly-cli/tests/pyenv) and .ci/run both call it. It is made on
# first use and kept; it is made anew when the lockfile, this script or
# the base interpreter changes, and the SDK installed again when its
# files change (stamps of their hashes, each written once its step is
# done, so an interrupted run leaves nothing that looks finished).
# Concurrent callers, in one process or several, take a lock: one makes
# the environment, the others wait for it and then reuse it.
#
# It needs `python3` (3.10 or newer) with the venv module; progress goes
# to stderr, the interpreter's path alone to stdout.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1"
dir="$(cd "$1" && pwd)"
venv="$dir/venv"
lock="$repo/sdk/python/requirements-dev.lock"

base="$(command -v python3)" || {
  echo "no python3 on the PATH: the Python suites need CPython 3.10 or newer" >&2
  exit 3
}
version="$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
"$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "$base is Python $version: the Python suites need 3.10 or newer" >&2
  exit 3
}
# Debian and Ubuntu ship the venv module's pip bootstrap (ensurepip) in a
# package of its own; without it `python3 -m venv` cannot make a usable
# environment.
"$base" -c 'import venv, ensurepip' 2>/dev/null || {
  echo "$base (Python $version) cannot make virtual environments: its venv module or" \
    "ensurepip is missing; on Debian or Ubuntu: apt-get install python$version-venv" \
    "(or python3-venv)" >&2
  exit 3
}

stamp="$(
  {
    sha256sum "$lock" "$0" | cut -d' ' -f1
    "$base" -c 'import sys; print(sys.executable, sys.version)'
  } | sha256sum | cut -d' ' -f1
)"

# The SDK as installed: its package files, so a change to them installs it
# again (quickly, without making the environment anew).
sdk_stamp="$(
  cd "$repo/sdk/python"
  find pyproject.toml README.md src/mayfly -type f \( -name '*.py' -o -name '*.pyi' \
    -o -name py.typed -o -name '*.toml' -o -name '*.md' \) -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
)"

exec 9>"$dir/.lock"
flock 9
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
if ! [ -x "$venv/bin/python" ] || [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "making the Python test environment in $venv" >&2
  rm -rf "$venv"
  "$base" -m venv "$venv" >&2
  "${pip[@]}" install --require-hashes --no-deps -r "$lock" >&2
  echo "$stamp" >"$venv/.stamp"
fi
if [ "$(cat "$venv/.sdk-stamp" 2>/dev/null)" != "$sdk_stamp" ]; then
  # The SDK as a user installs it, built with the locked setuptools; its
  # dependencies and extras' packages came from the lockfile above. It is
  # built from a copy, so no build directory lands in the source tree
  # (where a stale one could leak removed modules into a later build).
  echo "installing ./sdk/python in $venv" >&2
  sdk="$(mktemp -d)"
  trap 'rm -rf "$sdk"' EXIT
  cp -r "$repo/sdk/python/pyproject.toml" "$repo/sdk/python/README.md" "$repo/sdk/python/src" "$sdk"
  "${pip[@]}" install --no-deps --no-build-isolation --no-index --force-reinstall \
    "$sdk[asgi,mcp]" >&2
  # Every package's dependencies are there: a lockfile that misses one
  # fails here rather than in a test.
  "${pip[@]}" check >&2
  echo "$sdk_stamp" >"$venv/.sdk-stamp"
fi
echo "$venv/bin/python"
