"""ZipVL selection (vllm_kvsparse.zipvl) against an independent, loop-by-loop implementation of
the paper's Eq. 6-9 written here in float64."""

import math

import pytest
import torch

from vllm_kvsparse import zipvl
from vllm_kvsparse.zipvl import (budget_from_accumulated, default_probe_indices,
                                 select_important_tokens, select_important_tokens_varlen,
                                 sparse_prefill_attention_reference, top_p_by_normalized)

PAPER = dict(keep_first=0, keep_last=0)   # no project additions: must equal the equations


# ----------------------------------------------------------------------------- the oracle

def paper_selection(q, k, probes, tau, scale=None):
    """Eq. 6-9, one probe row and one head at a time, explicit softmax, float64."""
    n, num_heads, d = q.shape
    group = num_heads // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    probes = sorted(int(i) for i in probes)
    attn = torch.zeros(len(probes), n, dtype=torch.float64)
    for r, i in enumerate(probes):
        for h in range(num_heads):
            logits = (k[: i + 1, h // group].double() @ q[i, h].double()) * scale
            weights = torch.exp(logits - logits.max())
            attn[r, : i + 1] += weights / weights.sum() / num_heads
    acc = attn.sum(0)                                                    # Eq. 6
    visible = [sum(1 for i in probes if i >= j) for j in range(n)]
    norm = torch.tensor([acc[j] / visible[j] if visible[j] else 0.0 for j in range(n)])  # Eq. 8
    if tau == 1.0:
        p = int((acc > 0).sum())
    else:                                                                 # Eq. 7
        running, p = 0.0, 0
        for value in sorted(acc.tolist(), reverse=True):
            running += value
            p += 1
            if running >= tau * len(probes):
                break
    ranked = sorted(range(n), key=lambda j: (-float(norm[j]), j))        # Eq. 9, ties -> low j
    return acc, norm, p, sorted(ranked[:p])


def rand_qk(n, heads, kv_heads, d, seed, dtype=torch.float32, peak=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, d, generator=g) * peak
    k = torch.randn(n, kv_heads, d, generator=g)
    return q.to(dtype), k.to(dtype)


def assert_matches_paper(sel, q, k, tau, scale=None):
    acc, norm, p, kept = paper_selection(q, k, sel.probe_idx.tolist(), tau, scale)
    torch.testing.assert_close(sel.accumulated.double(), acc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sel.normalized.double(), norm, rtol=1e-4, atol=1e-6)
    assert sel.num_important == p
    assert sel.indices.tolist() == kept


# ----------------------------------------------------------------------------- equations

@pytest.mark.parametrize("n,heads,kv_heads,d,probes,tau,seed", [
    (1, 2, 1, 16, (64, 64), 0.975, 0),
    (2, 4, 2, 16, (64, 64), 0.975, 1),
    (37, 4, 4, 32, (64, 64), 0.9, 2),         # n < probe count: every position probes
    (200, 8, 2, 64, (16, 16), 0.975, 3),
    (300, 28, 4, 64, (8, 8), 0.975, 4),       # Qwen2-VL-7B head ratio
    (700, 4, 1, 32, (16, 24), 0.95, 5),
    (129, 2, 2, 128, (64, 64), 0.5, 6),
])
def test_matches_paper_equations(n, heads, kv_heads, d, probes, tau, seed):
    q, k = rand_qk(n, heads, kv_heads, d, seed, peak=2.0)
    sel = select_important_tokens(q, k, tau=tau, num_recent=probes[0], num_random=probes[1],
                                  seed=seed, **PAPER)
    assert sel.probe_idx.numel() == min(n, sum(probes))
    assert_matches_paper(sel, q, k, tau)


def test_fp16_inputs_and_custom_scale():
    q, k = rand_qk(150, 4, 2, 32, 7, dtype=torch.float16)
    sel = select_important_tokens(q, k, num_recent=8, num_random=8, scale=0.3, **PAPER)
    assert sel.accumulated.dtype == torch.float32
    assert_matches_paper(sel, q.float(), k.float(), 0.975, scale=0.3)


def test_ties_go_to_lower_index():
    # Zero queries -> uniform attention; all positions between two probes tie exactly.
    q = torch.zeros(50, 2, 16)
    k = torch.randn(50, 1, 16)
    # (tau = 0.6 would put tau*m exactly on a partial sum, where fp32 and fp64 may disagree.)
    sel = select_important_tokens(q, k, tau=0.62, probe_idx=torch.tensor([9, 29, 49]), **PAPER)
    assert_matches_paper(sel, q, k, 0.62)
    assert sel.indices.tolist() == list(range(17))   # 10 best, then the lowest 7 of a tie
    assert top_p_by_normalized(torch.tensor([1.0, 2.0, 2.0, 2.0, 1.0]), 2).tolist() == [1, 2]
    assert top_p_by_normalized(torch.tensor([3.0, 3.0, 3.0]), 0).tolist() == []


def test_small_n_probes_are_all_positions():
    for n in (1, 2, 5, 127, 128):
        assert default_probe_indices(n, 64, 64).tolist() == list(range(n))
    idx = default_probe_indices(130, 64, 64)
    assert idx.numel() == 128 and idx[-64:].tolist() == list(range(66, 130))
    assert default_probe_indices(10, 0, 3, seed=1).numel() == 3
    assert default_probe_indices(10, 4, 0).tolist() == [6, 7, 8, 9]


def test_seed_determinism():
    a = default_probe_indices(5000, 64, 64, seed=3)
    assert torch.equal(a, default_probe_indices(5000, 64, 64, seed=3))
    assert not torch.equal(a, default_probe_indices(5000, 64, 64, seed=4))
    assert len(set(a.tolist())) == 128 and a.tolist() == sorted(a.tolist())
    q, k = rand_qk(400, 4, 2, 32, 8)
    s1 = select_important_tokens(q, k, num_recent=8, num_random=8, seed=11)
    s2 = select_important_tokens(q, k, num_recent=8, num_random=8, seed=11)
    assert torch.equal(s1.indices, s2.indices) and torch.equal(s1.probe_idx, s2.probe_idx)


def test_tau_one_keeps_every_token_with_mass():
    q, k = rand_qk(60, 2, 1, 16, 9)
    sel = select_important_tokens(q, k, tau=1.0, **PAPER)
    assert sel.num_important == 60 and sel.indices.tolist() == list(range(60))
    # Keys 10..19 get logits of about -1e4: exp underflows to exactly 0 in fp32.
    q = torch.ones(60, 2, 16)
    k = torch.ones(60, 1, 16)
    k[10:20] = -1000.0
    sel = select_important_tokens(q, k, tau=1.0, **PAPER)
    assert (sel.accumulated[10:20] == 0).all()
    assert sel.num_important == 50
    assert sel.indices.tolist() == list(range(10)) + list(range(20, 60))
    assert_matches_paper(sel, q, k, 1.0)


def test_probabilities_below_the_exp_floor_count_as_zero():
    # One query row (the last position) over 4 keys with logits 0, -75, -85 and -1e4 below the
    # largest: e^-75 is kept (a normal fp32 number), e^-85 is under the floor (e^-80), like
    # fp32 underflow. Column sums equal the fp64 softmax wherever it is above the floor.
    d = 16
    gaps = torch.tensor([0.0, -75.0, -85.0, -1e4])
    key = torch.zeros(4, 1, d)
    key[:, 0, 0] = gaps
    query = torch.zeros(4, 1, d)
    query[:, 0, 0] = 1.0
    sums = zipvl.probe_column_sums(query, key, torch.tensor([3]), scale=1.0)
    expected = torch.softmax(gaps.double(), 0)
    assert sums[0] == pytest.approx(1.0) and sums[1] == pytest.approx(float(expected[1]), rel=1e-5)
    assert sums[1] > 0 and sums[2] == 0 and sums[3] == 0
    assert zipvl.EXP_FLOOR == -80.0


def test_probe_idx_override():
    q, k = rand_qk(250, 4, 2, 32, 10)
    probes = torch.tensor([249, 3, 100, 17, 200])
    sel = select_important_tokens(q, k, probe_idx=probes, **PAPER)
    assert sel.probe_idx.tolist() == [3, 17, 100, 200, 249]
    assert_matches_paper(sel, q, k, 0.975)
    # Positions after the last probe are seen by nobody: normalized score 0.
    probes = torch.tensor([10, 20])
    sel = select_important_tokens(q, k, probe_idx=probes, **PAPER)
    assert (sel.normalized[21:] == 0).all() and (sel.accumulated[21:] == 0).all()
    assert sel.indices.max() <= 20
    assert_matches_paper(sel, q, k, 0.975)


def test_protected_tokens_are_added_on_top():
    q, k = rand_qk(300, 4, 2, 32, 12, peak=3.0)
    base = select_important_tokens(q, k, num_recent=8, num_random=8, **PAPER)
    prot = select_important_tokens(q, k, num_recent=8, num_random=8, keep_first=4, keep_last=3)
    assert prot.num_important == base.num_important
    want = sorted(set(base.indices.tolist()) | {0, 1, 2, 3, 297, 298, 299})
    assert prot.indices.tolist() == want
    assert prot.indices.numel() >= prot.num_important
    # Defaults protect 4 sinks and the last prompt token.
    dflt = select_important_tokens(q, k, num_recent=8, num_random=8)
    assert {0, 1, 2, 3, 299} <= set(dflt.indices.tolist())
    # keep_* larger than n is clamped.
    tiny = select_important_tokens(q[:3], k[:3], keep_first=10, keep_last=10)
    assert tiny.indices.tolist() == [0, 1, 2]


def test_candidate_mask_rule():
    q, k = rand_qk(300, 4, 2, 32, 13, peak=3.0)
    kw = dict(num_recent=8, num_random=8, keep_first=2, keep_last=1)
    base = select_important_tokens(q, k, **kw)
    all_true = select_important_tokens(q, k, candidate_mask=torch.ones(300, dtype=torch.bool),
                                       **kw)
    assert torch.equal(base.indices, all_true.indices)
    visual = torch.zeros(300, dtype=torch.bool)
    visual[50:250] = True                              # "image tokens"; text is never dropped
    sel = select_important_tokens(q, k, candidate_mask=visual, **kw)
    kept = set(sel.indices.tolist())
    assert set(range(50)) | set(range(250, 300)) <= kept
    # A token is dropped iff the paper drops it, it is a candidate and it is not protected.
    paper_kept = set(select_important_tokens(q, k, num_recent=8, num_random=8,
                                             **PAPER).indices.tolist())
    dropped = set(range(300)) - kept
    assert dropped == {j for j in range(2, 299) if visual[j] and j not in paper_kept}
    assert sel.num_important == base.num_important
    none_droppable = select_important_tokens(q, k, candidate_mask=torch.zeros(300,
                                             dtype=torch.bool), **kw)
    assert none_droppable.indices.tolist() == list(range(300))


def test_peaked_attention_keeps_few_flat_keeps_most():
    n, d = 1000, 64
    g = torch.Generator().manual_seed(14)
    k = torch.randn(n, 2, d, generator=g) * 0.1
    q = torch.randn(n, 4, d, generator=g) * 0.1
    hot = torch.arange(0, n, 50)                       # 20 tokens every query attends to
    direction = torch.randn(d, generator=g)
    k[hot] += direction * 2
    q += direction * 2
    peaked = select_important_tokens(q, k, **PAPER)
    assert peaked.num_important / n < 0.1
    # The 20 hot tokens hold almost all the mass; tau may drop the weakest of them.
    assert set(peaked.indices.tolist()) <= set(hot.tolist())
    assert peaked.num_important >= 18
    flat = select_important_tokens(torch.zeros(n, 4, d), k, **PAPER)
    assert flat.num_important / n > 0.9


def test_budget_edge_cases():
    acc = torch.tensor([0.25, 0.5, 0.25, 0.0])       # exact in binary: no rounding at the edge
    assert budget_from_accumulated(acc, 0.5) == 1
    assert budget_from_accumulated(acc, 0.75) == 2
    assert budget_from_accumulated(acc, 0.76) == 3
    assert budget_from_accumulated(acc, 1.0) == 3          # zero-mass token never needed
    assert budget_from_accumulated(acc, 0.99, total_mass=2.0) == 3   # unreachable: all mass
    assert budget_from_accumulated(acc, 0.25, total_mass=2.0) == 1


def test_varlen_matches_per_sequence():
    q, k = rand_qk(330, 4, 2, 32, 15)
    cu = torch.tensor([0, 100, 101, 330])
    sels = select_important_tokens_varlen(q, k, cu, num_recent=8, num_random=8)
    for b, sel in enumerate(sels):
        one = select_important_tokens(q[cu[b]:cu[b + 1]], k[cu[b]:cu[b + 1]],
                                      num_recent=8, num_random=8)
        assert torch.equal(sel.indices, one.indices)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call,message", [
    (lambda q, k: select_important_tokens(q[0], k), r"query must be .*\(4, 16\)"),
    (lambda q, k: select_important_tokens(q, k[0]), r"key must be .*\(2, 16\)"),
    (lambda q, k: select_important_tokens(q, k[:5]), "query has 10 tokens but key has 5"),
    (lambda q, k: select_important_tokens(q[:0], k[:0]), "empty input"),
    (lambda q, k: select_important_tokens(q, k[:, :, :8]), "head_dim 16 != key head_dim 8"),
    (lambda q, k: select_important_tokens(q[:, :3], k), "num_heads 3 is not divisible by "
                                                        "num_kv_heads 2"),
    (lambda q, k: select_important_tokens(q, k, tau=0.0), r"tau must be in \(0, 1\], got 0.0"),
    (lambda q, k: select_important_tokens(q, k, tau=1.5), "got 1.5"),
    (lambda q, k: select_important_tokens(q, k, num_recent=-1), "num_recent must be >= 0, got -1"),
    (lambda q, k: select_important_tokens(q, k, num_random=-2), "num_random must be >= 0, got -2"),
    (lambda q, k: select_important_tokens(q, k, num_recent=0, num_random=0), "no probe rows"),
    (lambda q, k: select_important_tokens(q, k, keep_first=-3), "keep_first must be >= 0, got -3"),
    (lambda q, k: select_important_tokens(q, k, probe_idx=torch.tensor([1, 10])),
     "position 10 outside"),
    (lambda q, k: select_important_tokens(q, k, probe_idx=torch.tensor([-1, 3])),
     "position -1 outside"),
    (lambda q, k: select_important_tokens(q, k, probe_idx=torch.tensor([4, 2, 4])),
     "duplicated position 4"),
    (lambda q, k: select_important_tokens(q, k, probe_idx=torch.tensor([], dtype=torch.long)),
     "probe_idx is empty"),
    (lambda q, k: select_important_tokens(q, k, probe_idx=torch.tensor([1.0])),
     "1-D integer tensor"),
    (lambda q, k: select_important_tokens(q, k, candidate_mask=torch.ones(9, dtype=torch.bool)),
     r"candidate_mask must be bool \[10\]"),
])
def test_bad_inputs_raise(call, message):
    q, k = rand_qk(10, 4, 2, 16, 0)
    with pytest.raises(ValueError, match=message):
        call(q, k)


# ----------------------------------------------------------------------------- sparse prefill

def sparse_oracle(q, k, v, indices, scale):
    n, heads, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(n, heads, v.shape[2], dtype=torch.float64)
    for i in indices:
        keys = [j for j in indices if j <= i]
        for h in range(heads):
            logits = torch.stack([q[i, h].double() @ k[j, h // group].double() for j in keys])
            w = torch.softmax(logits * scale, 0)
            out[i, h] = sum(w[r] * v[j, h // group].double() for r, j in enumerate(keys))
    return out


def test_sparse_prefill_reference_matches_oracle():
    g = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(40, h, 16, generator=g) for h in (4, 2, 2))
    indices = [0, 3, 4, 9, 17, 18, 30, 39]
    out = sparse_prefill_attention_reference(q, k, v, torch.tensor(indices))
    torch.testing.assert_close(out.double(), sparse_oracle(q, k, v, indices, 0.25),
                               rtol=1e-5, atol=1e-6)
    assert (out[[j for j in range(40) if j not in indices]] == 0).all()


def test_sparse_prefill_all_kept_is_dense_causal():
    g = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(70, h, 32, generator=g) for h in (8, 2, 2))
    out = sparse_prefill_attention_reference(q, k, v, torch.arange(70))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(4, 1).transpose(0, 1),
        v.repeat_interleave(4, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_sparse_prefill_dtype_and_edges():
    q, k = rand_qk(12, 2, 1, 16, 18, dtype=torch.float16)
    v = k.clone()
    out = sparse_prefill_attention_reference(q, k, v, torch.tensor([], dtype=torch.long))
    assert out.dtype == torch.float16 and (out == 0).all()
    out = sparse_prefill_attention_reference(q, k, v, torch.tensor([5]))
    torch.testing.assert_close(out[5], v[5].expand(2, 16))   # one key: weight 1
    with pytest.raises(ValueError, match="strictly ascending"):
        sparse_prefill_attention_reference(q, k, v, torch.tensor([3, 2]))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\)"):
        sparse_prefill_attention_reference(q, k, v, torch.tensor([12]))


def test_module_has_no_vllm_import():
    import inspect
    assert "import vllm" not in inspect.getsource(zipvl).replace("import vllm_kvsparse", "")


# ----------------------------------------------------------------------------- fast paths == full sort

def full_sort_budget(acc, tau, total):
    """Eq. 7 by a full descending sort (the implementation before partial selection)."""
    scores = acc.double()
    nonzero = int((scores > 0).sum())
    if tau == 1.0:
        return nonzero
    running = torch.cumsum(torch.sort(scores, descending=True).values, 0)
    reached = torch.nonzero(running >= tau * total)
    return nonzero if reached.numel() == 0 else min(int(reached[0]) + 1, nonzero)


def full_sort_top_p(norm, p):
    order = torch.sort(norm, descending=True, stable=True).indices
    return torch.sort(order[:p]).values


@pytest.mark.parametrize("seed", range(12))
def test_partial_selection_equals_full_sort(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 6000, (1,), generator=g))
    kind = seed % 4
    x = torch.rand(n, generator=g)
    if kind == 1:      # heavy ties: few distinct values, zeros included
        x = torch.randint(0, 5, (n,), generator=g).float() / 4
    elif kind == 2:    # peaked: a few tokens hold most of the mass
        x = torch.exp(torch.randn(n, generator=g) * 4)
    elif kind == 3:    # mostly zeros
        x = x * (torch.rand(n, generator=g) < 0.1)
    total = float(x.double().sum()) * float(torch.rand(1, generator=g) + 0.5)
    for tau in (0.3, 0.9, 0.975, 0.999, 1.0):
        assert budget_from_accumulated(x, tau, total) == full_sort_budget(x, tau, total)
    for p in sorted({0, 1, n // 3, n // 2, n - 1, n, n + 5}):
        assert torch.equal(top_p_by_normalized(x, p), full_sort_top_p(x, min(p, n))), p


@pytest.mark.parametrize("n,heads,kv_heads,dtype", [
    (3000, 16, 4, torch.bfloat16), (700, 28, 4, torch.float32), (5, 2, 1, torch.float16)])
def test_chunked_probe_sums_equal_group_matrix(n, heads, kv_heads, dtype):
    q, k = rand_qk(n, heads, kv_heads, 64, 13, dtype=dtype, peak=3.0)
    probes = default_probe_indices(n, 64, 64, seed=2)
    ref = zipvl.probe_attention_matrix(q, k, probes, 0.125).sum(0)
    fast, _ = zipvl.probe_attention_scores(q, k, probes, 0.125)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-7)
    per_head = zipvl.probe_column_sums(q, k, probes, 0.125, per_head=True)
    torch.testing.assert_close(per_head.sum(0) / heads, ref, rtol=1e-5, atol=1e-7)
