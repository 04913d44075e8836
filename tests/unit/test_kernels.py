"""Triton kernels (run by the interpreter on CPU, see conftest.py) against their torch
references, plus the dispatcher. Sizes stay small: the interpreter runs every program in
Python."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_kvsparse import kernels
from vllm_kvsparse.kernels import kv_compaction, probe_scores, sparse_attention
from vllm_kvsparse.zipvl import (select_from_scores, select_important_tokens,
                                 sparse_prefill_attention_reference)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def probe_positions(n, m, seed=0):
    recent = list(range(max(0, n - m // 2), n))
    rest = torch.randperm(n - len(recent), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(sorted(rest[:m - len(recent)].tolist() + recent))


# ----------------------------------------------------------------------------- probe scores

@pytest.mark.parametrize("n,heads,kv_heads,d,m,dtype", [
    (1, 2, 1, 64, 1, torch.float32),
    (2, 4, 2, 64, 2, torch.float16),
    (300, 4, 2, 64, 20, torch.float32),
    (777, 2, 1, 128, 128, torch.float16),     # n not a multiple of the block size
    (2000, 2, 1, 64, 128, torch.float32),
    (1000, 28, 4, 128, 64, torch.float16),    # Qwen2-VL-7B heads
])
def test_probe_scores_match_reference(n, heads, kv_heads, d, m, dtype):
    q, k = randn(n, heads, d, dtype=dtype, seed=n), randn(n, kv_heads, d, dtype=dtype, seed=n + 1)
    pos = probe_positions(n, m, seed=n)
    acc, norm = probe_scores.probe_scores_triton(q[pos], pos, k)
    ref_acc, ref_norm = probe_scores.probe_scores_reference(q[pos], pos, k)
    torch.testing.assert_close(acc, ref_acc, **TOL[torch.float32])
    torch.testing.assert_close(norm, ref_norm, **TOL[torch.float32])
    assert abs(float(acc.sum()) - pos.numel()) < 1e-3 * pos.numel()   # each row sums to 1


def test_probe_scores_unsorted_probes_and_many_splits():
    n = 1500
    q, k = randn(n, 4, 64, seed=1), randn(n, 2, 64, seed=2)
    pos = probe_positions(n, 40)[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    acc, norm = probe_scores.probe_scores_triton(q[pos], pos, k, num_splits=5, block_n=32)
    ref = probe_scores.probe_scores_reference(q[pos], pos, k)
    torch.testing.assert_close((acc, norm), ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_probe_scores_paged_keys(dtype):
    n, block_size, kv_heads, d = 500, 16, 2, 128
    num_blocks = 50
    cache = randn(num_blocks, block_size, kv_heads, d, dtype=dtype, seed=3)
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(4))[:40].int()
    q = randn(n, 4, d, dtype=dtype, seed=5)
    pos = probe_positions(n, 48)
    got = probe_scores.probe_scores_triton(q[pos], pos, key_cache=cache, block_table=table,
                                           seq_len=n)
    ref = probe_scores.probe_scores_reference(q[pos], pos, key_cache=cache, block_table=table,
                                              seq_len=n)
    dense = probe_scores.probe_scores_reference(
        q[pos], pos, probe_scores.gather_paged_keys(cache, table, n))
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    torch.testing.assert_close(ref, dense, rtol=0, atol=0)


def test_probe_scores_reference_equals_zipvl_and_drives_selection():
    n = 600
    q, k = randn(n, 8, 64, seed=6) * 2, randn(n, 2, 64, seed=7)
    sel = select_important_tokens(q, k, num_recent=16, num_random=16, keep_first=0, keep_last=0)
    pos = sel.probe_idx
    acc, norm = probe_scores.probe_scores_triton(q[pos], pos, k)
    torch.testing.assert_close(acc, sel.accumulated, **TOL[torch.float32])
    torch.testing.assert_close(norm, sel.normalized, **TOL[torch.float32])
    indices, p = select_from_scores(acc, norm, pos.numel(), keep_first=0, keep_last=0)
    assert p == sel.num_important and torch.equal(indices, sel.indices)


# ----------------------------------------------------------------------------- sparse attention

def varlen_case(lens, heads, kv_heads, d, dtype, ratios, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q, k, v = (torch.randn(total, h, d, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    idx, cu_idx = [], [0]
    for length, ratio in zip(lens, ratios):
        t = int(round(length * ratio))
        idx.append(torch.sort(torch.randperm(length, generator=g)[:t]).values)
        cu_idx.append(cu_idx[-1] + t)
    cu_seq = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    return q, k, v, torch.cat(idx), cu_seq, torch.tensor(cu_idx)


@pytest.mark.parametrize("lens,heads,kv_heads,d,dtype,ratios", [
    ([1], 2, 1, 64, torch.float32, [1.0]),
    ([37, 100, 5, 64], 4, 2, 64, torch.float32, [0.5, 0.25, 0.0, 1.0]),   # one sequence keeps none
    ([70, 33], 2, 2, 80, torch.float32, [0.6, 0.9]),                       # head_dim not a power of 2
    ([1500], 2, 1, 128, torch.float16, [0.6]),
    ([300, 200], 28, 4, 128, torch.float16, [0.5, 0.75]),                  # Qwen2-VL-7B heads
])
def test_sparse_attention_matches_reference(lens, heads, kv_heads, d, dtype, ratios):
    q, k, v, idx, cu_seq, cu_idx = varlen_case(lens, heads, kv_heads, d, dtype, ratios)
    out = sparse_attention.sparse_attention_triton(q, k, v, idx, cu_seq, cu_idx)
    ref = sparse_attention.sparse_attention_reference(q, k, v, idx, cu_seq, cu_idx)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    kept_rows = torch.zeros(sum(lens), dtype=torch.bool)
    for b in range(len(lens)):
        kept_rows[idx[cu_idx[b]:cu_idx[b + 1]] + cu_seq[b]] = True
    assert (out[~kept_rows] == 0).all()
    # Per sequence, the varlen reference agrees with zipvl's single-sequence reference.
    for b in range(len(lens)):
        s, e = cu_seq[b], cu_seq[b + 1]
        single = sparse_prefill_attention_reference(q[s:e], k[s:e], v[s:e],
                                                    idx[cu_idx[b]:cu_idx[b + 1]])
        torch.testing.assert_close(ref[s:e], single, **TOL[dtype])


def test_sparse_attention_all_kept_is_dense_causal():
    n, heads, kv_heads = 150, 4, 2
    q, k, v = randn(n, heads, 64, seed=8), randn(n, kv_heads, 64, seed=9), randn(n, kv_heads, 64, seed=10)
    out = sparse_attention.sparse_attention_triton(q, k, v, torch.arange(n), torch.tensor([0, n]),
                                                   torch.tensor([0, n]))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, dense, **TOL[torch.float32])


# ----------------------------------------------------------------------------- KV compaction

BLOCK = 16


def kept_pattern(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "all":
        return torch.arange(n)
    if kind == "protected":          # sinks + last token only
        return torch.tensor(sorted(set(range(min(4, n))) | {n - 1}))
    if kind == "every_other":
        return torch.arange(1, n, 2)
    if kind == "drop_first":         # memmove by one: every row's source is the next row's dst
        return torch.arange(1, n)
    if kind == "tail":
        return torch.arange(n // 2, n)
    if kind == "none":
        return torch.tensor([], dtype=torch.long)
    return torch.sort(torch.randperm(n, generator=g)[: max(1, n // 3)]).values


def compaction_case(kinds, lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_per_req = [(n + BLOCK - 1) // BLOCK for n in lens]
    num_blocks = sum(blocks_per_req) + 7                 # spare blocks nobody owns
    perm = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per_req)
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    start = 0
    for r, nb in enumerate(blocks_per_req):
        tables[r, :nb] = perm[start:start + nb].int()
        start += nb
    tables[tables < 0] = perm[-1].int()                  # padding entries point at a spare block
    kept = [kept_pattern(kind, n, seed + r) for r, (kind, n) in enumerate(zip(kinds, lens))]
    cu = torch.tensor([0] + torch.tensor([x.numel() for x in kept]).cumsum(0).tolist())
    key_cache = torch.randn(num_blocks, BLOCK, 2, 64, generator=g).to(dtype)
    value_cache = torch.randn(num_blocks, BLOCK, 2, 64, generator=g).to(dtype)
    return key_cache, value_cache, tables, torch.cat(kept).long(), cu


def compaction_oracle(cache, tables, kept, cu):
    """Position by position, from a frozen copy of the cache."""
    old, new = cache.clone(), cache.clone()
    for r in range(tables.shape[0]):
        for k, pos in enumerate(kept[cu[r]:cu[r + 1]].tolist()):
            src_block, dst_block = tables[r, pos // BLOCK], tables[r, k // BLOCK]
            new[dst_block, k % BLOCK] = old[src_block, pos % BLOCK]
    return new


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kinds,lens", [
    (["all", "protected", "every_other", "random"], [50, 37, 160, 99]),
    (["drop_first", "tail", "none", "random"], [129, 64, 20, 1]),
    (["random"], [2000]),
    # many requests, empty ones first, last and in between: the kernel finds each row's request
    (["none", "random", "none", "none", "drop_first", "every_other", "random", "tail", "none",
      "protected", "random", "none"], [5, 70, 16, 33, 45, 90, 17, 64, 1, 40, 200, 3]),
])
def test_compaction_matches_oracle_bitwise(kinds, lens, dtype):
    key_cache, value_cache, tables, kept, cu = compaction_case(kinds, lens, dtype)
    want_k = compaction_oracle(key_cache, tables, kept, cu)
    want_v = compaction_oracle(value_cache, tables, kept, cu)
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    kv_compaction.compact_kv_reference(ref_k, ref_v, tables, kept, cu)
    kv_compaction.compact_kv_triton(key_cache, value_cache, tables, kept, cu)
    for got, ref, want in ((key_cache, ref_k, want_k), (value_cache, ref_v, want_v)):
        assert torch.equal(bits(ref), bits(want))
        assert torch.equal(bits(got), bits(want))     # includes every block of other requests


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compaction_on_flash_attention_cache_views(dtype):
    """vLLM's FlashAttention layer cache is [blocks, kv_heads, block, 2*d]; its K and V are the
    strided views transpose(1, 2).split(d, -1) (attention/cuda.py). Both implementations must
    move tokens through those views and leave the other half (V for K and back) intact."""
    key_cache, value_cache, tables, kept, cu = compaction_case(["random", "every_other"],
                                                               [120, 77], dtype)
    want_k = compaction_oracle(key_cache, tables, kept, cu)
    want_v = compaction_oracle(value_cache, tables, kept, cu)
    for impl in (kv_compaction.compact_kv_reference, kv_compaction.compact_kv_triton):
        layer = torch.cat([key_cache, value_cache], dim=-1).transpose(1, 2).contiguous()
        k_view, v_view = layer.transpose(1, 2).split(key_cache.shape[-1], dim=-1)
        assert not k_view.is_contiguous()
        impl(k_view, v_view, tables, kept, cu)
        assert torch.equal(bits(k_view), bits(want_k)), impl.__name__
        assert torch.equal(bits(v_view), bits(want_v)), impl.__name__


def test_compaction_with_key_and_value_strides_differing():
    """K and V move in the same launches when their strides agree (vLLM's views); otherwise
    one after the other. Here V is a transposed-layout view, K is contiguous."""
    key_cache, value_cache, tables, kept, cu = compaction_case(["random", "drop_first"],
                                                               [150, 61], torch.float16)
    want_k = compaction_oracle(key_cache, tables, kept, cu)
    want_v = compaction_oracle(value_cache, tables, kept, cu)
    v_view = value_cache.transpose(1, 2).contiguous().transpose(1, 2)
    assert v_view.stride() != key_cache.stride()
    kv_compaction.compact_kv_triton(key_cache, v_view, tables, kept, cu)
    assert torch.equal(bits(key_cache), bits(want_k))
    assert torch.equal(bits(v_view), bits(want_v))


def test_compaction_plan_has_no_read_write_hazard():
    """The Triton move phase reads sources straight from the cache only when no moving row
    writes that position; everything else comes from the staging buffer."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        lens = [int(x) for x in torch.randint(1, 300, (4,), generator=g)]
        kept = [torch.sort(torch.randperm(n, generator=g)[:int(torch.randint(0, n + 1, (1,),
                generator=g))]).values for n in lens]
        cu = torch.tensor([0] + torch.tensor([x.numel() for x in kept]).cumsum(0).tolist())
        plan = kv_compaction.compaction_plan(torch.cat(kept).long(), cu)
        moving = plan["src"] >= 0
        direct = moving & ~plan["staged"]
        reads = set(zip(plan["request"][direct].tolist(), plan["src"][direct].tolist()))
        writes = set(zip(plan["request"][moving].tolist(), plan["dst"][moving].tolist()))
        assert not reads & writes
        assert (plan["dst"][moving] < plan["src"][moving]).all()


def test_compaction_rejects_bad_batches():
    key_cache, value_cache, tables, kept, cu = compaction_case(["random", "random"], [40, 40],
                                                               torch.float32)
    with pytest.raises(ValueError, match="strictly ascending"):
        kv_compaction.compact_kv_reference(key_cache, value_cache, tables,
                                           torch.tensor([3, 2]), torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match=r"outside \[0, 48\)"):
        kv_compaction.compact_kv_reference(key_cache, value_cache, tables,
                                           torch.tensor([48]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="does not partition"):
        kv_compaction.compact_kv_reference(key_cache, value_cache, tables, kept,
                                           torch.tensor([0, 1, 2]))


def test_compact_blocks_cpu_layout():
    num_blocks, heads, block_size, d = 12, 2, 16, 32
    cache = randn(num_blocks, heads, block_size, 2 * d, seed=11)    # vLLM CPU layout
    before = cache.clone()
    table = torch.tensor([7, 2, 9, 0, 5, 11])
    kernels.compact_blocks(cache, table, src_blocks=torch.tensor([0, 2, 3, 5]),
                           dst_blocks=torch.tensor([0, 1, 2, 3]))
    assert torch.equal(cache[7], before[7])        # block 0 stays
    assert torch.equal(cache[2], before[9])        # logical 2 -> 1
    assert torch.equal(cache[9], before[0])        # logical 3 -> 2 (source already read)
    assert torch.equal(cache[0], before[11])       # logical 5 -> 3
    untouched = [b for b in range(num_blocks) if b not in (2, 9, 0)]
    assert torch.equal(cache[untouched], before[untouched])
    with pytest.raises(ValueError, match="<= its src"):
        kernels.compact_blocks(cache, table, torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="strictly ascending"):
        kernels.compact_blocks(cache, table, torch.tensor([3, 4]), torch.tensor([2, 2]))


# ----------------------------------------------------------------------------- dispatcher

def test_dispatcher_paths_agree_and_log_once(caplog):
    q, k, v, idx, cu_seq, cu_idx = varlen_case([60, 40], 4, 2, 64, torch.float32, [0.5, 0.5])
    kernels._announced.clear()
    with caplog.at_level(logging.INFO, logger="vllm_kvsparse.kernels"):
        a = kernels.sparse_prefill_attention(q, k, v, idx, cu_seq, cu_idx)            # auto: torch
        kernels.sparse_prefill_attention(q, k, v, idx, cu_seq, cu_idx)
        b = kernels.sparse_prefill_attention(q, k, v, idx, cu_seq, cu_idx, backend="triton")
        pos = torch.arange(50, 60)
        s1 = kernels.compute_probe_scores(q[pos], pos, k[:60])
        s2 = kernels.compute_probe_scores(q[pos], pos, k[:60], backend="triton")
    torch.testing.assert_close(a, b, **TOL[torch.float32])
    torch.testing.assert_close(s1, s2, **TOL[torch.float32])
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("kernel sparse_attention: using the torch implementation (cpu tensors)") == 1
    assert sum("sparse_attention: using the triton" in m for m in lines) == 1
    assert sum("probe_scores" in m for m in lines) == 2


def test_dispatcher_errors(monkeypatch):
    x = torch.zeros(2, 2, 64)
    with pytest.raises(ValueError, match="'cuda'"):
        kernels.choose_backend("probe_scores", x, "cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        kernels.choose_backend("probe_scores", x, "triton")


def test_importing_kernels_does_not_import_triton_or_vllm():
    code = ("import sys, vllm_kvsparse.kernels, vllm_kvsparse.zipvl; "
            "print('triton' in sys.modules, any(m == 'vllm' or m.startswith('vllm.') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    root = Path(kernels.__file__).parent
    for path in root.glob("*.py"):
        assert "import vllm" not in path.read_text().replace("vllm_kvsparse", ""), path
