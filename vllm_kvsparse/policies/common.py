"""Helpers shared by the policies: budget counts, top-k with lower-index ties, 1-D pooling,
causal probe-row attention (torch only, no vLLM).

Memory: nothing here builds an ``[H, n, n]`` matrix. Probe attention is computed for the probe
rows only: column sums in chunks of probe rows over all heads (``zipvl.probe_column_sums``,
what ZipVL's own scores use), or one KV head's query group at a time where a method needs the
probabilities themselves (``[g, m, n]``, ``zipvl.probe_attention_by_group``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .. import zipvl
from ..zipvl import probe_attention_by_group
from .base import Choice, HeadShards, shard_mean

# floor(b * n) is taken with this tolerance so that e.g. 0.29 * 100 (= 28.999999999999996 in
# binary floating point) counts as 29.
_FLOOR_EPS = 1e-9


def floor_count(fraction: float, total: int) -> int:
    """``floor(fraction * total)`` with a 1e-9 tolerance for binary rounding."""
    return int(math.floor(fraction * total + _FLOOR_EPS))


def budget_count(fraction: float, total: int) -> int:
    """``C = max(1, floor(fraction * total))`` (docs/policies.md, conventions), capped at ``total``."""
    return min(total, max(1, floor_count(fraction, total)))


def topk_ascending(scores: torch.Tensor, k: int,
                   candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the ``k`` largest ``scores`` (ties to the lower index), ascending, CPU.

    ``candidates`` (bool [n]) restricts the choice; ``k`` is capped at the number of
    candidates."""
    scores = scores.detach().float().cpu()
    if candidates is not None:
        candidates = candidates.cpu()
        pool = torch.nonzero(candidates).flatten()
        k = min(k, pool.numel())
        if k <= 0:
            return torch.zeros(0, dtype=torch.long)
        order = torch.sort(scores[pool], descending=True, stable=True).indices
        return torch.sort(pool[order[:k]]).values
    k = min(k, scores.numel())
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def mask_to_indices(keep: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(keep.cpu()).flatten()


def protected_priority(scores: torch.Tensor, protected: torch.Tensor | None) -> torch.Tensor:
    """fp32 [n] CPU priority: the scores, with ``protected`` positions raised above them all."""
    prio = scores.detach().float().cpu().clone()
    if protected is not None and bool(protected.any()):
        top = float(prio.max()) if prio.numel() else 0.0
        prio[protected.cpu()] = (top if math.isfinite(top) else 0.0) + 1.0
    return prio


def keep_all(n: int, priority: torch.Tensor | None = None) -> Choice:
    """Every position kept (no compression)."""
    prio = torch.ones(n, dtype=torch.float32) if priority is None else priority.float().cpu()
    return Choice(torch.arange(n), prio, None)


def pool1d(scores: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """SnapKV's pooling over the last dim: stride 1, padding ``kernel // 2`` (odd ``kernel``
    keeps the length). ``avg`` pads with zeros and divides by ``kernel`` (torch's
    ``avg_pool1d`` default ``count_include_pad=True``, as the official code); ``max`` pads with
    -inf, which equals zero padding for the non-negative attention scores."""
    if kernel == 1:
        return scores
    x = scores.unsqueeze(0) if scores.dim() == 1 else scores
    if mode == "avg":
        out = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    elif mode == "max":
        out = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"pooling mode {mode!r} is not avg or max")
    return out.squeeze(0) if scores.dim() == 1 else out


# ----------------------------------------------------------------------------- attention rows


def per_head_column_sums(query: torch.Tensor, key: torch.Tensor, probe_idx: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """``v[h, j] = sum_{i in probes} A^h[i, j]`` fp32 ``[H, n]`` (zipvl.probe_column_sums:
    probe rows in chunks, no ``[g, m, n]`` matrix)."""
    return zipvl.probe_column_sums(query, key, probe_idx, scale, per_head=True)


def head_mean_column_sums(query: torch.Tensor, key: torch.Tensor, probe_idx: torch.Tensor,
                          scale: float, scores_fn: Callable | None = None,
                          shards: HeadShards | None = None) -> torch.Tensor:
    """``a[j] = sum_{i in probes} mean_h A^h[i, j]`` fp32 ``[n]`` (ZipVL's Eq. 6 score), the
    mean taken over all heads of every shard (one all-reduce of ``[n]`` with ``shards``).

    Routed through ``scores_fn`` (e.g. the fused Triton kernel) when given, else the torch path
    ``zipvl.probe_attention_scores``."""
    probe_idx = probe_idx.to(query.device).long()
    fn = scores_fn or zipvl.probe_attention_scores
    accumulated, _ = fn(query, key, probe_idx, scale)
    return shard_mean(shards, accumulated.float())


def scores_over_all_heads(scores_fn: Callable | None, shards: HeadShards | None) -> Callable:
    """A ``scores_fn`` (``LayerInput.scores_fn`` contract) whose scores are means over the heads
    of every shard: the accumulated sums are all-reduced (one ``[n]`` vector) and the
    visibility-normalised ones recomputed from them (Eq. 8 is linear in them)."""
    fn = scores_fn or zipvl.probe_attention_scores
    if shards is None:
        return fn

    def over_all_heads(query, key, probe_idx, scale):
        accumulated = shards.mean(fn(query, key, probe_idx, scale)[0].float())
        return accumulated, zipvl.normalize_by_visibility(accumulated, probe_idx)

    return over_all_heads
