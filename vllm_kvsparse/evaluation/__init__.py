"""Accuracy against live servers: a synthetic visual-QA suite (synthetic.py), a JSONL dataset
format (dataset.py), EffiVLM-Bench's metrics (metrics.py), `vllm-kvsparse eval` (cli.py) and
`vllm-kvsparse train-tiny` (train.py). docs/eval.md."""
