"""`vllm-kvsparse bench`: drive OpenAI-compatible endpoints (e.g. a dense and a zipvl server)
with a multimodal streaming workload and compare latency, throughput and the kvsparse_ server
metrics. One job per module:

    workload.py        prompts and images (synthetic, seeded; or a JSONL file)
    client.py          async streaming chat requests, client-side timing
    metrics_scrape.py  /metrics before/after/during the run
    report.py          statistics, results.json, results.md
    plots.py           PNG figures (matplotlib, Agg)
    cli.py             argparse and the run loop

Heavy imports (httpx, matplotlib, PIL) happen inside functions so `vllm-kvsparse --help` stays fast.
"""
