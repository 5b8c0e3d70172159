#!/usr/bin/env bash
# The main job on the embedded default. Until the synthesis and distillation pipeline lands,
# this builds in release and prints the kernel benchmark of this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
swift build -c release
.build/release/hrhf-bench "$@"
