#!/usr/bin/env bash
# The project's test command: system packages if missing, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
swift test --disable-swift-testing "$@"
