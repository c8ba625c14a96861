#!/usr/bin/env bash
# Check the GPU path end to end on one accelerator in <= 8 minutes (scripts/device_check.py
# says what runs). No network, no embedded model needed.
#   scripts/device_check.sh [--cpu-smoke] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" scripts/device_check.py "$@"
