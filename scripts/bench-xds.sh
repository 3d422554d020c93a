#!/usr/bin/env bash
# meshd under load: N Envoy-like ADS streams against a generated mesh; prints a table.
#   ./scripts/bench-xds.sh --proxies 1000 --services 100 --endpoints 1000 [--flavor sotw] [-o json]
# Another control plane on the same scenario: --server-cmd CMD, or --target ADDR
# (target/release/xds-load --help says what either gets and must follow).
# Builds the workspace's binaries in release mode first: the load generator and the
# meshd it starts come from one build, the same as `cargo build --release`, so nothing
# is compiled twice (MESHD_BIN_DIR tells the harness where meshd is).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --locked --bins
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
MESHD_BIN_DIR="$target/release" exec "$target/release/xds-load" "$@"
