"""The policy contract: what a KV-sparsity method sees and decides (torch only, no vLLM).

A *policy* is one method with its parameters (a frozen dataclass). For one request in one prefill
step the caller (the vLLM glue, or a researcher directly) runs::

    state = policy.begin(PromptInfo(...))          # once per (request, step)
    for each decoder layer l, in order:
        choice = policy.layer(state, LayerInput(...))   # Choice now, or None if deferred
    deferred = policy.finish(state)                 # {layer_idx: Choice} for deferred layers

``select_all_layers`` does exactly that. Conventions shared by every method (docs/policies.md):
kept indices are ascending original prompt positions on CPU; top-k ties go to the lower index;
budget counts are ``C = max(1, floor(b * n))`` (``n`` = prompt length, or ``|V|`` where only
visual tokens may be dropped) and ``n <= C`` means no compression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch

__all__ = ["PolicyError", "PromptInfo", "HeadShards", "LayerInput", "Choice", "Policy",
           "StepState", "select_all_layers"]


class PolicyError(ValueError):
    """A bad policy parameter or option; the message is one line naming the method."""


@dataclass
class PromptInfo:
    """One request's prompt, fixed for the step.

    num_tokens:   n, the prompt length.
    visual_mask:  bool [n], True at image/video placeholder positions (None: no image).
    num_layers:   L, decoder layers.
    num_heads, num_kv_heads: H and Hkv (query head h reads KV head h // (H // Hkv)).
    """

    num_tokens: int
    visual_mask: torch.Tensor | None
    num_layers: int
    num_heads: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"PromptInfo: num_tokens={self.num_tokens} must be >= 1")
        if self.num_layers < 1:
            raise ValueError(f"PromptInfo: num_layers={self.num_layers} must be >= 1")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"PromptInfo: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.visual_mask is not None:
            if self.visual_mask.dtype != torch.bool or self.visual_mask.shape != (self.num_tokens,):
                raise ValueError(f"PromptInfo: visual_mask must be bool [{self.num_tokens}], got "
                                 f"{self.visual_mask.dtype} {tuple(self.visual_mask.shape)}")

    def visual_cpu(self) -> torch.Tensor:
        """bool [n] on CPU (all False when there is no image)."""
        if self.visual_mask is None:
            return torch.zeros(self.num_tokens, dtype=torch.bool)
        return self.visual_mask.cpu()


@dataclass(frozen=True)
class HeadShards:
    """The query and key heads a policy sees are one of ``size`` equal shards of the layer's
    heads (tensor parallelism: each rank holds H/size query heads). ``all_reduce_sum`` sums a
    tensor over the shards and returns the same result on every shard (vLLM's TP all-reduce).

    A policy turns every statistic it takes over heads into the all-heads one with ``mean``
    (for a mean over this shard's heads), so every shard selects what one device holding all
    heads would. Every shard must reach the same ``mean`` calls in the same order with the same
    shapes: the control flow of a policy may depend only on the prompt and on reduced values.
    """

    size: int
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over all heads of ``x``, a mean over this shard's heads (equal shards)."""
        return self.all_reduce_sum(x.contiguous()) / self.size


def shard_mean(shards: "HeadShards | None", x: torch.Tensor) -> torch.Tensor:
    """``x`` (a mean over the heads given) as the mean over all heads: itself without shards."""
    return x if shards is None else shards.mean(x)


@dataclass
class LayerInput:
    """What a policy gets for one request in one layer.

    query [n, H, d] post-RoPE prompt queries; key [n, Hkv, d]; scale (softmax scale).
    scores_fn: optional ``(query, key, probe_idx, scale) -> (accumulated [n], normalized [n])``
    fp32, head-averaged causal-softmax column sums over the probe rows, as
    ``vllm_kvsparse.zipvl.probe_attention_scores`` (the glue passes the fused Triton kernel on
    CUDA). Methods whose scores are such sums use it when given.
    shards: set when query/key hold one tensor-parallel shard of the heads (``HeadShards``);
    None when they hold all of them.
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    scale: float
    scores_fn: Callable | None = None
    shards: HeadShards | None = None


@dataclass
class Choice:
    """A layer's decision for one request.

    indices:    LongTensor [t] on CPU, ascending unique kept prompt positions.
    priority:   float32 [n] on CPU, higher = more worth keeping (tokens the method always keeps
                rank above every scored token). The glue tops up partially filled KV blocks
                with it (``eviction.kept_set_for_eviction``).
    num_scored: optional statistic for records (ZipVL: p of Eq. 7; others: tokens chosen by
                score).
    """

    indices: torch.Tensor
    priority: torch.Tensor
    num_scored: int | None = None


@dataclass
class StepState:
    """Default per-(request, step) state: the prompt plus a scratch dict for the method."""

    prompt: PromptInfo
    data: dict = field(default_factory=dict)


def _fmt_valid(valid: Any) -> str:
    if isinstance(valid, (tuple, list)):
        return ", ".join(repr(v) for v in valid)
    return str(valid)


class Policy:
    """Base class of the methods; subclasses are ``@dataclass(frozen=True)`` with parameters.

    sparse_prefill: True (zipvl, fastv): in the step itself kept rows attend only over the kept
        set and dropped rows' attention outputs are zero. False: prefill attention is dense and
        the dropped K/V is evicted afterwards.
    deferred: True (vlcache, aircache): layer budgets need every layer's scores; ``layer()``
        returns None and ``finish()`` decides all layers at the end of the step.
    visual_only: True where only visual tokens are ever dropped (fastv, aircache).
    """

    name: ClassVar[str] = "base"
    sparse_prefill: ClassVar[bool] = False
    deferred: ClassVar[bool] = False
    visual_only: ClassVar[bool] = False

    # ---- the contract ------------------------------------------------------------------

    def begin(self, prompt: PromptInfo) -> Any:
        return StepState(prompt)

    def layer(self, state: Any, inp: LayerInput) -> Choice | None:
        raise NotImplementedError

    def finish(self, state: Any) -> dict[int, Choice]:
        return {}

    def query_rows(self, prompt: PromptInfo) -> torch.Tensor:
        """The prompt positions whose query rows ``layer`` reads (LongTensor, ascending, CPU):
        its probe rows. ``layer`` must decide the same with every other query row replaced by
        anything (tests/unit/test_policies.py checks it). Chunked prefill keeps only these rows
        of the chunks before the last, since the queries of a chunk are gone once it ran.
        Default: every row (correct for any method, costly for a long prompt)."""
        return torch.arange(prompt.num_tokens)

    # ---- options -----------------------------------------------------------------------

    @classmethod
    def option_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_options(cls, options: dict | None = None) -> "Policy":
        """Build from a dict of parameters; unknown keys and bad values raise PolicyError."""
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise PolicyError(f"{cls.name}: options must be a JSON object, got "
                              f"{type(options).__name__}")
        keys = cls.option_keys()
        for key in options:
            if key not in keys:
                raise PolicyError(f"{cls.name}: unknown option {key!r}; valid keys are "
                                  f"{', '.join(keys)}")
        return cls(**options)

    # ---- validation helpers for __post_init__ -----------------------------------------------

    def _bad(self, key: str, valid: Any) -> PolicyError:
        return PolicyError(f"{self.name}: {key}={getattr(self, key)!r} is invalid; "
                           f"valid values are {_fmt_valid(valid)}")

    def _check_fraction(self, key: str, *, allow_zero: bool = False) -> None:
        value = getattr(self, key)
        lo = "[0, 1]" if allow_zero else "(0, 1]"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                or not ((0.0 <= value) if allow_zero else (0.0 < value)) or value > 1.0:
            raise self._bad(key, f"numbers in {lo}")
        object.__setattr__(self, key, float(value))

    def _check_int(self, key: str, minimum: int | None = None) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, int) \
                or (minimum is not None and value < minimum):
            raise self._bad(key, "integers" if minimum is None else f"integers >= {minimum}")

    def _check_bool(self, key: str) -> None:
        if not isinstance(getattr(self, key), bool):
            raise self._bad(key, "true, false")

    def _check_choice(self, key: str, choices: tuple) -> None:
        if getattr(self, key) not in choices:
            raise self._bad(key, choices)

    # ---- shared per-layer checks --------------------------------------------------------------

    @staticmethod
    def _check_input(prompt: PromptInfo, inp: LayerInput) -> None:
        q, k = inp.query, inp.key
        if q.dim() != 3 or k.dim() != 3:
            raise ValueError(f"query must be [n, H, d] and key [n, Hkv, d], got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")
        n = prompt.num_tokens
        if q.shape[0] != n or k.shape[0] != n:
            raise ValueError(f"layer {inp.layer_idx}: prompt has {n} tokens but query/key have "
                             f"{q.shape[0]}/{k.shape[0]}")
        if q.shape[1] != prompt.num_heads or k.shape[1] != prompt.num_kv_heads:
            raise ValueError(f"layer {inp.layer_idx}: expected {prompt.num_heads}/"
                             f"{prompt.num_kv_heads} heads, got {q.shape[1]}/{k.shape[1]}")
        if not 0 <= inp.layer_idx < prompt.num_layers:
            raise ValueError(f"layer_idx={inp.layer_idx} outside [0, {prompt.num_layers})")


def select_all_layers(policy: Policy, prompt: PromptInfo,
                      inputs: list[LayerInput]) -> list[Choice]:
    """Run begin, layer (in the given order) and finish; one Choice per input, same order."""
    state = policy.begin(prompt)
    now: dict[int, Choice] = {}
    for inp in inputs:
        choice = policy.layer(state, inp)
        if choice is not None:
            now[inp.layer_idx] = choice
    now.update(policy.finish(state))
    missing = [inp.layer_idx for inp in inputs if inp.layer_idx not in now]
    if missing:
        raise RuntimeError(f"{policy.name}: no decision for layers {missing}")
    return [now[inp.layer_idx] for inp in inputs]
