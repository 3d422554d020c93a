#!/usr/bin/env bash
# What meshd-agent costs a pod: agent start → ready (median/p90 over --starts) and its
# peak RSS with Envoy connected, renewing, under a request loop. Prints a table.
#   ./scripts/bench-agent.sh [--starts 10] [--seconds 20] [--cert-ttl 6s]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --locked --bins
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
MESHD_BIN_DIR="$target/release" exec "$target/release/agent-bench" "$@"
