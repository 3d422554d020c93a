#!/usr/bin/env bash
# The CA service under load: CSRs signed per second for pods with tokens, with a cached
# TokenReview and with one review per request; meshd pinned to one core. Prints a table.
#   ./scripts/bench-ca.sh [--clients 32] [--seconds 10] [--tokens 2000]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --locked --bins
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
MESHD_BIN_DIR="$target/release" exec "$target/release/ca-load" "$@"
