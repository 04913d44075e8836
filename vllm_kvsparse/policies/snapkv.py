"""SnapKV: keep the prefix tokens the observation window attends to most, plus the window.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv 2404.14469. Official code: ``FasterDecoding/SnapKV``,
``snapkv/monkeypatch/snapkv_utils.py`` (``SnapKVCluster.update_kv``) and
``snapkv/monkeypatch/*_hijack_4_37.py``.

As the official code runs it (once, after the prompt's prefill; decoding appends)::

    W = [n-w, n) (observation window), P = [0, n-w)
    v_h[j] = sum_{i in W} softmax_causal(q_i k^T * scale)^h[j],  j in P      (fp32)
    s_h    = pool1d(v_h, kernel, stride 1, padding kernel//2)   avg (zero padded) or max
    keep   = topk_{j in P}(s, C - w) ∪ W;  no compression if n <= C

Parameters (official ``SnapKVCluster`` init defaults, except the budget): ``budget=0.2``,
``window=32``, ``kernel=5``, ``pooling="avg"``. The paper's LongBench configs use
``kernel=7, pooling="max"``.

Deviations of the project:

- Budget is a fraction: ``C = max(1, floor(budget * n))`` (the official ``max_capacity_prompt``
  is an absolute count, default 2048); the window is counted inside it, and clamped to
  ``w = min(window, C)`` (both the observation window and the kept window) when ``C < window``.
- Granularity is per layer: vLLM's paged cache evicts whole tokens for all KV heads, so one set
  per layer. The official code repeats K/V to the H query heads and selects per query head;
  here the pooled per-head scores are averaged over all H heads before top-k (kvpress reduces
  over the GQA group by mean after pooling, citing SnapKV issue #22; this is the same reduction
  taken over all heads).
- Scores stay fp32 (the official code casts the softmax back to fp16/bf16); top-k ties go to
  the lower index.
- Average pooling is linear, so with ``pooling="avg"`` the head mean is taken before pooling
  and the scores go through ``LayerInput.scores_fn`` when given (same result); max pooling uses
  the per-head torch path.
- ``Choice.priority``: the pooled scores, window tokens above all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Choice, LayerInput, Policy, PromptInfo, StepState, shard_mean
from .common import (budget_count, head_mean_column_sums, keep_all, per_head_column_sums,
                     pool1d, protected_priority, topk_ascending)

POOLINGS = ("avg", "max")


def window_scores(inp: LayerInput, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """SnapKV's prefix scores, fp32 ``[n - window]`` (pooled, then mean over all heads)."""
    n = inp.query.shape[0]
    probe = torch.arange(n - window, n, device=inp.query.device)
    if pooling == "avg" or kernel == 1:
        acc = head_mean_column_sums(inp.query, inp.key, probe, inp.scale, inp.scores_fn,
                                    inp.shards)
        return pool1d(acc[:n - window], kernel, "avg")
    per_head = per_head_column_sums(inp.query, inp.key, probe, inp.scale)[:, :n - window]
    return shard_mean(inp.shards, pool1d(per_head, kernel, pooling).mean(0))


def select_with_window(scores: torch.Tensor, n: int, window: int, count: int) -> Choice:
    """``topk(scores over [0, n-window), count) ∪ [n-window, n)``."""
    prefix = topk_ascending(scores, count)
    indices = torch.cat([prefix, torch.arange(n - window, n)])
    padded = torch.cat([scores.float().cpu(), torch.zeros(window)])
    protected = torch.zeros(n, dtype=torch.bool)
    protected[n - window:] = True
    return Choice(indices, protected_priority(padded, protected), prefix.numel())


@dataclass(frozen=True)
class SnapKV(Policy):
    """Parameters: budget=0.2 (kept fraction of the prompt, window included, in (0, 1]);
    window=32 (observation + kept recent window, integer >= 1); kernel=5 (pooling kernel, odd
    integer >= 1); pooling "avg" | "max"."""

    budget: float = 0.2
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"

    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        self._check_fraction("budget")
        self._check_int("window", 1)
        self._check_int("kernel", 1)
        if self.kernel % 2 == 0:
            raise self._bad("kernel", "odd integers >= 1")
        self._check_choice("pooling", POOLINGS)

    def prefix_count(self, state: StepState, layer_idx: int, n: int, capacity: int,
                     window: int) -> int:
        """Prefix tokens kept by score in this layer (SnapKV: uniform ``C - w``)."""
        return capacity - window

    def _capacity_and_window(self, n: int) -> tuple[int, int] | None:
        """(C, w) of an n-token prompt; None when it keeps everything (n <= C)."""
        capacity = budget_count(self.budget, n)
        return None if n <= capacity else (capacity, min(self.window, capacity))

    def query_rows(self, prompt: PromptInfo) -> torch.Tensor:
        n = prompt.num_tokens
        sizes = self._capacity_and_window(n)
        if sizes is None:
            return torch.zeros(0, dtype=torch.long)
        return torch.arange(n - sizes[1], n)   # the observation window

    def layer(self, state: StepState, inp: LayerInput) -> Choice:
        prompt = state.prompt
        self._check_input(prompt, inp)
        n = prompt.num_tokens
        sizes = self._capacity_and_window(n)
        if sizes is None:
            return keep_all(n)
        capacity, window = sizes
        count = self.prefix_count(state, inp.layer_idx, n, capacity, window)
        scores = window_scores(inp, window, self.kernel, self.pooling)
        return select_with_window(scores, n, window, count)
