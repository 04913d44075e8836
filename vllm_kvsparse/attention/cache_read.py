"""Plain K/V of a request's earlier tokens, read back from vLLM's paged KV cache.

Chunked prefill needs the K/V of a request's earlier prompt chunks, which exist only in the
paged cache. On CPU, vLLM 0.32's cache-write op (``cpu_attn_reshape_and_cache``) packs the
elements inside a block in an ISA-specific order for its kernels ("vec": K column-major
[head_dim, block_size], V row-major; "amx": tiles for AMX; ...). Rather than re-deriving each
order from C++ we do not ship, ``cpu_layout`` asks the op itself: it writes index-encoding
values into a scratch cache and records where each (token offset, head, dim) of K and V lands.
The learnt gather index is cached per (isa, block_size, num_kv_heads, head_dim, dtype), and a
read is then one vectorised gather per request.

The CUDA FlashAttention layout is plain (``flash_cache.read_flash_kv``, re-exported here);
this module imports vLLM only when a CPU layout is first learnt, so it stays importable where
vLLM is absent.
"""

from __future__ import annotations

import functools

import torch

from vllm_kvsparse.attention.flash_cache import read_flash_kv

__all__ = ["cpu_layout", "read_cpu_kv", "read_flash_kv"]

# Dtypes whose "auto" cache stores the model's values unchanged. An fp8 cache (uint8 / float8
# tensor, kv_cache_dtype "fp8*") holds K/V quantised with k_scale / v_scale: not a permutation
# of the written values, so there is no plain K/V to read back.
_PLAIN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# The index is encoded in base-256 digits, one cache write per digit: every integer in
# [0, 256) is exact in bf16 (8 significant bits), fp16 and fp32, whatever the index's size.
_BASE = 256
_EMPTY = -1.0  # scratch fill; never a digit, so it marks elements the op did not write


def _write(key, value, cache, slots, isa):
    """vLLM's CPU cache write, exactly as its backend calls it (cpu_attn.py, do_kv_cache_update:
    view [nb, H, 2 * bs, D], chunk into K and V halves on dim 2)."""
    from vllm import _custom_ops as ops

    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


@functools.lru_cache(maxsize=None)
def cpu_layout(isa: str, block_size: int, num_kv_heads: int, head_dim: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Where vLLM's CPU cache-write op puts each element inside one block.

    Returns ``(head, inner)``, LongTensors [2, block_size, H, D]: element [kv, r, h, d] (kv 0 for
    K, 1 for V; r the token's offset in its block) is stored at ``block[head, inner]`` of the
    block viewed as [H, 2 * block_size * D]. Learnt from the op (module docstring); raises
    ValueError if the op's write is not a permutation of the written values (a quantising or
    duplicating write), and whatever the op raises for a configuration it does not support."""
    if dtype not in _PLAIN_DTYPES:
        raise ValueError(f"cache dtype {dtype}: only {_PLAIN_DTYPES} caches hold plain K/V")
    H, D, bs = num_kv_heads, head_dim, block_size
    n = bs * H * D                       # elements per half (K or V) of a block
    src = torch.arange(2 * n).view(2, bs, H, D)   # K then V, each [token offset, head, dim]
    # Two blocks, written into block 1 only: block 0 must stay untouched (the write is
    # block-local, so the index learnt for one block holds for every block).
    slots = torch.arange(bs, bs * 2)
    decoded = torch.zeros(H, 2 * bs * D, dtype=torch.long)
    digits = 1
    while _BASE ** digits < 2 * n:
        digits += 1
    for k in range(digits):
        digit = (src // _BASE ** k % _BASE).to(dtype)
        cache = torch.full((2, H, 2 * bs, D), _EMPTY, dtype=dtype)
        _write(digit[0], digit[1], cache, slots, isa)
        got = cache.view(2, H, -1).double()
        if (got[0] != _EMPTY).any():
            raise ValueError(f"isa {isa!r}: the cache write touched a block it was not given")
        got = got[1]
        if (got == _EMPTY).any():
            raise ValueError(f"isa {isa!r}, block_size {bs}: the cache write left elements of "
                             "a full block unwritten (padding?); cannot read plain K/V back")
        if (got != got.round()).any() or (got < 0).any() or (got >= _BASE).any():
            raise ValueError(f"isa {isa!r}, {dtype}: the cache write does not store the "
                             "written values unchanged (quantised?); cannot read plain K/V back")
        decoded += got.long() * _BASE ** k
    # Each element of the block must hold exactly one written element: a permutation.
    flat = decoded.flatten()
    if not torch.equal(flat.sort().values, torch.arange(2 * n)):
        raise ValueError(f"isa {isa!r}, block_size {bs}: the cache write is not a permutation "
                         "of the written K/V; cannot read plain K/V back")
    pos = torch.empty_like(flat)
    pos[flat] = torch.arange(flat.numel())       # inverse permutation: element -> position
    pos = pos.view(2, bs, H, D)
    head, inner = pos // (2 * bs * D), pos % (2 * bs * D)
    # The digits only show where integers in [0, 256) go; check that arbitrary values of the
    # dtype come back unchanged through this index too (a write that rounded, say, would not).
    kv = torch.randn(2, bs, H, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    cache = torch.full((2, H, 2 * bs, D), _EMPTY, dtype=dtype)
    _write(kv[0], kv[1], cache, slots, isa)
    if not torch.equal(cache.view(2, H, -1)[1][head, inner], kv):
        raise ValueError(f"isa {isa!r}, {dtype}: the cache write does not store arbitrary "
                         "values unchanged; cannot read plain K/V back")
    return head, inner


def read_cpu_kv(kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int, isa: str,
                block_size: int, kv_cache_dtype: str = "auto"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain K and V, each [num_tokens, num_kv_heads, head_dim] in the cache dtype, of positions
    [0, num_tokens) of one request, from vLLM's CPU paged cache ``kv_cache``
    [num_blocks, num_kv_heads, block_size, 2 * head_dim] (the layer's cache as the backend gets
    it). ``block_row``: the request's block-table row (block ids; entries past the blocks that
    hold ``num_tokens`` tokens are ignored); ``isa``: the layer's ISA (``layer.isa``, chosen by
    vLLM's metadata builder), which fixes the order inside a block. Copies; the cache is only
    read."""
    if kv_cache_dtype != "auto" or kv_cache.dtype not in _PLAIN_DTYPES:
        raise NotImplementedError(
            f"kv_cache_dtype {kv_cache_dtype!r} ({kv_cache.dtype} cache): vLLM's CPU write "
            "quantises fp8 K/V with k_scale / v_scale, so the plain K/V are not in the cache")
    num_blocks, num_kv_heads, bs = kv_cache.shape[:3]
    if bs != block_size:
        raise ValueError(f"cache has block size {bs}, expected {block_size}")
    # The backend's own view (cpu_attn.py forward): per block and head, 2 * bs * D elements.
    kv3 = kv_cache.view(num_blocks, num_kv_heads, -1)
    head_dim = kv3.shape[-1] // (2 * bs)
    used = -(-num_tokens // bs)
    if used > block_row.numel():
        raise ValueError(f"{num_tokens} tokens need {used} blocks, the row has "
                         f"{block_row.numel()}")
    head, inner = cpu_layout(isa, bs, num_kv_heads, head_dim, kv_cache.dtype)
    blocks = block_row[:used].to(device=kv_cache.device, dtype=torch.long)
    # One gather for K and V of all the request's blocks: indices broadcast (no expanded copy)
    # to [2, used, bs, H, D]; the tail of the last block is sliced off afterwards.
    kv = kv3[blocks.view(1, used, 1, 1, 1), head.unsqueeze(1), inner.unsqueeze(1)]
    kv = kv.view(2, used * bs, num_kv_heads, head_dim)[:, :num_tokens]
    return kv[0], kv[1]
