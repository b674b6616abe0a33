#!/usr/bin/env bash
# The main job: installs what is missing, builds every binary (release), then forks a parent VM to
# clones on simulated hosts and prints a summary. Arguments go to `spindrift-vmm demo`
# (e.g. --clones 16 --hosts 8 --loss 0.05 --json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bins --quiet
target_dir=${CARGO_TARGET_DIR:-target}
exec "$target_dir/release/spindrift-vmm" demo "$@"
