#!/usr/bin/env bash
# Prints the folder of cudarc's source in cargo's registry: the version Cargo.lock names, else
# the newest there. The link-time stand-ins (toolkit-from-wheels.sh, bench/make_cudnn_stub.sh)
# read the symbol names from it. Exits 1 with a message when there is none.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
REGISTRY=${CARGO_HOME:-$HOME/.cargo}/registry/src
LOCKED=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$REPO/Cargo.lock" 2>/dev/null || true)
# shellcheck disable=SC2012 # cargo's registry folders have plain names
SRC=$(ls -d "$REGISTRY"/*/cudarc-"${LOCKED:-}"* 2>/dev/null | sort -V | tail -1 || true)
# shellcheck disable=SC2012
[ -n "$SRC" ] || SRC=$(ls -d "$REGISTRY"/*/cudarc-* 2>/dev/null | sort -V | tail -1 || true)
[ -n "$SRC" ] || { echo "cudarc source not found: run 'cargo fetch' in the repository first" >&2; exit 1; }
echo "$SRC"
