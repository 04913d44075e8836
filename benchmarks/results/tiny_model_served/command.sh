#!/bin/bash
# dense vllm serve of the committed tiny model + vllm-kvsparse eval, 32 held-out per task, every task
set -u
cd /work/main; source .venv/bin/activate
export TMPDIR=$(mktemp -d) ; export VLLM_CACHE_ROOT=$TMPDIR/vc HF_HOME=$TMPDIR/hf
PORT=8123
vllm serve tests/fixtures/tiny-qwen2vl-vqa --host 127.0.0.1 --port $PORT --dtype bfloat16 \
  --max-model-len 8192 --max-num-seqs 4 --kv-cache-memory-bytes 268435456 \
  --limit-mm-per-prompt '{"image": 4, "video": 0}' > /work/exp/s35/serve.log 2>&1 &
PID=$!
trap "kill $PID; sleep 3; kill -9 $PID 2>/dev/null" EXIT
for i in $(seq 300); do curl -sf http://127.0.0.1:$PORT/health >/dev/null && break; sleep 2; done
time vllm-kvsparse eval --endpoint dense=http://127.0.0.1:$PORT --dataset synthetic:all --limit 32 \
  --out /work/exp/s35/served32 --no-progress
