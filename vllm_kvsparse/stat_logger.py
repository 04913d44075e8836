"""The `vllm.stat_logger_plugins` entry point (pyproject.toml): vLLM's API server loads it and
it exposes the plugin's kvsparse_ metrics there (metrics.register_collector). A module of its own
because it subclasses vLLM's StatLoggerBase: metrics.py, which the layer glue imports, stays free
of vLLM (benchmarks/gpu_check.py runs that glue on a GPU machine without vLLM)."""

from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_kvsparse.metrics import register_collector


class KVSparseStatLogger(StatLoggerBase):
    """Registers the collector; records nothing itself (the numbers come from the stats files).
    vLLM's own Prometheus logger stays in place (this is not a subclass of it)."""

    def __init__(self, vllm_config, engine_index: int = 0):
        register_collector(vllm_config)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        pass

    def log_engine_initialized(self) -> None:
        pass
