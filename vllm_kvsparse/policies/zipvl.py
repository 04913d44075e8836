"""ZipVL as a policy: adaptive, attention-mass budget per layer, token-sparse prefill.

Paper: He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token
Sparsification", arXiv 2410.08584. No official code is public; the project's implementation is
``vllm_kvsparse.zipvl.select_important_tokens`` (its docstring and
docs/policies.md), which this policy calls unchanged.

Per layer: probe rows = the last ``num_recent_probes`` positions plus ``num_random_probes``
seeded-random positions; ``a_j`` = sum over probe rows of the head-mean causal softmax (Eq. 6);
``p`` = fewest tokens holding ``tau`` of the probe mass (Eq. 7); kept = top-``p`` by the
visibility-normalised score (Eq. 8-9). ``Choice.priority`` is the normalised score,
``Choice.num_scored`` is ``p``.

Deviations of the project (all documented in zipvl.py): ``keep_first`` sinks and ``keep_last``
recent tokens are kept on top of the paper's set; ``scope="visual"`` lets only image/video
placeholder tokens be dropped (with no image nothing is dropped); the same probe seed is used
in every layer. There is no ``budget``: the kept fraction is adaptive (set ``tau``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import zipvl as _zipvl
from .base import Choice, LayerInput, Policy, PolicyError, PromptInfo, StepState
from .common import scores_over_all_heads

SCOPES = ("all", "visual")


@dataclass(frozen=True)
class ZipVL(Policy):
    """Parameters (defaults = the paper's best setting plus the project's additions):
    tau=0.975 in (0, 1]; num_recent_probes=64, num_random_probes=64 (>= 0, sum >= 1);
    keep_first=4, keep_last=1 (>= 0); scope "all" | "visual"; seed=0 (probe positions)."""

    tau: float = 0.975
    num_recent_probes: int = 64
    num_random_probes: int = 64
    keep_first: int = 4
    keep_last: int = 1
    scope: str = "all"
    seed: int = 0

    name: ClassVar[str] = "zipvl"
    sparse_prefill: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_fraction("tau")
        for key in ("num_recent_probes", "num_random_probes", "keep_first", "keep_last"):
            self._check_int(key, 0)
        if self.num_recent_probes + self.num_random_probes == 0:
            raise PolicyError("zipvl: num_recent_probes + num_random_probes = 0 is invalid; "
                              "valid values have a sum >= 1")
        self._check_choice("scope", SCOPES)
        self._check_int("seed")

    @classmethod
    def from_options(cls, options=None):
        if isinstance(options, dict) and "budget" in options:
            raise PolicyError("zipvl: budget is not a zipvl parameter "
                              "(its budget is adaptive: set tau)")
        return super().from_options(options)

    def query_rows(self, prompt: PromptInfo) -> torch.Tensor:
        return _zipvl.default_probe_indices(prompt.num_tokens, self.num_recent_probes,
                                            self.num_random_probes, self.seed)

    def layer(self, state: StepState, inp: LayerInput) -> Choice:
        prompt = state.prompt
        self._check_input(prompt, inp)
        candidate = None
        if self.scope == "visual":
            candidate = prompt.visual_cpu().to(inp.query.device)
        sel = _zipvl.select_important_tokens(
            inp.query, inp.key, tau=self.tau, probe_idx=self.query_rows(prompt),
            keep_first=self.keep_first, keep_last=self.keep_last, scale=inp.scale,
            candidate_mask=candidate, scores_fn=scores_over_all_heads(inp.scores_fn, inp.shards))
        return Choice(sel.indices.cpu(), sel.normalized.float().cpu(), sel.num_important)
