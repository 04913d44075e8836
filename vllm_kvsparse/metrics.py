"""The plugin's Prometheus metrics (`kvsparse_*`, see docs/metrics.md).

The numbers are produced where the work happens: the worker (kept ratios, probe time, FLOPs
saved, dense fallbacks) and the engine core (KV blocks freed). vLLM serves /metrics from the
API-server process. So each producing process keeps cumulative totals in a `StatsSink` and
writes them atomically to `<stats dir>/<role>-<pid>.json`; the API server registers a
`KVSparseCollector` that sums those files at every scrape. This keeps vLLM's own registry (and
its multiprocess mode) untouched.

The stats directory is created by the process that parses the config (API server or the
offline `LLM`) and handed to the engine core and workers through the inherited environment
variable below: it must not go into additional_config, which is part of vLLM's compile-cache
hash.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from collections import defaultdict

STATS_DIR_ENV = "VLLM_KVSPARSE_STATS_DIR"
RATIO_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0
FALLBACK_REASONS = ("short_prompt", "exempt_layer", "unsupported")


def ensure_stats_dir() -> str:
    """The stats directory of this server, created once (children inherit the variable) and
    removed when the process that created it exits."""
    path = os.environ.get(STATS_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="vllm-kvsparse-stats-")
        os.environ[STATS_DIR_ENV] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class StatsSink:
    """Cumulative counters of one process, flushed to its JSON file."""

    def __init__(self, role: str):
        self.role = role
        self.counters: dict[str, float] = defaultdict(float)
        self.fallbacks: dict[str, int] = defaultdict(int)
        self.ratio_hist: dict[int, list[int]] = {}      # layer -> cumulative bucket counts
        self.ratio_sum: dict[int, float] = defaultdict(float)
        self.ratio_count: dict[int, int] = defaultdict(int)
        self._dirty = False
        self._lock = threading.Lock()

    def observe_layer(self, layer: int, num_tokens: int, num_kept: int, probe_seconds: float,
                      num_heads: int, head_dim: int, prefill_sparse: bool = True) -> None:
        """One (request, layer) decision. Prefill attention FLOPs are saved only where the
        method's prefill is token-sparse (zipvl, fastv); the others prefill dense."""
        ratio = num_kept / max(num_tokens, 1)
        with self._lock:
            self.counters["prompt_tokens_seen"] += num_tokens
            self.counters["prompt_tokens_kept"] += num_kept
            self.counters["probe_seconds"] += probe_seconds
            # causal prefill attention: QK^T and PV, 2 FLOPs per MAC, half the n x n square
            if prefill_sparse:
                self.counters["attention_flops_saved"] += \
                    2.0 * num_heads * head_dim * (num_tokens ** 2 - num_kept ** 2)
            hist = self.ratio_hist.setdefault(layer, [0] * len(RATIO_BUCKETS))
            for i, bound in enumerate(RATIO_BUCKETS):
                if ratio <= bound + 1e-12:
                    hist[i] += 1
            self.ratio_sum[layer] += ratio
            self.ratio_count[layer] += 1
            self._dirty = True

    def fallback(self, reason: str, count: int = 1) -> None:
        with self._lock:
            self.fallbacks[reason] += count
            self._dirty = True

    def add(self, counter: str, value: float) -> None:
        with self._lock:
            self.counters[counter] += value
            self._dirty = True

    def flush(self) -> None:
        """Write the totals if they changed (atomic: write, then rename)."""
        directory = os.environ.get(STATS_DIR_ENV)
        if not self._dirty or not directory or not os.path.isdir(directory):
            return
        with self._lock:
            data = {"counters": dict(self.counters), "fallbacks": dict(self.fallbacks),
                    "ratio_hist": {str(k): v for k, v in self.ratio_hist.items()},
                    "ratio_sum": {str(k): v for k, v in self.ratio_sum.items()},
                    "ratio_count": {str(k): v for k, v in self.ratio_count.items()}}
            self._dirty = False
        path = os.path.join(directory, f"{self.role}-{os.getpid()}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)


_SINKS: dict[str, StatsSink] = {}


def sink(role: str = "worker") -> StatsSink:
    """The process's sink for `role` ("worker": selections; "engine": blocks freed). One file
    per role and process, so an in-process engine (offline LLM) keeps both apart."""
    if role not in _SINKS:
        _SINKS[role] = StatsSink(role)
    return _SINKS[role]


def read_totals(directory: str) -> dict:
    """Sum every process's file in the stats directory."""
    total = {"counters": defaultdict(float), "fallbacks": defaultdict(int),
             "ratio_hist": {}, "ratio_sum": defaultdict(float), "ratio_count": defaultdict(int)}
    if not directory or not os.path.isdir(directory):
        return total
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue  # a file being replaced right now: the next scrape sees it
        for k, v in data.get("counters", {}).items():
            total["counters"][k] += v
        for k, v in data.get("fallbacks", {}).items():
            total["fallbacks"][k] += v
        for layer, counts in data.get("ratio_hist", {}).items():
            acc = total["ratio_hist"].setdefault(int(layer), [0] * len(RATIO_BUCKETS))
            for i, c in enumerate(counts):
                acc[i] += c
        for layer, v in data.get("ratio_sum", {}).items():
            total["ratio_sum"][int(layer)] += v
        for layer, v in data.get("ratio_count", {}).items():
            total["ratio_count"][int(layer)] += v
    return total


class KVSparseCollector:
    """prometheus_client collector: the kvsparse_ metrics of this server, read at scrape time."""

    def __init__(self, directory: str, model_name: str, method: str):
        self.directory = directory
        self.labels = {"model_name": model_name, "method": method}

    def describe(self):
        return []  # no static description: collected at scrape time only

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        t = read_totals(self.directory)
        names, values = list(self.labels), list(self.labels.values())

        def counter(name, doc, value):
            fam = CounterMetricFamily(name, doc, labels=names)
            fam.add_metric(values, value)
            return fam

        c = t["counters"]
        yield counter("kvsparse_prompt_tokens_seen", "Prompt tokens that went through "
                      "selection, summed over sparse layers.", c.get("prompt_tokens_seen", 0.0))
        yield counter("kvsparse_prompt_tokens_kept", "Prompt tokens kept by selection, summed "
                      "over sparse layers.", c.get("prompt_tokens_kept", 0.0))
        yield counter("kvsparse_kv_blocks_freed", "KV-cache blocks returned to vLLM's pool by "
                      "eviction.", c.get("kv_blocks_freed", 0.0))
        yield counter("kvsparse_attention_flops_saved", "Estimated prefill attention FLOPs not "
                      "computed.", c.get("attention_flops_saved", 0.0))
        yield counter("kvsparse_probe_seconds", "Seconds spent in probe scoring and "
                      "selection.", c.get("probe_seconds", 0.0))
        fallbacks = CounterMetricFamily(
            "kvsparse_dense_fallback_requests", "Requests (per layer for exempt_layer) that "
            "ran dense although sparsity was on.", labels=names + ["reason"])
        for reason in FALLBACK_REASONS:
            fallbacks.add_metric(values + [reason], t["fallbacks"].get(reason, 0))
        yield fallbacks
        hist = HistogramMetricFamily("kvsparse_kept_ratio", "Per request and layer: kept "
                                     "prompt tokens / prompt tokens.", labels=names + ["layer"])
        for layer in sorted(t["ratio_hist"]):
            counts = t["ratio_hist"][layer]
            buckets = [(str(b), counts[i]) for i, b in enumerate(RATIO_BUCKETS)]
            buckets.append(("+Inf", t["ratio_count"][layer]))
            hist.add_metric(values + [str(layer)], buckets, t["ratio_sum"][layer])
        yield hist


_registered = False


def register_collector(vllm_config) -> None:
    """Expose the kvsparse_ metrics on this process's Prometheus registry (API server)."""
    global _registered
    from vllm_kvsparse.config import SparsityConfig

    cfg = SparsityConfig.from_additional_config(vllm_config.additional_config)
    directory = os.environ.get(STATS_DIR_ENV)
    if _registered or not cfg.enabled or not directory:
        return
    from prometheus_client import REGISTRY

    model_name = vllm_config.model_config.served_model_name
    if isinstance(model_name, (list, tuple)):
        model_name = model_name[0]
    REGISTRY.register(KVSparseCollector(directory, str(model_name), cfg.method))
    _registered = True


def _make_stat_logger():
    from vllm.v1.metrics.loggers import StatLoggerBase

    class KVSparseStatLogger(StatLoggerBase):
        """`vllm.stat_logger_plugins` entry: loaded by the API server's AsyncLLM; registers the
        collector. vLLM's own Prometheus logger stays in place (this is not a subclass of it)."""

        def __init__(self, vllm_config, engine_index: int = 0):
            register_collector(vllm_config)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            pass

        def log_engine_initialized(self) -> None:
            pass

    KVSparseStatLogger.__qualname__ = "KVSparseStatLogger"   # picklable by reference
    KVSparseStatLogger.__module__ = __name__
    return KVSparseStatLogger


def __getattr__(name: str):
    """`KVSparseStatLogger` subclasses vLLM's StatLoggerBase, so it is built on first access
    (the entry point loads it by attribute). Importing this module, and what imports it (runtime,
    attention/layer_sparsity.py), therefore does not import vLLM: benchmarks/gpu_check.py runs
    that code on a GPU machine without vLLM."""
    if name == "KVSparseStatLogger":
        cls = _make_stat_logger()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
