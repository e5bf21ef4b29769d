#!/usr/bin/env bash
# The test suite: install, then every test (offline, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pytest -q "$@"
