#!/usr/bin/env bash
# Install (if needed) and run the whole test suite: unit tests (selection math, config, Triton
# kernels under the interpreter) and end-to-end tests against real vLLM on CPU.
#   usage: scripts/test.sh [PYTEST_ARGS...]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/install.sh" >/dev/null
bash "$ROOT/scripts/install_prometheus.sh" >/dev/null   # a real Prometheus for the metrics tests
cd "$ROOT"
exec .venv/bin/python -m pytest -q -ra --durations=25 "$@"   # the slowest 25: the suite's time budget
