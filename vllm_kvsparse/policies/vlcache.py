"""VL-Cache: layer budgets from the sparsity of post-vision attention (deferred).

Paper: Tu et al., "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for
Vision-Language Model Inference Acceleration", ICLR 2025, arXiv 2410.23317. No official code is
public; the reference port followed here is EffiVLM-Bench's
``kv_cache_compression/kv_cache_utils.py`` (``VlCacheKVCluster``) and
``kv_cache_compression/qwen_model.py`` (``qwen_attention_forward_vlcache``,
``qwen_model_forward_vlcache``).

During the prefill (full K/V kept), per layer ``l``, with ``P`` = the positions after the last
visual token (question + template suffix)::

    nnz_h  = #{(i, j): i in P, j <= i, A^h[i, j] >= threshold * max_j A^h[i, j]}
    den    = sum_{i in P} (i + 1)
    gamma_l = mean_h (den - nnz_h) / den                 # sparsity of post-vision attention
    s_l[j] = sum_h sum_{i in P} A^h[i, j]                # post-vision score

After the last layer (``finish``)::

    w      = floor(window_fraction * b * n)
    alpha_l = clip((1 - gamma_l) / sum_k (1 - gamma_k) * (1 - window_fraction) * b * L,
                   min_ratio, 1)
    keep_l = topk_{j < n - w}(s_l, floor(alpha_l * n)) ∪ [n - w, n)

``layer_adaptive=False``: every layer gets ``alpha = (1 - window_fraction) * b``.

Parameters (EffiVLM defaults): ``budget=0.2``, ``window_fraction=0.1``, ``layer_adaptive=True``,
``sparsity_threshold=0.01``, ``min_ratio=0.009`` (the clip minimum).

Deviations of the project:

- The 10 % recent window is EffiVLM's benchmark convention, not the paper's; clipping does not
  redistribute the budget (as EffiVLM), so the realised total differs from ``b * L * n``.
- One kept set per layer (EffiVLM ``head_adaptive=False``): ``s_l`` sums over all heads.
- ``P`` empty (no visual token, or the prompt ends with one): ``P`` = the last
  ``min(n, 32)`` positions (``FALLBACK_PROBES``), a SnapKV-style observation window.
- ``n <= max(1, floor(b * n))`` (e.g. ``budget=1``): every layer keeps all. A layer whose count
  and window are both 0 keeps its top-1 token (never an empty set).
- ``L`` is the number of layers ``layer()`` was called for in the step (the glue may leave
  exempt layers dense); ``finish()`` decides exactly those layers.
- Scores use the torch path (the per-head sparsity count needs per-head rows); fp32; ties to
  the lower index. ``Choice.priority``: ``s_l``, the window above all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Choice, LayerInput, Policy, PromptInfo, StepState
from .common import (budget_count, floor_count, keep_all, probe_attention_by_group,
                     protected_priority, topk_ascending)

FALLBACK_PROBES = 32


def post_vision_rows(visual: torch.Tensor) -> torch.Tensor:
    """``P``: positions after the last visual token; the fallback window when that is empty."""
    n = visual.numel()
    vis = torch.nonzero(visual).flatten()
    start = int(vis[-1]) + 1 if vis.numel() else n
    if start >= n:
        start = n - min(n, FALLBACK_PROBES)
    return torch.arange(start, n)


@dataclass(frozen=True)
class VLCache(Policy):
    """Parameters: budget=0.2 (kept fraction of the prompt averaged over layers, window
    included, in (0, 1]); window_fraction=0.1 (recent window as a fraction of the budget, in
    [0, 1)); layer_adaptive=True; sparsity_threshold=0.01 (in (0, 1]); min_ratio=0.009 (clip
    minimum of alpha_l, in [0, 1])."""

    budget: float = 0.2
    window_fraction: float = 0.1
    layer_adaptive: bool = True
    sparsity_threshold: float = 0.01
    min_ratio: float = 0.009

    name: ClassVar[str] = "vlcache"
    deferred: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_fraction("budget")
        self._check_fraction("window_fraction", allow_zero=True)
        if self.window_fraction >= 1.0:
            raise self._bad("window_fraction", "numbers in [0, 1)")
        self._check_bool("layer_adaptive")
        self._check_fraction("sparsity_threshold")
        self._check_fraction("min_ratio", allow_zero=True)

    def _keeps_all(self, n: int) -> bool:
        return n <= budget_count(self.budget, n)

    def query_rows(self, prompt: PromptInfo) -> torch.Tensor:
        if self._keeps_all(prompt.num_tokens):
            return torch.zeros(0, dtype=torch.long)
        return post_vision_rows(prompt.visual_cpu())

    def layer(self, state: StepState, inp: LayerInput) -> None:
        prompt = state.prompt
        self._check_input(prompt, inp)
        n = prompt.num_tokens
        layers = state.data.setdefault("layers", {})
        if self._keeps_all(n):
            layers[inp.layer_idx] = None
            return None
        rows = self.query_rows(prompt)
        den = float((rows + 1).sum())
        score = torch.zeros(n, dtype=torch.float32, device=inp.query.device)
        sparsity = []
        for _, probs in probe_attention_by_group(inp.query, inp.key, rows, inp.scale):
            big = probs >= self.sparsity_threshold * probs.amax(-1, keepdim=True)   # [g, m, n]
            nnz = big.sum(dim=(1, 2)).double().cpu()                                  # [g]
            sparsity.extend(((den - nnz) / den).tolist())
            score += probs.sum(dim=(0, 1))
        gamma = sum(sparsity) / len(sparsity)
        if inp.shards is not None:   # one all-reduce: s_l and gamma_l over every shard's heads
            heads = inp.query.shape[1]
            packed = inp.shards.mean(torch.cat([score / heads, score.new_tensor([gamma])]))
            score, gamma = packed[:-1] * (heads * inp.shards.size), float(packed[-1])
        layers[inp.layer_idx] = (score.cpu(), gamma)
        return None

    def layer_ratios(self, sparsities: list[float]) -> list[float]:
        """``alpha_l`` for the layers in order."""
        share = (1.0 - self.window_fraction) * self.budget
        if not self.layer_adaptive:
            return [share] * len(sparsities)
        dense = [1.0 - g for g in sparsities]
        total = sum(dense)
        if total <= 0:
            return [share] * len(sparsities)
        return [min(1.0, max(self.min_ratio, d / total * share * len(dense))) for d in dense]

    def finish(self, state: StepState) -> dict[int, Choice]:
        n = state.prompt.num_tokens
        layers = state.data.get("layers", {})
        if not layers or any(v is None for v in layers.values()):
            return {idx: keep_all(n) for idx in layers}
        order = sorted(layers)
        ratios = self.layer_ratios([layers[idx][1] for idx in order])
        window = min(n, floor_count(self.window_fraction * self.budget, n))
        out = {}
        protected = torch.zeros(n, dtype=torch.bool)
        protected[n - window:] = True
        for idx, alpha in zip(order, ratios):
            score = layers[idx][0]
            count = min(n - window, floor_count(alpha, n))
            if count + window == 0:
                count = 1
            top = topk_ascending(score[:n - window], count)
            indices = torch.cat([top, torch.arange(n - window, n)])
            out[idx] = Choice(indices, protected_priority(score, protected), top.numel())
        return out
