#!/usr/bin/env bash
# meshd under load: N Envoy-like ADS streams against a generated mesh; prints a table.
#   ./scripts/bench-xds.sh --proxies 1000 --services 100 --endpoints 1000 [--flavor sotw] [-o json]
# Builds meshd and the load generator in release mode first.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --quiet --release --locked -p meshd-integration --bin xds-load -- "$@"
