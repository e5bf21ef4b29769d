#!/usr/bin/env bash
# The quickstart: install, then GRPO on the built-in tiny model and data (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
raylign train configs/quickstart.yaml "$@"
