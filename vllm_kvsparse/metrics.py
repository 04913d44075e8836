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
import time
from collections import defaultdict

STATS_DIR_ENV = "VLLM_KVSPARSE_STATS_DIR"
METHOD_ENV = "VLLM_KVSPARSE_METHOD"
RATIO_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0
FALLBACK_REASONS = ("short_prompt", "exempt_layer", "unsupported")


def ensure_stats_dir(method: str) -> str:
    """The stats directory of this server, created once (children inherit the variable) and
    removed when the process that created it exits. The method name travels the same way: extra
    API-server processes (`--api-server-count > 1`) get vLLM's engine arguments only, not the
    plugin's flags, so they learn the `method` label from the environment."""
    os.environ[METHOD_ENV] = method
    path = os.environ.get(STATS_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="vllm-kvsparse-stats-")
        os.environ[STATS_DIR_ENV] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class StatsSink:
    """Cumulative counters of one process, flushed to its JSON file. `engine`: the data-
    parallel rank of the engine the process serves (the `engine` label, as vLLM's metrics)."""

    def __init__(self, role: str, engine: int = 0):
        self.role = role
        self.engine = engine
        self.counters: dict[str, float] = defaultdict(float)
        self.fallbacks: dict[str, int] = defaultdict(int)
        self.ratio_hist: dict[int, list[int]] = {}      # layer -> cumulative bucket counts
        self.ratio_sum: dict[int, float] = defaultdict(float)
        self.ratio_count: dict[int, int] = defaultdict(int)
        self._dirty = False
        self._lock = threading.Lock()

    def observe_layer(self, layer: int, num_tokens: int, num_kept: int, probe_seconds: float,
                      num_heads: int, head_dim: int, prefill_sparse: bool = True,
                      num_before: int = 0, kept_before: int = 0) -> None:
        """One (request, layer) decision. Prefill attention FLOPs are saved only where the
        method's prefill is token-sparse (zipvl, fastv); the others prefill dense. A chunked
        prompt ran its first `num_before` positions (`kept_before` of the kept ones) dense in
        earlier steps: only the rest saves."""
        ratio = num_kept / max(num_tokens, 1)
        with self._lock:
            self.counters["prompt_tokens_seen"] += num_tokens
            self.counters["prompt_tokens_kept"] += num_kept
            self.counters["probe_seconds"] += probe_seconds
            # causal prefill attention: QK^T and PV, 2 FLOPs per MAC, half the n x n square
            if prefill_sparse:
                self.counters["attention_flops_saved"] += 2.0 * num_heads * head_dim * (
                    (num_tokens ** 2 - num_before ** 2) - (num_kept ** 2 - kept_before ** 2))
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
            data = {"engine": self.engine,
                    "counters": dict(self.counters), "fallbacks": dict(self.fallbacks),
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


def sink(role: str = "worker", engine: int | None = None) -> StatsSink:
    """The process's sink for `role` ("worker": selections; "engine": blocks freed). One file
    per role and process, so an in-process engine (offline LLM) keeps both apart. The process
    that owns the role (worker, scheduler) passes its engine's data-parallel rank once."""
    if role not in _SINKS:
        _SINKS[role] = StatsSink(role)
    if engine is not None:
        _SINKS[role].engine = engine
    return _SINKS[role]


def engine_index(vllm_config) -> int:
    """The data-parallel rank of the engine this process serves (vLLM's `engine` label).
    vLLM 0.32 keeps it in `data_parallel_index`: independent (non-MoE) DP engines reset
    `data_parallel_rank` to 0."""
    pc = vllm_config.parallel_config
    return int(getattr(pc, "data_parallel_index", None) or pc.data_parallel_rank or 0)


def _empty_totals() -> dict:
    return {"counters": defaultdict(float), "fallbacks": defaultdict(int),
            "ratio_hist": {}, "ratio_sum": defaultdict(float), "ratio_count": defaultdict(int)}


def read_totals(directory: str) -> dict[int, dict]:
    """Sum every process's file in the stats directory, per engine (data-parallel rank)."""
    by_engine: dict[int, dict] = {}
    if not directory or not os.path.isdir(directory):
        return by_engine
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue  # a file being replaced right now: the next scrape sees it
        total = by_engine.setdefault(int(data.get("engine", 0)), _empty_totals())
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
    return by_engine


def metric_families(by_engine: dict[int, dict], labels: dict[str, str]) -> list:
    """The kvsparse_ metric families (prometheus_client) of totals per engine."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    names = list(labels) + ["engine"]
    counters = [
        ("kvsparse_prompt_tokens_seen", "Prompt tokens that went through selection, summed "
         "over sparse layers.", "prompt_tokens_seen"),
        ("kvsparse_prompt_tokens_kept", "Prompt tokens kept by selection, summed over sparse "
         "layers.", "prompt_tokens_kept"),
        ("kvsparse_kv_blocks_freed", "KV-cache blocks returned to vLLM's pool by eviction.",
         "kv_blocks_freed"),
        ("kvsparse_attention_flops_saved", "Estimated prefill attention FLOPs not computed.",
         "attention_flops_saved"),
        ("kvsparse_probe_seconds", "Seconds spent in probe scoring and selection.",
         "probe_seconds")]
    families = [CounterMetricFamily(name, doc, labels=names) for name, doc, _ in counters]
    fallbacks = CounterMetricFamily(
        "kvsparse_dense_fallback_requests", "Requests (per layer for exempt_layer) that ran "
        "dense although sparsity was on.", labels=names + ["reason"])
    hist = HistogramMetricFamily("kvsparse_kept_ratio", "Per request and layer: kept prompt "
                                 "tokens / prompt tokens.", labels=names + ["layer"])
    for engine in sorted(by_engine) or [0]:
        t = by_engine.get(engine, _empty_totals())
        values = list(labels.values()) + [str(engine)]
        for fam, (_, _, key) in zip(families, counters):
            fam.add_metric(values, t["counters"].get(key, 0.0))
        for reason in FALLBACK_REASONS:
            fallbacks.add_metric(values + [reason], t["fallbacks"].get(reason, 0))
        for layer in sorted(t["ratio_hist"]):
            counts = t["ratio_hist"][layer]
            buckets = [(str(b), counts[i]) for i, b in enumerate(RATIO_BUCKETS)]
            buckets.append(("+Inf", t["ratio_count"][layer]))
            hist.add_metric(values + [str(layer)], buckets, t["ratio_sum"][layer])
    return families + [fallbacks, hist]


class KVSparseCollector:
    """prometheus_client collector: the kvsparse_ metrics of this server, read at scrape time
    (one API-server process: vLLM serves /metrics from prometheus_client's global registry)."""

    def __init__(self, directory: str, model_name: str, method: str):
        self.directory = directory
        self.labels = {"model_name": model_name, "method": method}

    def describe(self):
        return []  # no static description: collected at scrape time only

    def collect(self):
        yield from metric_families(read_totals(self.directory), self.labels)


class MultiprocessExporter:
    """Several API-server processes (`--api-server-count > 1`, vLLM's default with
    `--data-parallel-size > 1`): vLLM then serves /metrics from prometheus_client's
    multiprocess mode, which reads only the `*.db` files in PROMETHEUS_MULTIPROC_DIR and never
    calls a registered collector. So one API server (rank 0) writes the totals there, in
    prometheus_client's own file format, every `period` seconds; the others write nothing (the
    files of every process are summed)."""

    def __init__(self, directory: str, multiproc_dir: str, labels: dict[str, str],
                 period: float = 1.0):
        self.directory, self.labels, self.period = directory, labels, period
        self.paths = {kind: os.path.join(multiproc_dir, f"{kind}_kvsparse.db")
                      for kind in ("counter", "histogram")}
        self._thread = threading.Thread(target=self._run, name="kvsparse-metrics",
                                        daemon=True)   # dies with the API server

    def start(self) -> "MultiprocessExporter":
        self.write()
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            time.sleep(self.period)
            try:
                self.write()
            except OSError:   # the directory went away: the server is shutting down
                return

    def write(self) -> None:
        from prometheus_client.mmap_dict import MmapedDict, mmap_key

        files = {kind: MmapedDict(path) for kind, path in self.paths.items()}
        try:
            for fam in metric_families(read_totals(self.directory), self.labels):
                kind = "histogram" if fam.type == "histogram" else "counter"
                previous: dict[tuple, float] = {}   # multiprocess files hold per-bucket counts
                for sample in fam.samples:
                    if sample.name.endswith("_count") and kind == "histogram":
                        continue   # prometheus_client derives _count from the buckets
                    value = sample.value
                    if sample.name.endswith("_bucket"):
                        series = tuple(sorted((k, v) for k, v in sample.labels.items()
                                              if k != "le"))
                        value, previous[series] = value - previous.get(series, 0.0), value
                    labels = dict(sample.labels)
                    key = mmap_key(fam.name, sample.name, list(labels), list(labels.values()),
                                   fam.documentation)
                    files[kind].write_value(key, value, 0.0)
        finally:
            for f in files.values():
                f.close()


_registered = False


def register_collector(vllm_config) -> None:
    """Expose the kvsparse_ metrics on this process's Prometheus registry (API server)."""
    global _registered
    from vllm_kvsparse.config import SparsityConfig

    cfg = SparsityConfig.from_additional_config(vllm_config.additional_config)
    method = cfg.method if cfg.enabled else os.environ.get(METHOD_ENV)
    directory = os.environ.get(STATS_DIR_ENV)
    if _registered or not method or method == "none" or not directory:
        return
    from prometheus_client import REGISTRY

    model_name = vllm_config.model_config.served_model_name
    if isinstance(model_name, (list, tuple)):
        model_name = model_name[0]
    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc_dir:
        if vllm_config.parallel_config._api_process_rank == 0:
            MultiprocessExporter(directory, multiproc_dir,
                                 {"model_name": str(model_name), "method": method}).start()
    else:
        REGISTRY.register(KVSparseCollector(directory, str(model_name), method))
    _registered = True
