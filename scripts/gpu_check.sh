#!/usr/bin/env bash
# GPU evidence in one command (issue 16; docs/kernels.md, "GPU evidence"): the CUDA path's
# kernels (correctness and speed), one decoder layer per method and a Qwen2-VL-7B-sized prefill,
# on a machine with a CUDA GPU, torch, triton and transformers; no vLLM, no network. <= 8 min.
#   usage: scripts/gpu_check.sh OUT_DIR [--dry-run] [--steps a,b] [--lengths n1,n2]
#   --dry-run: CPU rehearsal (tiny sizes, Triton interpreter), as the test suite runs it.
# Writes OUT_DIR/gpu_check.json and OUT_DIR/summary.md. Python: $PYTHON, else python3.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: scripts/gpu_check.sh OUT_DIR [--dry-run] [--steps ...] [--lengths ...]" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "${PYTHON:-python3}" "$ROOT/benchmarks/gpu_check.py" "$@"
