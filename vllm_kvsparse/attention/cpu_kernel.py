"""Token-sparse prefill attention on CPU through vLLM's own CPU attention kernel.

The kept set ``T`` of one request is ascending, so causality by original position equals
causality by rank within ``T``: sparse attention over ``T`` is ordinary causal prefill attention
of a "virtual" sequence made of the kept rows only. That sequence is written, in the cache
dtype and vLLM's ISA-specific block layout, into a scratch paged cache of
``ceil(t / block_size)`` blocks (vLLM's cache-write op, ``cpu_attn_reshape_and_cache``), and
vLLM's kernel (``cpu_attention_with_kv_cache``, the one dense prefill runs: AMX tiles on a
Xeon with AMX, AVX-512 / AVX2 vector code elsewhere) attends the kept queries over it with a
virtual block table ``0..B-1``, ``query_start_loc = [0, t]``, ``seq_lens = [t]``.

So the sparse path costs what dense prefill of a ``t``-token prompt costs on the same CPU,
and computes in the same precision as vLLM's dense path (bf16 inputs, fp32 softmax and
accumulation inside the kernel; the cache dtype's K/V). The torch path
(``zipvl.sparse_prefill_attention_reference``, fp32 SDPA over gathered rows) stays the
reference.

``CALLS`` counts kernel invocations, so tests can check that the sparse path really runs this
kernel and did not fall back silently.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vllm import _custom_ops as ops

CALLS = {"cpu_attention_with_kv_cache": 0}

# Which sparse-attention kernel the CPU backend runs (SparsityConfig.cpu_sparse_kernel, the
# `cpu_sparse_kernel` key of --kv-sparsity-config). "auto" picks by CPU kind, from side-by-side
# runs of benchmarks/prefill_ttft.py (benchmarks/results/README.md):
#  - AVX-512 (vLLM's "vec" kernel built for it): vLLM's kernel ran the sparse attention 24-31 %
#    faster than the fp32 torch SDPA path (AMD EPYC, AVX-512 bf16, 2K and 8K prompts);
#  - AMX (vLLM's "amx" ISA): the kernel dense prefill runs with AMX tiles; it ran the sparse
#    attention 3.1x faster than the torch path (0.114 vs 0.353 s at 8K, Xeon with AMX-bf16);
#  - AVX2 only: torch was faster per FLOP (sparse / (kept-FLOP fraction x dense vLLM) 0.82 vs
#    0.99 at 8K, benchmarks/selection_cost.py), so the torch path.
# "vllm" and "torch" force one (both tested end to end: tests/e2e/test_sparse_prefill.py).


def choose_kernel(setting: str, isa: str, cpu_capability: str | None = None) -> str:
    """"vllm" or "torch" for the config's `setting` (auto, vllm, torch; validated by
    SparsityConfig), the layer's vLLM attention `isa` and torch's CPU capability ("AVX512",
    "AVX2", ...; read from this CPU when None)."""
    if setting in ("vllm", "torch"):
        return setting
    if cpu_capability is None:
        cpu_capability = torch.backends.cpu.get_cpu_capability()
    return "vllm" if isa == "amx" or cpu_capability.startswith("AVX512") else "torch"


@dataclass(frozen=True)
class CPUKernelSpec:
    """What vLLM's CPU kernel needs besides the tensors (all from the engine's layer/impl)."""

    isa: str                    # layer.isa, set by vLLM's CPU metadata builder
    block_size: int             # the KV cache's block size (the ISA's layout assumes it)
    cache_dtype: torch.dtype    # the paged cache tensor's dtype
    kv_cache_dtype: str = "auto"
    k_scale: float = 1.0
    v_scale: float = 1.0


@functools.cache
def _request_amx() -> None:
    """Linux gives a process AMX tiles only after it asks (arch_prctl); without that, the
    kernel's first tile instruction kills it with SIGILL. vLLM's engine has asked before any
    layer runs; outside it (tests, benchmarks/selection_cost.py) nobody has. Once per process
    (a refusal is not cached: it raises again)."""
    if not torch.cpu._init_amx():
        raise RuntimeError("vLLM's CPU attention ISA is 'amx' but the kernel refused AMX tiles "
                           "(torch.cpu._init_amx() failed)")


def default_spec(dtype: torch.dtype, head_dim: int, block_size: int = 32) -> CPUKernelSpec:
    """The spec vLLM's builder would pick for a ``dtype`` model with an "auto" cache."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return CPUKernelSpec(_get_attn_isa(dtype, block_size, head_dim, "auto"), block_size, dtype)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     spec: CPUKernelSpec) -> torch.Tensor:
    """Causal self-attention of one packed sequence (key/value [t, Hkv, d]) by vLLM's CPU
    kernel over a scratch paged cache, for its last r query rows (query [r, H, d], r <= t: the
    kernel's chunked-prefill alignment, row i sees keys 0..t-r+i). Returns [r, H, d] in
    query's dtype."""
    r, num_heads, head_dim = query.shape
    t, num_kv_heads = key.shape[:2]
    if spec.isa == "amx":
        _request_amx()
    bs = spec.block_size
    num_blocks = (t + bs - 1) // bs
    cache = torch.empty(num_blocks, num_kv_heads, 2 * bs, head_dim, dtype=spec.cache_dtype)
    # The tail of the last block is padding the kernel reads (masked logits, weight 0): it
    # must hold finite values, since 0 * NaN garbage would be NaN.
    cache[-1].zero_()
    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key.contiguous(), value.contiguous(), key_cache, value_cache,
                                   torch.arange(t, dtype=torch.int64), spec.isa,
                                   k_scale=spec.k_scale, v_scale=spec.v_scale,
                                   kv_cache_dtype=spec.kv_cache_dtype)
    qsl = torch.tensor([0, r], dtype=torch.int32)
    seq_lens = torch.tensor([t], dtype=torch.int32)
    block_table = torch.arange(num_blocks, dtype=torch.int32)[None, :]
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        seq_lens=seq_lens, dtype=query.dtype, query_start_loc=qsl, causal=True,
        sliding_window_size=-1, isa=spec.isa, enable_kv_split=False,
        kv_cache_dtype=spec.kv_cache_dtype)
    out = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query.contiguous(), key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=qsl, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=block_table, softcap=0.0, scheduler_metadata=sched,
        s_aux=None, k_scale=spec.k_scale, v_scale=spec.v_scale,
        kv_cache_dtype=spec.kv_cache_dtype)
    CALLS["cpu_attention_with_kv_cache"] += 1
    return out


def sparse_prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             indices: torch.Tensor, scale: float,
                             spec: CPUKernelSpec, first_row: int = 0) -> torch.Tensor:
    """Token-sparse causal attention (ZipVL step 8) of one sequence by vLLM's CPU kernel:
    rows in ``indices`` (ascending) attend to the rows of ``indices`` at positions <= their
    own; other rows are zero; with ``first_row``, only rows at positions >= first_row (a
    suffix of the kept set) are computed. Same contract as
    ``zipvl.sparse_prefill_attention_reference``."""
    n, num_heads, _ = query.shape
    out = torch.zeros(n, num_heads, value.shape[2], dtype=query.dtype, device=query.device)
    indices = indices.to(query.device).long()
    rows = indices if first_row <= 0 else indices[indices >= first_row]
    if rows.numel() == 0:
        return out
    out[rows] = causal_attention(query[rows], key[indices], value[indices], scale, spec)
    return out
