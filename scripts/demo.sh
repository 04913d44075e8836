#!/usr/bin/env bash
# The main job, on a fresh machine: install (if needed), build the embedded tiny Qwen2-VL,
# `vllm serve` it with ZipVL on loopback, and answer one image request through the OpenAI API.
#   usage: scripts/demo.sh            # answer one request, print it, stop the server
#          KEEP_SERVING=1 scripts/demo.sh   # then keep serving until Ctrl-C
#   env:   PORT (default 8000), TAU (default 0.9)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${PORT:-8000}
TAU=${TAU:-0.9}
bash "$ROOT/scripts/install.sh" >/dev/null
BIN="$ROOT/.venv/bin"
MODEL="$ROOT/models/tiny-qwen2vl"
[ -f "$MODEL/model.safetensors" ] || "$BIN/vllm-kvsparse" tiny-model "$MODEL"

WORK="$ROOT/.cache/demo"; mkdir -p "$WORK"
export TMPDIR="$WORK" VLLM_CACHE_ROOT="$WORK/vllm" VLLM_RPC_BASE_PATH="$WORK" HF_HUB_OFFLINE=1
# min_prompt_len 0: the demo's prompts (~285 tokens) are shorter than the default 1024.
"$BIN/vllm" serve "$MODEL" --host 127.0.0.1 --port "$PORT" \
  --kv-sparsity zipvl --kv-sparsity-config "{\"tau\": $TAU, \"min_prompt_len\": 0}" \
  --dtype bfloat16 --max-model-len 4096 --max-num-seqs 4 --enforce-eager \
  --kv-cache-memory-bytes $((256 << 20)) --limit-mm-per-prompt '{"image": 2, "video": 0}' \
  >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
echo "vllm serve (pid $SERVER) starting on 127.0.0.1:$PORT; log: $WORK/server.log"
for _ in $(seq 180); do
  curl -sf "127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -20 "$WORK/server.log"; exit 1; }
  sleep 1
done
"$BIN/python" "$ROOT/scripts/demo_client.py" "http://127.0.0.1:$PORT"
if [ "${KEEP_SERVING:-0}" = 1 ]; then echo "serving; Ctrl-C to stop"; wait $SERVER; fi
