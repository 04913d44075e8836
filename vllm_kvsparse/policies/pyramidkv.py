"""PyramidKV: SnapKV scoring with a linearly decreasing per-layer capacity.

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv 2406.02069. Official code: ``Zefan-Cai/KVCache-Factory``,
``pyramidkv/pyramidkv_utils.py`` (``PyramidKVCluster``, ``init_pyramidkv``) and
``run_longbench.py``.

Scoring is SnapKV's (``snapkv.py``). Per-layer capacity, as the official code computes it
(layer ``l`` 0-based, ``L`` layers)::

    B = C - w;  min = floor(B / beta);  max = 2B - min
    if max >= n - w:  max = n - w;  min = 2B - max
    step = floor((max - min) / (L - 1));  cap_l = max - l * step
    n <= C  -> no compression
    n < 2B  -> keep topk(B) ∪ W          (uniform: plain SnapKV)
    else    -> keep topk(cap_l) ∪ W

Parameters: ``budget=0.2``, ``window=32``, ``kernel=5``, ``pooling="avg"`` (the
``PyramidKVCluster`` init defaults; ``run_longbench.py`` uses window 8, kernel 7, max pooling),
``beta=20``.

Deviations of the project: those of SnapKV (fraction budget ``C = max(1, floor(budget * n))``
with ``w = min(window, C)``, one set per layer from the head-mean of the pooled scores, fp32,
lower-index ties), plus ``L = 1`` -> uniform ``B`` (the official step divides by ``L - 1``).
The floored step makes the total slightly larger than ``L * B`` (as the official code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import StepState
from .snapkv import SnapKV


def pyramid_capacity(n: int, capacity: int, window: int, beta: int, num_layers: int,
                     layer_idx: int) -> int:
    """Prefix tokens kept by score in ``layer_idx`` (``n > capacity`` assumed)."""
    base = capacity - window
    if n < 2 * base or num_layers == 1:
        return base
    lo = base // beta
    hi = 2 * base - lo
    if hi >= n - window:
        hi = n - window
        lo = 2 * base - hi
    step = (hi - lo) // (num_layers - 1)
    return hi - layer_idx * step


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """Parameters: SnapKV's (budget=0.2, window=32, kernel=5, pooling="avg") plus beta=20
    (integer >= 1: the top layer keeps about B/beta prefix tokens)."""

    beta: int = 20

    name: ClassVar[str] = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_int("beta", 1)

    def prefix_count(self, state: StepState, layer_idx: int, n: int, capacity: int,
                     window: int) -> int:
        return pyramid_capacity(n, capacity, window, self.beta, state.prompt.num_layers,
                                layer_idx)
