#!/usr/bin/env bash
# The latency two transparently captured sidecars add: p50/p90/p99 of a request sent
# directly between two pods against the same request through client and server
# sidecars (iptables → Envoy → mTLS → iptables → Envoy), at a fixed request rate with
# h2load, in a lab of network namespaces (needs root). Prints a table.
#   sudo ./scripts/bench-capture.sh [--rate 200] [--seconds 20] [--connections 4]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v h2load >/dev/null; then
  apt-get install -y nghttp2-client
fi
for tool in iptables; do
  command -v "$tool" >/dev/null || apt-get install -y "$tool"
done
cargo build --quiet --release --locked --bins
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
MESHD_BIN_DIR="$target/release" exec "$target/release/capture-bench" "$@"
