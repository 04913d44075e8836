"""Fused ZipVL probe scoring: Eq. 6 and Eq. 8 column scores without the [heads, m, n] matrix.

Inputs (shared by the torch reference and the Triton launcher):
    probe_query [m, H, d]   query rows of the probe positions (any order)
    probe_pos   [m]         their positions in the sequence (causal: probe i sees keys <= pos_i)
    key         [n, Hkv, d] dense keys, or
    key_cache   [num_blocks, block_size, Hkv, d] + block_table [max_blocks] int32 + seq_len n
                (vLLM's GPU paged layout; key j lives in slot j % block_size of block
                block_table[j // block_size])
Outputs, fp32 [n] each:
    accumulated_j = sum_i mean_h softmax_h(q_i k^T * scale)_j          (Eq. 6)
    normalized_j  = accumulated_j / |{i : pos_i >= j}|, 0 if no probe sees j   (Eq. 8)

Triton design (two passes, work O(H·m·n·d), memory O(n + H·m·splits)):
    1. stats: grid (H, probe tiles, key splits). Each program streams its key split once and
       keeps a running max / sum-exp per probe row (log2 domain). Splitting the key range keeps
       the grid wide when H·m is small (128 probes x 28 heads = 56 tiles < 132 SMs); the splits
       are merged with a few tiny torch ops.
    2. columns: grid (key tiles,). Each program owns BLOCK_N columns, loops over KV heads (key
       tile loaded once per KV head), their query heads and the probe tiles, recomputes the
       logits and adds exp2(s - max) / sum to its column sums. No atomics: deterministic.
GQA: query head h reads KV head h // (H // Hkv).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU runtime without triton: the reference below still works
    triton = tl = None

from .triton_common import LOG2E, dot



# ----------------------------------------------------------------------------- torch reference


def gather_paged_keys(key_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_len: int) -> torch.Tensor:
    """Dense [n, Hkv, d] keys from the paged cache [num_blocks, block_size, Hkv, d]."""
    block_size = key_cache.shape[1]
    pos = torch.arange(seq_len, device=key_cache.device)
    blocks = block_table.to(key_cache.device).long()[pos // block_size]
    return key_cache[blocks, pos % block_size]


def probe_scores_reference(probe_query: torch.Tensor, probe_pos: torch.Tensor,
                           key: torch.Tensor | None = None, *, scale: float | None = None,
                           key_cache: torch.Tensor | None = None,
                           block_table: torch.Tensor | None = None,
                           seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 torch version: builds the probe attention one KV head group at a time."""
    key = _dense_keys(key, key_cache, block_table, seq_len)
    n, num_kv_heads, head_dim = key.shape
    num_heads = probe_query.shape[1]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    pos = probe_pos.to(key.device).long()
    future = torch.arange(n, device=key.device)[None, :] > pos[:, None]          # [m, n]
    acc = torch.zeros(n, dtype=torch.float32, device=key.device)
    for kv_head in range(num_kv_heads):
        q = probe_query[:, kv_head * group:(kv_head + 1) * group].float().transpose(0, 1)
        logits = torch.matmul(q, key[:, kv_head].float().T) * scale               # [g, m, n]
        logits.masked_fill_(future, float("-inf"))
        acc += torch.softmax(logits, dim=-1).sum((0, 1))
    acc /= num_heads
    visible = (~future).sum(0)
    norm = torch.where(visible > 0, acc / visible.clamp(min=1), torch.zeros_like(acc))
    return acc, norm


def _dense_keys(key, key_cache, block_table, seq_len):
    if key is not None:
        return key
    if key_cache is None or block_table is None or seq_len is None:
        raise ValueError("pass either key, or key_cache + block_table + seq_len")
    return gather_paged_keys(key_cache, block_table, seq_len)


# ----------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _key_row_offsets(cols, col_mask, bt_ptr, page_size, stride_page, stride_slot,
                         PAGED: tl.constexpr):
        """Element offset of key row `cols` in the (dense or paged) key tensor."""
        if PAGED:
            page = tl.load(bt_ptr + cols // page_size, mask=col_mask, other=0).to(tl.int64)
            return page * stride_page + (cols % page_size).to(tl.int64) * stride_slot
        else:
            return cols.to(tl.int64) * stride_slot

    @triton.jit
    def _probe_stats_kernel(q_ptr, pos_ptr, k_ptr, bt_ptr, max_ptr, sum_ptr,
                            m, n, split_len, page_size, qk_scale,
                            stride_qm, stride_qh, stride_page, stride_slot, stride_kh,
                            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            PAGED: tl.constexpr, UPCAST: tl.constexpr):
        head = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(2)
        num_splits = tl.num_programs(2)
        row_mask = rows < m
        dims = tl.arange(0, BLOCK_D)
        pos = tl.load(pos_ptr + rows, mask=row_mask, other=-1)
        q = tl.load(q_ptr + rows[:, None] * stride_qm + head * stride_qh + dims[None, :],
                    mask=row_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        kv_head = head // GROUP
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, tl.max(pos) + 1)      # causal: nothing past the last probe
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < n
            offs = _key_row_offsets(cols, col_mask, bt_ptr, page_size, stride_page, stride_slot,
                                    PAGED)
            k = tl.load(k_ptr + offs[:, None] + kv_head * stride_kh + dims[None, :],
                        mask=col_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = dot(q, tl.trans(k), UPCAST) * qk_scale
            s = tl.where(cols[None, :] <= pos[:, None], s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp2(row_max - safe_max) + tl.sum(tl.exp2(s - safe_max[:, None]), 1)
            row_max = new_max
        out = (head * m + rows) * num_splits + split
        tl.store(max_ptr + out, row_max, mask=row_mask)
        tl.store(sum_ptr + out, row_sum, mask=row_mask)

    @triton.jit
    def _probe_columns_kernel(q_ptr, pos_ptr, k_ptr, bt_ptr, max_ptr, sum_ptr, acc_ptr, norm_ptr,
                              m, n, page_size, qk_scale,
                              stride_qm, stride_qh, stride_page, stride_slot, stride_kh,
                              NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              PAGED: tl.constexpr, UPCAST: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        col_start = tl.program_id(0) * BLOCK_N
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_DIM
        offs = _key_row_offsets(cols, col_mask, bt_ptr, page_size, stride_page, stride_slot, PAGED)
        col_sum = tl.zeros([BLOCK_N], tl.float32)
        visible = tl.zeros([BLOCK_N], tl.float32)
        for kv_head in range(NUM_KV_HEADS):
            k = tl.load(k_ptr + offs[:, None] + kv_head * stride_kh + dims[None, :],
                        mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            for g in range(GROUP):
                head = kv_head * GROUP + g
                for row_start in range(0, m, BLOCK_M):
                    rows = row_start + tl.arange(0, BLOCK_M)
                    row_mask = rows < m
                    pos = tl.load(pos_ptr + rows, mask=row_mask, other=-1)
                    if tl.max(pos) >= col_start:               # some probe here sees this tile
                        q = tl.load(q_ptr + rows[:, None] * stride_qm + head * stride_qh
                                    + dims[None, :],
                                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
                        if UPCAST:
                            q = q.to(tl.float32)
                        row_max = tl.load(max_ptr + head * m + rows, mask=row_mask, other=0.0)
                        row_sum = tl.load(sum_ptr + head * m + rows, mask=row_mask, other=1.0)
                        s = dot(q, tl.trans(k), UPCAST) * qk_scale
                        prob = tl.exp2(s - row_max[:, None]) / row_sum[:, None]
                        seen = (cols[None, :] <= pos[:, None]) & col_mask[None, :]
                        col_sum += tl.sum(tl.where(seen, prob, 0.0), 0)
                        if head == 0:
                            visible += tl.sum(seen.to(tl.float32), 0)
        acc = col_sum / (NUM_KV_HEADS * GROUP)
        norm = tl.where(visible > 0, acc / tl.maximum(visible, 1.0), 0.0)
        tl.store(acc_ptr + cols, acc, mask=col_mask)
        tl.store(norm_ptr + cols, norm, mask=col_mask)


def probe_scores_triton(probe_query: torch.Tensor, probe_pos: torch.Tensor,
                        key: torch.Tensor | None = None, *, scale: float | None = None,
                        key_cache: torch.Tensor | None = None,
                        block_table: torch.Tensor | None = None, seq_len: int | None = None,
                        block_m: int = 64, block_n: int = 64,
                        num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `probe_scores_reference` (same arguments and results)."""
    if triton is None:
        raise RuntimeError("probe_scores_triton needs triton, which is not importable")
    paged = key is None
    if paged:
        if key_cache is None or block_table is None or seq_len is None:
            raise ValueError("pass either key, or key_cache + block_table + seq_len")
        keys, n, page_size = key_cache, int(seq_len), key_cache.shape[1]
        stride_page, stride_slot, stride_kh = key_cache.stride(0), key_cache.stride(1), key_cache.stride(2)
        bt = block_table.to(torch.int32)
    else:
        keys, n, page_size = key, key.shape[0], 1
        stride_page, stride_slot, stride_kh = 0, key.stride(0), key.stride(1)
        bt = torch.zeros(1, dtype=torch.int32, device=key.device)   # unused placeholder
    num_kv_heads, head_dim = keys.shape[-2], keys.shape[-1]
    if keys.stride(-1) != 1:
        raise ValueError("keys must be contiguous in head_dim")
    m, num_heads, _ = probe_query.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    q = probe_query.contiguous()
    pos = probe_pos.to(device=q.device, dtype=torch.int32).contiguous()
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    upcast = _must_upcast(q)
    block_d = triton.next_power_of_2(max(head_dim, 16))
    if num_splits is None:   # enough programs to fill a GPU, each split >= 1024 keys
        num_splits = max(1, min(triton.cdiv(n, 1024), triton.cdiv(264, num_heads * triton.cdiv(m, block_m))))
    split_len = triton.cdiv(triton.cdiv(n, num_splits), block_n) * block_n
    num_splits = triton.cdiv(n, split_len)
    row_max = torch.empty(num_heads, m, num_splits, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    common = dict(GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
                  BLOCK_M=block_m, BLOCK_N=block_n, PAGED=paged, UPCAST=upcast)
    _probe_stats_kernel[(num_heads, triton.cdiv(m, block_m), num_splits)](
        q, pos, keys, bt, row_max, row_sum, m, n, split_len, page_size, scale * LOG2E,
        q.stride(0), q.stride(1), stride_page, stride_slot, stride_kh, **common)
    # Merge the key splits: max over splits, sums rescaled to that max (log2 domain).
    merged_max = row_max.amax(-1, keepdim=True)
    merged_sum = (row_sum * torch.exp2(row_max - merged_max)).sum(-1).contiguous()
    merged_max = merged_max.squeeze(-1).contiguous()
    acc = torch.empty(n, dtype=torch.float32, device=q.device)
    norm = torch.empty_like(acc)
    _probe_columns_kernel[(triton.cdiv(n, block_n),)](
        q, pos, keys, bt, merged_max, merged_sum, acc, norm, m, n, page_size, scale * LOG2E,
        q.stride(0), q.stride(1), stride_page, stride_slot, stride_kh,
        NUM_KV_HEADS=num_kv_heads, **common)
    return acc, norm


def _must_upcast(t: torch.Tensor) -> bool:
    """Upcast loads to fp32 on CPU (the Triton interpreter computes bf16 wrongly) and for fp32
    inputs; on GPU 16-bit operands go to the tensor cores as they are (products are exact,
    accumulation is fp32)."""
    return t.device.type != "cuda" or t.dtype == torch.float32
