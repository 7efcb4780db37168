#!/usr/bin/env bash
# The main job, end to end (after the idempotent set-up): `fedspeech demo`.
# Extra arguments go to it, e.g. `bash scripts/demo.sh --out runs/demo --speakers 40`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec .venv/bin/fedspeech demo "$@"
