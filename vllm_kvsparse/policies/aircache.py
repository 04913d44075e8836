"""AirCache: visual-token eviction scored by "elite" text rows, layer budgets from the strength
and skewness of visual importance (deferred, visual only).

Paper: Huang et al., "AirCache: Activating Inter-modal Relevancy KV Cache Compression for
Efficient Large Vision-Language Model Inference", ICCV 2025, arXiv 2503.23956, and its
supplement. No official code is public; the equations are the main paper's §3 as transcribed in
the project's method notes (docs/policies.md) (not checked against the PDF).

Per layer ``l`` (``T`` the observation window: the text positions after the last visual token,
the instruction; ``V`` visual positions, ``N_v = |V|``)::

    att   = mean_h softmax(q_{T[-1]} K_T^T * scale)           # last text row over window keys
    E     = {j in T : att_j >= alpha * max att}                # elite text rows
    A_E   = softmax over keys V ∪ E (causal by original position) of the rows E, mean over heads
    I_v   = mean_{i in E} A_E[i, V]                            # visual importance [N_v]
    s_t,l = sum_v I_v                                          # strength
    s_k,l = N_v / ((N_v - 1)(N_v - 2)) * sum_v ((I_v - mu) / sigma)^3   # sample skewness

After the last layer (``finish``), with ``r = budget``::

    s'_t,l = s_t,l / mean_l s_t,l;   s'_k,l = max(s_k,l, 0) / mean_l max(s_k, 0)
    r_l    = 1/2 (s'_t,l + s'_k,l) * r, then clipped to [0, 1] with mean_l r_l = r
    keep_l = T ∪ topk_{v in V}(I_v, floor(r_l * N_v))

Parameters: ``budget=0.2`` (kept fraction of the visual tokens, averaged over layers),
``alpha=0.9`` (the paper's default; flat from 0.85 to 0.95).

Choices where the paper is silent (docs/policies.md, AirCache):

- the text rows: the observation window, the text after the last visual token (the
  supplement's observation-window ablation compares elite rows with "all text" and "last 32
  text" of that window). Not every text token: a system prompt before the image holds the
  attention sinks, which then become the only elite row, and under the causal mask a row
  before the image sees no visual key, so every importance would be 0 and the kept set the
  first visual tokens (measured on the committed tiny model, docs/eval.md). No text after the
  image: every text row is a candidate;
- heads: mean over query heads; masking: causal (elite row ``i`` sees keys of ``V ∪ E`` at
  positions <= ``i``); one set per layer;
- ``sigma`` is the sample standard deviation (ddof 1, matching the ``N_v/((N_v-1)(N_v-2))``
  sample-skewness factor); ``N_v < 3`` or ``sigma = 0`` gives skewness 0;
- skewness is clipped at 0 *before* the normalisation by its layer mean (normalising a negative
  mean would flip signs); a zero layer mean makes that term 1 in every layer;
- "clip to [0, 1] and rescale to mean r" is solved exactly by water-filling: layers whose
  ratio would exceed 1 are fixed at 1 and the others are rescaled, until none exceeds 1;
- no visual token, or no text token: every layer keeps all; ``budget=1``: keeps all;
- ``L`` = the layers ``layer()`` was called for (the glue may leave exempt layers dense).

Deviations: only visual K/V is evicted and all text is kept (the paper's scope). Full K/V is held
until every layer is scored (peak memory as dense, as the paper notes). Both attention passes
(the last text row; the elite rows over ``V ∪ E``) go through ``LayerInput.scores_fn`` when
given, on gathered sub-sequences (causal by rank = causal by original position). fp32; ties to
the lower index. ``Choice.priority``: ``I_v`` on visual positions, text above all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Choice, LayerInput, Policy, PromptInfo, StepState
from .common import floor_count, head_mean_column_sums, keep_all, protected_priority, topk_ascending


def sample_skewness(x: torch.Tensor) -> float:
    """``N/((N-1)(N-2)) * sum(((x - mean) / std)^3)`` with the ddof-1 std; 0 if undefined."""
    x = x.double()
    count = x.numel()
    if count < 3:
        return 0.0
    std = float(x.std(unbiased=True))
    if not std > 0:
        return 0.0
    z = (x - x.mean()) / std
    return count / ((count - 1) * (count - 2)) * float((z ** 3).sum())


def mean_normalise(values: list[float]) -> list[float]:
    """``v / mean(v)``; all ones when the mean is not positive."""
    mean = sum(values) / len(values)
    return [v / mean for v in values] if mean > 0 else [1.0] * len(values)


def clip_to_mean(raw: list[float], target: float) -> list[float]:
    """Ratios in [0, 1] with mean ``target``: ``min(1, c * raw_l)`` with ``c`` chosen so the
    mean is ``target`` (water-filling: saturated layers fixed at 1, the rest rescaled)."""
    count = len(raw)
    raw = [max(0.0, v) for v in raw]
    saturated: set[int] = set()
    while True:
        free = [i for i in range(count) if i not in saturated]
        left = target * count - len(saturated)
        free_sum = sum(raw[i] for i in free)
        if not free:
            return [1.0] * count
        if free_sum <= 0:
            each = min(1.0, max(0.0, left / len(free)))
            return [1.0 if i in saturated else each for i in range(count)]
        scale = left / free_sum
        over = [i for i in free if raw[i] * scale >= 1.0]
        if not over:
            return [1.0 if i in saturated else raw[i] * scale for i in range(count)]
        saturated.update(over)


def observation_window(visual: torch.Tensor) -> torch.Tensor:
    """The text positions after the last visual token (every text position if none follows
    it): the rows elite tokens are chosen from."""
    text = torch.nonzero(~visual).flatten()
    after = text[text > int(torch.nonzero(visual).flatten()[-1])]
    return after if after.numel() else text


@dataclass(frozen=True)
class AirCache(Policy):
    """Parameters: budget=0.2 (kept fraction of the visual tokens averaged over layers, in
    (0, 1]); alpha=0.9 (elite threshold relative to the last text row's maximum, in (0, 1])."""

    budget: float = 0.2
    alpha: float = 0.9

    name: ClassVar[str] = "aircache"
    deferred: ClassVar[bool] = True
    visual_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_fraction("budget")
        self._check_fraction("alpha")

    def _keeps_all(self, visual: torch.Tensor) -> bool:
        num_visual = int(visual.sum())
        return num_visual == 0 or num_visual == visual.numel() \
            or floor_count(self.budget, num_visual) >= num_visual

    def query_rows(self, prompt: PromptInfo) -> torch.Tensor:
        visual = prompt.visual_cpu()
        if self._keeps_all(visual):
            return torch.zeros(0, dtype=torch.long)
        return observation_window(visual)

    def layer(self, state: StepState, inp: LayerInput) -> None:
        prompt = state.prompt
        self._check_input(prompt, inp)
        layers = state.data.setdefault("layers", {})
        visual = prompt.visual_cpu()
        if self._keeps_all(visual):
            layers[inp.layer_idx] = None
            return None
        device = inp.query.device
        text_pos = self.query_rows(prompt)   # the observation window's text rows
        # elite rows: last text row over the window's text keys only
        sub = text_pos.to(device)
        last = torch.tensor([text_pos.numel() - 1], device=device)
        att = head_mean_column_sums(inp.query[sub], inp.key[sub], last, inp.scale,
                                    inp.scores_fn, inp.shards).cpu()
        elite = text_pos[att >= self.alpha * att.max()]
        # elite rows over visual ∪ elite keys, renormalised, causal by original position
        keys = torch.sort(torch.cat([torch.nonzero(visual).flatten(), elite])).values
        rows = torch.searchsorted(keys, elite)
        sub = keys.to(device)
        acc = head_mean_column_sums(inp.query[sub], inp.key[sub], rows.to(device), inp.scale,
                                    inp.scores_fn, inp.shards).cpu()
        importance = acc[visual[keys]] / elite.numel()                        # [N_v]
        layers[inp.layer_idx] = (importance.float(), float(importance.double().sum()),
                                 sample_skewness(importance))
        return None

    def layer_ratios(self, strengths: list[float], skews: list[float]) -> list[float]:
        strength = mean_normalise(strengths)
        skew = mean_normalise([max(0.0, s) for s in skews])
        raw = [0.5 * (a + b) * self.budget for a, b in zip(strength, skew)]
        return clip_to_mean(raw, self.budget)

    def finish(self, state: StepState) -> dict[int, Choice]:
        prompt = state.prompt
        n = prompt.num_tokens
        layers = state.data.get("layers", {})
        if not layers or any(v is None for v in layers.values()):
            return {idx: keep_all(n) for idx in layers}
        visual = prompt.visual_cpu()
        vis_pos = torch.nonzero(visual).flatten()
        order = sorted(layers)
        ratios = self.layer_ratios([layers[i][1] for i in order], [layers[i][2] for i in order])
        out = {}
        for idx, ratio in zip(order, ratios):
            importance = layers[idx][0]
            count = min(vis_pos.numel(), floor_count(ratio, vis_pos.numel()))
            top = vis_pos[topk_ascending(importance, count)]
            keep = ~visual
            keep[top] = True
            scores = torch.zeros(n)
            scores[vis_pos] = importance
            out[idx] = Choice(torch.nonzero(keep).flatten(),
                              protected_priority(scores, ~visual), top.numel())
        return out
