#!/bin/bash
# compare.sh OUT LIMIT: dense + methods on the committed model, one eval of long_color and color
# run from the repository root: benchmarks/results/eval_tiny_color/compare.sh OUT 10
OUT=$1; LIMIT=${2:-10}; M=tests/fixtures/tiny-qwen2vl-vqa
declare -A CFG=(
 [dense]=""
 [zipvl_0.975]='--kv-sparsity zipvl --kv-sparsity-config {"tau":0.975,"min_prompt_len":0}'
 [snapkv_0.1]='--kv-sparsity snapkv --kv-sparsity-config {"budget":0.1,"min_prompt_len":0}'
 [streamingllm_0.1]='--kv-sparsity streamingllm --kv-sparsity-config {"budget":0.1,"min_prompt_len":0}'
 [random_0.1]='--kv-sparsity random --kv-sparsity-config {"budget":0.1,"min_prompt_len":0}'
 [fastv_k1_0.1]='--kv-sparsity fastv --kv-sparsity-config {"k":1,"budget":0.1,"min_prompt_len":0}'
)
ORDER="dense zipvl_0.975 snapkv_0.1 streamingllm_0.1 random_0.1 fastv_k1_0.1"
P=38200; EPS=""
for n in $ORDER; do
  P=$((P+1)); "$(dirname "$0")/serve.sh" $M $P cmp_$n ${CFG[$n]} &
  EPS="$EPS --endpoint $n=http://127.0.0.1:$P"; PORTS="$PORTS $P"
done
for p in $PORTS; do for i in $(seq 300); do curl -s -o /dev/null 127.0.0.1:$p/health && break; sleep 2; done; done
vllm-kvsparse eval $EPS --dataset synthetic:color,long_color --limit $LIMIT --out $OUT --no-progress > $OUT.txt 2>&1
for p in $PORTS; do PID=$(pgrep -f "vllm serve $M --host 127.0.0.1 --port $p" | head -1); [ -n "$PID" ] && kill -TERM -- -$(ps -o pgid= -p $PID | tr -d ' '); done
