"""FastV: prune visual tokens after layer K by the last prompt token's attention.

Paper: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764.
Official code: ``pkunlp-icler/FastV``,
``src/transformers/src/transformers/models/llama/modeling_llama.py`` (``LlamaModel.forward``,
``FASTV_INPLACE`` branch) and the KV-cache variant
``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py``
(``fastv_forward``).

As the official code runs it:

- layers ``0..K-1`` are dense over all ``n`` tokens;
- at layer ``K-1``: ``a = mean_h A^{K-1,h}[n-1, :]`` (the last prompt token's causal softmax
  row, fp32, mean over the query heads);
- kept = all text ∪ the ``round(|V| * budget)`` visual tokens with the largest ``a``
  (ties to the lower index), original positions; layers ``K..L-1`` run on that set only.

Parameters: ``k=2`` (K, the official default) and ``budget=0.5`` = kept visual fraction
``1 - R`` (official default R = 50 %).

Deviations of the project:

- Visual tokens come from ``PromptInfo.visual_mask`` (any number of spans, any place), not the
  official single 576-token span.
- Rounding: ``max(1, floor(|V| * budget + 0.5))`` (half up, and at least one visual token, as
  every budget here); Python's ``round`` would round half to even.
- The official code drops the pruned tokens' hidden states, so layers >= K also skip their MLP.
  Here (``sparse_prefill``) kept rows attend only over the kept set and dropped rows' attention
  outputs are zero, so kept tokens compute what FastV computes; the dropped rows still pass
  through the MLPs (no MLP FLOPs saved) and their K/V is evicted from layers >= K after the
  layer's prefill. Layers < K keep all K/V, as FastV's KV-cache variant.
- ``k >= num_layers``: no layer is pruned (every layer keeps all). No visual token: keep all.
- ``a`` goes through ``LayerInput.scores_fn`` (probe row ``n-1``) when given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Choice, LayerInput, Policy, PromptInfo, StepState
from .common import head_mean_column_sums, keep_all, protected_priority, topk_ascending


@dataclass(frozen=True)
class FastV(Policy):
    """Parameters: k=2 (integer >= 1: layers < k are dense, layer k-1 scores, layers >= k keep
    the set); budget=0.5 = kept fraction of the visual tokens, in (0, 1]."""

    k: int = 2
    budget: float = 0.5

    name: ClassVar[str] = "fastv"
    sparse_prefill: ClassVar[bool] = True
    visual_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_int("k", 1)
        self._check_fraction("budget")

    @property
    def scoring_layer(self) -> int:
        """The layer whose attention decides the kept set (the glue must not exempt it)."""
        return self.k - 1

    def visual_keep_count(self, num_visual: int) -> int:
        return min(num_visual, max(1, int(math.floor(num_visual * self.budget + 0.5))))

    def query_rows(self, prompt: PromptInfo) -> torch.Tensor:
        return torch.tensor([prompt.num_tokens - 1])   # the last token, at layer K

    def layer(self, state: StepState, inp: LayerInput) -> Choice:
        prompt = state.prompt
        self._check_input(prompt, inp)
        n = prompt.num_tokens
        visual = prompt.visual_cpu()
        num_visual = int(visual.sum())
        if self.k >= prompt.num_layers or num_visual == 0 \
                or self.visual_keep_count(num_visual) >= num_visual:
            return keep_all(n)
        if inp.layer_idx < self.k - 1:
            return keep_all(n)
        if inp.layer_idx == self.k - 1:
            last = torch.tensor([n - 1], device=inp.query.device)
            scores = head_mean_column_sums(inp.query, inp.key, last, inp.scale,
                                           inp.scores_fn, inp.shards).cpu()
            kept_visual = topk_ascending(scores, self.visual_keep_count(num_visual), visual)
            keep = ~visual
            keep[kept_visual] = True
            state.data["choice"] = Choice(torch.nonzero(keep).flatten(),
                                          protected_priority(scores, ~visual),
                                          kept_visual.numel())
            return keep_all(n)
        if "choice" not in state.data:
            raise RuntimeError(f"fastv: layer {inp.layer_idx} before layer {self.k - 1} scored")
        return state.data["choice"]
