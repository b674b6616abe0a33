#!/usr/bin/env bash
# Runs the whole test suite. Tests that need root, network namespaces or /dev/kvm run when
# available and otherwise print why they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets
