#!/bin/bash
# serve.sh MODEL PORT NAME [extra args...]
M=$1; P=$2; N=$3; shift 3
D=${TMPDIR:-/tmp}/kvsparse-eval/$N; mkdir -p $D
export TMPDIR=$D VLLM_CACHE_ROOT=$D/vc VLLM_RPC_BASE_PATH=$D HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec setsid vllm serve $M --host 127.0.0.1 --port $P --dtype bfloat16 --max-model-len 8192 --max-num-seqs 4 --enforce-eager --kv-cache-memory-bytes $((256<<20)) --limit-mm-per-prompt '{"image": 4, "video": 0}' "$@" > $D.log 2>&1
