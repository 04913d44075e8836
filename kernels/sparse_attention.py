"""Token-sparse causal prefill attention (ZipVL step 8), varlen over several sequences.

Inputs (shared by the torch reference and the Triton launcher):
    query [N, H, d], key [N, Hkv, d], value [N, Hkv, dv]  tokens of B sequences, packed
    cu_seqlens [B+1] int   sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]
    indices    [T] int     kept positions, RELATIVE to each sequence start, ascending per sequence
    cu_indices [B+1] int   sequence b's kept positions are indices[cu_indices[b]:cu_indices[b+1]]
Output [N, H, dv] in query's dtype: for a kept row i of sequence b,
    softmax over kept keys j <= i of (q_i . k_j * scale) applied to v_j,
and zeros for every row that is not kept.

Design choice: gather on the fly. The kernel is a flash-attention forward (online softmax,
fp32 accumulators) whose Q, K and V tiles are read through the index list, and whose output
rows are scattered straight to their original positions. Because each sequence's index list is
ascending, causality by original position is causality by rank in the list, so the mask is the
ordinary lower triangle in "kept" coordinates and the loop stops at the diagonal exactly as in a
dense kernel: the work is that of dense attention over t = |T| tokens (t^2/2 per head), with no
gathered copies of Q/K/V written to or re-read from memory and one launch for the whole batch.
Each gathered row is one contiguous head_dim vector, so loads stay coalesced. The alternative
(index_select, then a stock varlen FlashAttention, then index_copy) costs ~3 extra passes over
the kept Q/K/V/O plus 3 launches, but gets FA3 on Hopper; benchmarks/kernels.py measures both.
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


def sparse_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               indices: torch.Tensor, cu_seqlens: torch.Tensor,
                               cu_indices: torch.Tensor, scale: float | None = None,
                               chunk: int = 1024, round_probabilities: bool = False
                               ) -> torch.Tensor:
    """fp32 torch version, one sequence and ``chunk`` kept query rows at a time.

    ``round_probabilities``: round the unnormalised probabilities exp(s - max) to the input
    dtype before P @ V, as FlashAttention-style kernels (the Triton one below included) do to
    feed the tensor cores. With bf16/fp16 inputs this is the yardstick for a low-precision
    kernel's error (FlashAttention's tests: a kernel may err at most twice as much as the torch
    computation with the same roundings); with fp32 inputs it changes nothing."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    group = num_heads // key.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(query.shape[0], num_heads, value.shape[2], dtype=query.dtype,
                      device=query.device)
    seq_bounds, idx_bounds = cu_seqlens.tolist(), cu_indices.tolist()
    for b in range(len(seq_bounds) - 1):
        rows = indices[idx_bounds[b]:idx_bounds[b + 1]].to(query.device).long() + seq_bounds[b]
        t = rows.numel()
        if t == 0:
            continue
        q = query[rows].float().transpose(0, 1)                                  # [H, t, d]
        k = key[rows].float().repeat_interleave(group, 1).transpose(0, 1)        # [H, t, d]
        v = value[rows].float().repeat_interleave(group, 1).transpose(0, 1)      # [H, t, dv]
        for start in range(0, t, chunk):
            stop = min(start + chunk, t)
            logits = torch.matmul(q[:, start:stop], k[:, :stop].transpose(1, 2)) * scale
            ranks = torch.arange(start, stop, device=query.device)[:, None]
            logits.masked_fill_(torch.arange(stop, device=query.device)[None, :] > ranks,
                                float("-inf"))
            if round_probabilities:
                p = torch.exp(logits - logits.amax(-1, keepdim=True))
                o = torch.matmul(p.to(query.dtype).float(), v[:, :stop]) / p.sum(-1, keepdim=True)
            else:
                o = torch.matmul(torch.softmax(logits, -1), v[:, :stop])
            out[rows[start:stop]] = o.transpose(0, 1).to(query.dtype)
    return out


# ----------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _attend_tile(acc, row_max, row_sum, q, k_ptr, v_ptr, idx_ptr, tok0, ranks, start, t_len,
                     qk_scale, stride_kt, stride_vt, dims, dims_v,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL_MASK: tl.constexpr, UPCAST: tl.constexpr):
        """One online-softmax step over the kept keys of rank start..start+BLOCK_N."""
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < t_len
        kpos = tl.load(idx_ptr + cols, mask=col_mask, other=0).to(tl.int64) + tok0
        k = tl.load(k_ptr + kpos[:, None] * stride_kt + dims[None, :],
                    mask=col_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptr + kpos[:, None] * stride_vt + dims_v[None, :],
                    mask=col_mask[:, None] & (dims_v[None, :] < HEAD_DIM_V), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = dot(q, tl.trans(k), UPCAST) * qk_scale
        if CAUSAL_MASK:
            s = tl.where((cols[None, :] <= ranks[:, None]) & col_mask[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(s - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
        return acc, new_max, row_sum

    @triton.jit
    def _sparse_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, cu_seq_ptr, cu_idx_ptr,
                                 qk_scale, stride_qt, stride_qh, stride_kt, stride_kh,
                                 stride_vt, stride_vh, stride_ot, stride_oh,
                                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
        tile, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        idx_start = tl.load(cu_idx_ptr + seq)
        t_len = tl.load(cu_idx_ptr + seq + 1) - idx_start
        if tile * BLOCK_M >= t_len:
            return
        tok0 = tl.load(cu_seq_ptr + seq).to(tl.int64)
        idx_ptr += idx_start
        kv_head = head // GROUP
        k_ptr += kv_head * stride_kh
        v_ptr += kv_head * stride_vh
        ranks = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = ranks < t_len
        qpos = tl.load(idx_ptr + ranks, mask=row_mask, other=0).to(tl.int64) + tok0
        dims = tl.arange(0, BLOCK_D)
        dims_v = tl.arange(0, BLOCK_DV)
        q = tl.load(q_ptr + qpos[:, None] * stride_qt + head * stride_qh + dims[None, :],
                    mask=row_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        diag = tile * BLOCK_M                      # keys before the diagonal block: no mask
        for start in range(0, diag, BLOCK_N):
            acc, row_max, row_sum = _attend_tile(
                acc, row_max, row_sum, q, k_ptr, v_ptr, idx_ptr, tok0, ranks, start, t_len,
                qk_scale, stride_kt, stride_vt, dims, dims_v, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
                False, UPCAST)
        for start in range(diag, tl.minimum(diag + BLOCK_M, t_len), BLOCK_N):
            acc, row_max, row_sum = _attend_tile(
                acc, row_max, row_sum, q, k_ptr, v_ptr, idx_ptr, tok0, ranks, start, t_len,
                qk_scale, stride_kt, stride_vt, dims, dims_v, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
                True, UPCAST)
        out = acc / row_sum[:, None]
        tl.store(o_ptr + qpos[:, None] * stride_ot + head * stride_oh + dims_v[None, :],
                 out.to(o_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (dims_v[None, :] < HEAD_DIM_V))


def sparse_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            indices: torch.Tensor, cu_seqlens: torch.Tensor,
                            cu_indices: torch.Tensor, scale: float | None = None,
                            max_kept: int | None = None, block_m: int | None = None,
                            block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None) -> torch.Tensor:
    """Triton version of `sparse_attention_reference`. ``max_kept`` (largest per-sequence
    kept count) sizes the grid; passing it avoids a device-to-host sync."""
    if triton is None:
        raise RuntimeError("sparse_attention_triton needs triton, which is not importable")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, head_dim_v = key.shape[1], value.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    device = query.device
    cu_seq = cu_seqlens.to(device=device, dtype=torch.int32)
    cu_idx = cu_indices.to(device=device, dtype=torch.int32)
    idx = indices.to(device=device, dtype=torch.int32).contiguous()
    if max_kept is None:
        max_kept = int((cu_idx[1:] - cu_idx[:-1]).max()) if cu_idx.numel() > 1 else 0
    out = torch.zeros(query.shape[0], num_heads, head_dim_v, dtype=query.dtype, device=device)
    if max_kept == 0:
        return out
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    on_gpu = device.type == "cuda"
    block_m = block_m or (128 if on_gpu else 32)
    block_n = block_n or (64 if on_gpu else 32)
    if block_m % block_n:
        raise ValueError(f"block_m {block_m} must be a multiple of block_n {block_n}")
    launch = dict(num_warps=num_warps or (8 if head_dim > 64 else 4), num_stages=num_stages or 3) \
        if on_gpu else {}
    grid = (triton.cdiv(max_kept, block_m), num_heads, cu_seq.numel() - 1)
    _sparse_attention_kernel[grid](
        query, key, value, out, idx, cu_seq, cu_idx, scale * LOG2E,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=triton.next_power_of_2(max(head_dim, 16)),
        BLOCK_DV=triton.next_power_of_2(max(head_dim_v, 16)),
        BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=query.device.type != "cuda"
        or query.dtype == torch.float32, **launch)
    return out
