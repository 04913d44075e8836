"""vllm-kvsparse: ZipVL token-sparse prefill and KV eviction for vLLM."""

__version__ = "0.1.0"
