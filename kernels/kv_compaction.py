"""Paged-KV compaction after ZipVL eviction: the kept tokens' K/V move, in order, to the first
slots of their request's blocks, so the tail blocks can be freed.

GPU layout (vLLM FlashAttention): key_cache and value_cache are each
``[num_blocks, block_size, num_kv_heads, head_dim]``; position j of request r lives in slot
``j % block_size`` of block ``block_tables[r, j // block_size]``.

Batch (shared by the reference and the Triton launcher):
    block_tables [R, max_blocks] int   one row per request (no block shared between requests)
    kept         [T] int               kept positions, ascending per request, packed
    cu_kept      [R+1] int             request r's are kept[cu_kept[r]:cu_kept[r+1]]
Effect: for each request, new position k holds what old position kept[k] held (k < t_r);
every other slot of the cache (other requests, other blocks, positions >= t_r) is untouched.

Why two launches. Kept positions are ascending, so dst k <= src kept[k], but that alone does
not make a parallel in-place move safe: a row of an EARLY tile may read a source that a LATER
tile overwrites (kept = [0, 5, ...] with 4-row tiles: tile 0 reads position 5, tile 1 writes
it). Ordering tiles would serialise the copy. Instead rows are split by where their source is:
  * source >= t_r: no move writes there (writes go to [0, t_r)), read it directly;
  * source <  t_r and != k: "staged": copied first into a temp buffer (launch 1);
  * source == k: nothing to do (the untouched prefix, typically the attention sinks).
Launch 2 then writes every moving row from temp or from a never-written source, so all its
programs are independent. Extra traffic is only the staged rows (about a fraction t/n of the
moved ones when kept positions are spread uniformly). K and V move in the same launches.

CPU layout (vLLM CPU backend): ``[num_blocks, num_kv_heads, block_size, 2*head_dim]`` per layer
with an ISA-specific element order inside each (block, head) tile, so only WHOLE blocks can be
moved there without knowing the packing: `compact_blocks_reference`. Token-granular compaction on
CPU re-writes the kept tokens through vLLM's own `cpu_attn_reshape_and_cache` op (glue layer).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU runtime without triton: the references below still work
    triton = tl = None


# ----------------------------------------------------------------------------- torch references


def block_and_slot(block_tables: torch.Tensor, request: torch.Tensor, pos: torch.Tensor,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache coordinates ``(block, pos % block_size)`` of (request, position) pairs."""
    blocks = block_tables.long()[request.long(), pos.long() // block_size]
    return blocks, pos.long() % block_size


def compaction_plan(kept: torch.Tensor, cu_kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per packed row: request id, destination position, source (-1 when the row does not
    move) and whether it is staged. The Triton kernels compute the same per tile
    (`_row_plan`); this is their reference."""
    device = kept.device
    cu = cu_kept.to(device).long()
    counts = cu[1:] - cu[:-1]
    total = kept.numel()
    request = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts,
                                      output_size=total)
    dst = torch.arange(total, device=device) - cu[request]
    src = kept.long()
    moves = src != dst
    staged = moves & (src < counts[request])
    return dict(request=request, dst=dst, src=torch.where(moves, src, -1), staged=staged)


def check_compaction_args(block_tables: torch.Tensor, kept: torch.Tensor, cu_kept: torch.Tensor,
                          block_size: int) -> None:
    """One-line ValueErrors for malformed batches (costs a device sync: call it in tests or
    debug runs, not on the hot path)."""
    cu = cu_kept.tolist()
    if cu[0] != 0 or cu[-1] != kept.numel() or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_kept {cu} does not partition {kept.numel()} kept positions")
    if len(cu) - 1 != block_tables.shape[0]:
        raise ValueError(f"{len(cu) - 1} requests in cu_kept but {block_tables.shape[0]} "
                         f"block table rows")
    capacity = block_tables.shape[1] * block_size
    for r, (a, b) in enumerate(zip(cu, cu[1:])):
        row = kept[a:b].long()
        if row.numel() and (int(row.min()) < 0 or int(row.max()) >= capacity):
            raise ValueError(f"request {r}: kept position outside [0, {capacity})")
        if row.numel() > 1 and not bool((row[1:] > row[:-1]).all()):
            raise ValueError(f"request {r}: kept positions must be strictly ascending")


def compact_kv_reference(key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_tables: torch.Tensor, kept: torch.Tensor,
                         cu_kept: torch.Tensor) -> None:
    """In-place torch version: gather every kept row, then scatter (the gather copies first,
    so overlapping sources and destinations are safe). Any strides (vLLM's FlashAttention
    cache views are not contiguous)."""
    block_size = key_cache.shape[1]
    check_compaction_args(block_tables, kept, cu_kept, block_size)
    plan = compaction_plan(kept.to(key_cache.device), cu_kept)
    tables = block_tables.to(key_cache.device)
    src = block_and_slot(tables, plan["request"], kept.to(key_cache.device), block_size)
    dst = block_and_slot(tables, plan["request"], plan["dst"], block_size)
    for cache in (key_cache, value_cache):
        cache[dst] = cache[src]      # advanced indexing: the read copies before the write


def compact_blocks_reference(kv_cache: torch.Tensor, block_table_row: torch.Tensor,
                             src_blocks: torch.Tensor, dst_blocks: torch.Tensor) -> None:
    """Whole-block compaction, layout-agnostic (dim 0 of ``kv_cache`` is the block): logical
    block ``src_blocks[i]`` of the request moves to logical block ``dst_blocks[i]``.

    ``dst_blocks`` must be strictly ascending with ``dst <= src``. Then a move never reads a
    block an earlier move wrote (later sources are >= their destination > earlier
    destinations), so "all reads, then all writes" equals the in-order sequential copy.
    Works for vLLM's CPU cache ``[num_blocks, num_kv_heads, block_size, 2*head_dim]``."""
    src, dst = src_blocks.long(), dst_blocks.long()
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src_blocks {tuple(src.shape)} and dst_blocks {tuple(dst.shape)} "
                         f"must be 1-D of equal length")
    if bool((dst > src).any()):
        raise ValueError("each dst block must be <= its src block")
    if dst.numel() > 1 and not bool((dst[1:] > dst[:-1]).all()):
        raise ValueError("dst_blocks must be strictly ascending")
    table = block_table_row.to(kv_cache.device).long()
    moving = src != dst
    if moving.any():
        kv_cache.index_copy_(0, table[dst[moving]], kv_cache.index_select(0, table[src[moving]]))


# ----------------------------------------------------------------------------- Triton
# The launcher does no torch work on the batch and never syncs with the device: each program
# derives its rows' plan (`compaction_plan`'s fields) from kept and cu_kept itself, and a
# staged row goes to temp row = its packed row, so temp needs no prefix sum (and no host-read
# size). The first H200 runs spent ~0.2-0.5 ms of a 0.4-0.9 ms compaction on the torch plan
# and the sync, whatever the size (docs/kernels.md, "GPU evidence").

if triton is not None:

    @triton.jit
    def _row_plan(kept_ptr, cu_ptr, rows, total, num_cu):
        """`compaction_plan` for a tile of packed rows: (request, src, dst, moving, staged)."""
        live = rows < total
        request = tl.zeros_like(rows)
        for r in range(1, num_cu):      # cu_kept[1:]: requests per step are few, count them
            request += (rows >= tl.load(cu_ptr + r)).to(rows.dtype)
        first = tl.load(cu_ptr + request, mask=live, other=0).to(tl.int64)
        count = tl.load(cu_ptr + request + 1, mask=live, other=0).to(tl.int64) - first
        dst = rows - first
        src = tl.load(kept_ptr + rows, mask=live, other=0).to(tl.int64)
        moving = live & (src != dst)
        return request, src, dst, moving, moving & (src < count)

    @triton.jit
    def _slot_offsets(bt_ptr, stride_bt, request, pos, mask, block_size, stride_block,
                      stride_slot):
        page = tl.load(bt_ptr + request.to(tl.int64) * stride_bt + pos // block_size, mask=mask,
                       other=0).to(tl.int64)
        return page * stride_block + (pos % block_size) * stride_slot

    @triton.jit
    def _stage_kernel(k_ptr, v_ptr, temp_ptr, bt_ptr, kept_ptr, cu_ptr, total, num_cu,
                      width, block_size, stride_bt, stride_block, stride_slot, stride_head,
                      HEAD_DIM: tl.constexpr, BOTH: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_W: tl.constexpr):
        """Launch 1: copy the staged rows' sources (K, and V when BOTH) to temp[row]."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        request, src, dst, moving, staged = _row_plan(kept_ptr, cu_ptr, rows, total,
                                                      num_cu)
        offs = _slot_offsets(bt_ptr, stride_bt, request, src, staged, block_size, stride_block,
                             stride_slot)[:, None] + ((cols // HEAD_DIM) * stride_head +
                                                      cols % HEAD_DIM)[None, :]
        both = staged[:, None] & (cols[None, :] < width)
        temp = temp_ptr + rows[:, None] * width + cols[None, :]
        tl.store(temp, tl.load(k_ptr + offs, mask=both), mask=both)
        if BOTH:
            tl.store(temp + total * width, tl.load(v_ptr + offs, mask=both), mask=both)

    @triton.jit
    def _move_kernel(k_ptr, v_ptr, temp_ptr, bt_ptr, kept_ptr, cu_ptr, total, num_cu,
                     width, block_size, stride_bt, stride_block, stride_slot, stride_head,
                     HEAD_DIM: tl.constexpr, BOTH: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_W: tl.constexpr):
        """Launch 2: every moving row, from temp (staged) or straight from a source no moving
        row writes, to its destination; programs are independent."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        request, src, dst, moving, staged = _row_plan(kept_ptr, cu_ptr, rows, total,
                                                      num_cu)
        col_off = ((cols // HEAD_DIM) * stride_head + cols % HEAD_DIM)[None, :]
        col_mask = cols[None, :] < width
        direct = (moving & ~staged)[:, None] & col_mask
        from_temp = staged[:, None] & col_mask
        src_off = _slot_offsets(bt_ptr, stride_bt, request, src, moving & ~staged, block_size,
                                stride_block, stride_slot)[:, None] + col_off
        dst_off = _slot_offsets(bt_ptr, stride_bt, request, dst, moving, block_size,
                                stride_block, stride_slot)[:, None] + col_off
        temp = temp_ptr + rows[:, None] * width + cols[None, :]
        write = moving[:, None] & col_mask
        data = tl.where(direct, tl.load(k_ptr + src_off, mask=direct),
                        tl.load(temp, mask=from_temp))
        tl.store(k_ptr + dst_off, data, mask=write)
        if BOTH:
            data = tl.where(direct, tl.load(v_ptr + src_off, mask=direct),
                            tl.load(temp + total * width, mask=from_temp))
            tl.store(v_ptr + dst_off, data, mask=write)


def compact_kv_triton(key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, kept: torch.Tensor, cu_kept: torch.Tensor,
                      block_r: int = 32, block_w: int = 256) -> None:
    """Triton version of `compact_kv_reference` (in place): two launches moving K and V
    together (four if their strides differ), no torch op on the batch, no host sync. The
    staging buffer is sized for every row (K and V: 2 * T * Hkv * d elements, freed on
    return), since only the device knows how many rows stage."""
    if triton is None:
        raise RuntimeError("compact_kv_triton needs triton, which is not importable")
    total = kept.numel()
    if total == 0:
        return
    device = key_cache.device
    kept = kept.to(device).contiguous()
    cu = cu_kept.to(device).contiguous()
    tables = block_tables.to(device)
    k, v = _as_bits(key_cache), _as_bits(value_cache)   # bit copies: bf16, fp8 move exactly
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"key cache {tuple(k.shape)} {key_cache.dtype} and value cache "
                         f"{tuple(v.shape)} {value_cache.dtype} differ")
    block_size, num_kv_heads, head_dim = k.shape[1:]
    if k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("caches must be contiguous in head_dim")
    width = num_kv_heads * head_dim
    grid = (triton.cdiv(total, block_r), triton.cdiv(width, block_w))
    both = k.stride() == v.stride()        # one stride set serves both: move them together
    temp = torch.empty(2 if both else 1, total, width, dtype=k.dtype, device=device)
    consts = dict(HEAD_DIM=head_dim, BOTH=both, BLOCK_R=block_r, BLOCK_W=block_w)
    for first, second in [(k, v)] if both else [(k, k), (v, v)]:   # second unused unless BOTH
        args = (first, second, temp, tables, kept, cu, total, cu.numel(), width, block_size,
                tables.stride(0), first.stride(0), first.stride(1), first.stride(2))
        _stage_kernel[grid](*args, **consts)
        _move_kernel[grid](*args, **consts)


def _as_bits(cache: torch.Tensor) -> torch.Tensor:
    """Same memory viewed as a same-width integer dtype."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[cache.element_size()]
    return cache.view(bits)
