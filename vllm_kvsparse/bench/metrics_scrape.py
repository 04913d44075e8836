"""The server's Prometheus /metrics: scraped before and after a run (counter deltas) and
sampled during it (KV-cache usage, which drops back to 0 between requests).

Metric names follow docs/metrics.md. Everything the server does not expose (a dense server, a
server without the plugin, a plugin without metrics) comes out as None, never as an error.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

KEPT = "kvsparse_prompt_tokens_kept_total"
SEEN = "kvsparse_prompt_tokens_seen_total"
FREED = "kvsparse_kv_blocks_freed_total"
RATIO_SUM = "kvsparse_kept_ratio_sum"
RATIO_COUNT = "kvsparse_kept_ratio_count"
KV_USAGE = "vllm:kv_cache_usage_perc"
COUNTERS = (KEPT, SEEN, FREED)


@dataclass
class Snapshot:
    """Values summed over label sets (model_name, method, engine ...), per-layer histogram
    sums/counts, or the error that prevented the scrape."""
    totals: dict[str, float] = field(default_factory=dict)
    layer_sum: dict[str, float] = field(default_factory=dict)
    layer_count: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def parse(text: str) -> Snapshot:
    from prometheus_client.parser import text_string_to_metric_families

    snap = Snapshot()
    layer_sum: dict[str, float] = defaultdict(float)
    layer_count: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if math.isnan(s.value):
                continue
            if s.name in COUNTERS or s.name == KV_USAGE:
                snap.totals[s.name] = snap.totals.get(s.name, 0.0) + s.value
            elif s.name in (RATIO_SUM, RATIO_COUNT) and "layer" in s.labels:
                target = layer_sum if s.name == RATIO_SUM else layer_count
                target[s.labels["layer"]] += s.value
    snap.layer_sum, snap.layer_count = dict(layer_sum), dict(layer_count)
    return snap


async def scrape(client, root: str, timeout: float = 10.0) -> Snapshot:
    from vllm_kvsparse.bench.client import error_text

    try:
        r = await client.get(root + "/metrics", timeout=timeout)
        if r.status_code != 200:
            return Snapshot(error=f"/metrics: HTTP {r.status_code}")
        return parse(r.text)
    except Exception as e:  # noqa: BLE001 - a failed scrape is data, not a crash
        return Snapshot(error="/metrics: " + error_text(e))


class UsageSampler:
    """Samples vllm:kv_cache_usage_perc every `interval` seconds while a run is in progress."""

    def __init__(self, client, root: str, interval: float):
        self.client, self.root, self.interval = client, root, interval
        self.samples: list[tuple[float, float]] = []  # (seconds since start, usage 0..1)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            snap = await scrape(self.client, self.root, timeout=max(self.interval, 2.0))
            if KV_USAGE in snap.totals:
                self.samples.append((time.perf_counter() - self._t0, snap.totals[KV_USAGE]))
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def _delta(before: Snapshot, after: Snapshot, name: str) -> float | None:
    if name not in after.totals:
        return None
    d = after.totals[name] - before.totals.get(name, 0.0)
    return after.totals[name] if d < 0 else d  # a negative delta means the server restarted


def server_summary(before: Snapshot, after: Snapshot,
                   usage: list[tuple[float, float]]) -> dict:
    """The server-side numbers of one endpoint run (None where the server has no data)."""
    kept, seen = _delta(before, after, KEPT), _delta(before, after, SEEN)
    per_layer = {}
    for layer, total in after.layer_sum.items():
        n = after.layer_count.get(layer, 0.0) - before.layer_count.get(layer, 0.0)
        s = total - before.layer_sum.get(layer, 0.0)
        if n > 0:
            per_layer[layer] = s / n
    per_layer = dict(sorted(per_layer.items(), key=lambda kv: _layer_key(kv[0])))
    values = [u for _, u in usage]
    return {
        "kept_ratio_mean": kept / seen if kept is not None and seen else None,
        "kept_ratio_per_layer": per_layer or None,
        "prompt_tokens_seen": seen,
        "prompt_tokens_kept": kept,
        "kv_blocks_freed": _delta(before, after, FREED),
        "kv_usage_max": max(values) if values else None,
        "kv_usage_mean": sum(values) / len(values) if values else None,
        "kv_usage_samples": len(values),
        "metrics_error": after.error or before.error,
    }


def _layer_key(layer: str):
    return (0, int(layer), "") if layer.lstrip("-").isdigit() else (1, 0, layer)
