"""The CUDA backend's in-cache compaction (attention/cuda.py), without a vLLM import: cuda.py
re-exports both functions, and benchmarks/gpu_check.py runs them on a GPU machine that has no
vLLM."""

from __future__ import annotations

import itertools

import torch

from vllm_kvsparse import kernels


def flash_attn_kv_views(kv_cache: torch.Tensor, head_size: int):
    """FlashAttentionImpl's own split of a layer's cache (flash_attn.py, `forward`):
    logical [num_blocks, num_kv_heads, block_size, 2 * head_size] -> K and V views
    [num_blocks, block_size, num_kv_heads, head_size] (strided; head_dim contiguous)."""
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


def read_flash_kv(kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int,
                  head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain K and V [num_tokens, num_kv_heads, head_size] of positions [0, num_tokens) of one
    request from a FlashAttention layer cache, given its block-table row. FlashAttention's
    order inside a block is plain (token, head, dim), so this is a block gather per view;
    copies, the cache is only read. (vllm_kvsparse.attention.cache_read re-exports it.)"""
    block_size = kv_cache.shape[2]
    used = -(-num_tokens // block_size)
    if used > block_row.numel():
        raise ValueError(f"{num_tokens} tokens need {used} blocks, the row has "
                         f"{block_row.numel()}")
    blocks = block_row[:used].to(device=kv_cache.device, dtype=torch.long)
    key_cache, value_cache = flash_attn_kv_views(kv_cache, head_size)
    return tuple(c[blocks].flatten(0, 1)[:num_tokens] for c in (key_cache, value_cache))


def compact_in_cache(key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_table: torch.Tensor, rows, block_size: int) -> None:
    """Move each row's kept prompt tokens before M (sel.indices[:F * block_size]) to the first
    F blocks of its request, in order, inside the paged cache; one kernel call for the step.
    No host sync: the few host-side integers go up in one pinned, non-blocking copy."""
    moving = [(row, sel) for row, sel in rows if sel.front_blocks < sel.prompt_blocks]
    if not moving:
        return
    device = key_cache.device
    kept = torch.cat([sel.indices[:sel.front_blocks * block_size] for _, sel in moving])
    cu_kept = list(itertools.accumulate((sel.front_blocks * block_size for _, sel in moving),
                                        initial=0))
    ints = _to_device(cu_kept + [row.row for row, _ in moving], device)
    tables = block_table[ints[len(cu_kept):].long()]
    kernels.compact_kv(key_cache, value_cache, tables, kept.to(device), ints[:len(cu_kept)])


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":      # a pageable copy would wait for the queued attention
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
