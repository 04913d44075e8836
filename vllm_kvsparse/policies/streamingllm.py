"""StreamingLLM: attention sinks plus the most recent tokens; no scores.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv 2309.17453. Official code: ``mit-han-lab/streaming-llm``,
``streaming_llm/kv_cache.py`` (``StartRecentKVCache``),
``streaming_llm/pos_shift/modify_llama.py``, ``examples/run_streaming_llama.py``.

Official: ``keep(m) = [0, s) ∪ [m - r, m)`` with ``s = start_size = 4`` sinks and
``r = recent_size``, applied before each new turn (a prompt is never compressed during its own
prefill), positions renumbered relative to the cache.

The plugin runs it as the prefill-compression ports do (KVCache-Factory
``StreamingLLMKVCluster``, kvpress ``StreamingLLMPress``): after the prompt's prefill each layer
keeps ``[0, s) ∪ [n - (C - s), n)`` with ``C = max(1, floor(budget * n))``.

Parameters: ``budget=0.2``, ``sinks=4`` (official ``start_size``).

Deviations of the project:

- Prefill compression with a fraction budget (the official cache is an absolute
  ``start_size + recent_size`` applied between turns).
- Original positions are kept (vLLM caches post-RoPE keys, and Qwen2-VL's M-RoPE visual
  positions cannot be sensibly renumbered); the official code re-rotates keys at cache-relative
  positions.
- ``C < sinks``: the first ``C`` tokens are kept and no recent ones.
- ``Choice.priority``: recency (position ``j`` -> ``j``), sinks above all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Choice, LayerInput, Policy, PromptInfo, StepState
from .common import budget_count, keep_all, protected_priority


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """Parameters: budget=0.2 (kept fraction of the prompt, sinks included, in (0, 1]);
    sinks=4 (integer >= 0)."""

    budget: float = 0.2
    sinks: int = 4

    name: ClassVar[str] = "streamingllm"

    def __post_init__(self) -> None:
        self._check_fraction("budget")
        self._check_int("sinks", 0)

    def query_rows(self, prompt: PromptInfo) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)   # decides without attention scores

    def layer(self, state: StepState, inp: LayerInput) -> Choice:
        prompt = state.prompt
        self._check_input(prompt, inp)
        n = prompt.num_tokens
        capacity = budget_count(self.budget, n)
        recency = torch.arange(n, dtype=torch.float32)
        if n <= capacity:
            return keep_all(n, recency)
        sinks = min(self.sinks, capacity)
        indices = torch.cat([torch.arange(sinks), torch.arange(n - (capacity - sinks), n)])
        protected = torch.zeros(n, dtype=torch.bool)
        protected[:sinks] = True
        return Choice(indices, protected_priority(recency, protected), 0)
