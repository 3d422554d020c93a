#!/usr/bin/env bash
# meshd's admission webhook over HTTPS at a steady rate (open loop), meshd pinned to one
# core: latency p50/p90/p99. Prints a table. In-process cost per pod:
# `cargo bench -p meshd --bench inject`.
#   ./scripts/bench-admission.sh [--rate 100] [--seconds 20] [--connections 4] [--path /inject]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --locked --bins
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
MESHD_BIN_DIR="$target/release" exec "$target/release/admission-load" "$@"
