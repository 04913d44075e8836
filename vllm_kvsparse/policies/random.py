"""Random: a seeded, uniformly random kept set per layer (a control baseline).

Not from a paper: a control that any scoring method should beat at equal budget. Each layer keeps
``C = max(1, floor(budget * n))`` positions drawn uniformly without replacement
(``scope="visual"``: all text plus ``max(1, floor(budget * |V|))`` visual positions).

Reproducible on any device: the draw is ``torch.rand(n)`` from a CPU ``torch.Generator`` seeded
with ``(seed * 1_000_003 + layer_idx) mod 2**64``, and the kept set is its top-``C`` (ties to
the lower index), so the same (seed, layer, n) gives the same set everywhere.
``Choice.priority`` is the draw (text above all in visual scope). No visual token in visual
scope: keep all.

Parameters: ``budget=0.2``, ``seed=0``, ``scope="all"`` | ``"visual"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Choice, LayerInput, Policy, PromptInfo, StepState
from .common import budget_count, keep_all, protected_priority, topk_ascending

SCOPES = ("all", "visual")


def layer_draw(seed: int, layer_idx: int, n: int) -> torch.Tensor:
    """The uniform draw of one layer, fp32 [n] on CPU."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + layer_idx) % (1 << 64))
    return torch.rand(n, generator=gen)


@dataclass(frozen=True)
class Random(Policy):
    """Parameters: budget=0.2 (kept fraction of the prompt, or of the visual tokens in visual
    scope, in (0, 1]); seed=0 (integer); scope "all" | "visual"."""

    budget: float = 0.2
    seed: int = 0
    scope: str = "all"

    name: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        self._check_fraction("budget")
        self._check_int("seed")
        self._check_choice("scope", SCOPES)

    def query_rows(self, prompt: PromptInfo) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)   # decides without attention scores

    def layer(self, state: StepState, inp: LayerInput) -> Choice:
        prompt = state.prompt
        self._check_input(prompt, inp)
        n = prompt.num_tokens
        draw = layer_draw(self.seed, inp.layer_idx, n)
        if self.scope == "all":
            capacity = budget_count(self.budget, n)
            if n <= capacity:
                return keep_all(n, draw)
            return Choice(topk_ascending(draw, capacity), draw.clone(), capacity)
        visual = prompt.visual_cpu()
        num_visual = int(visual.sum())
        if num_visual == 0 or budget_count(self.budget, num_visual) >= num_visual:
            return keep_all(n, protected_priority(draw, ~visual))
        top = topk_ascending(draw, budget_count(self.budget, num_visual), visual)
        keep = ~visual
        keep[top] = True
        return Choice(torch.nonzero(keep).flatten(), protected_priority(draw, ~visual),
                      top.numel())
