"""ZipVL token selection: which prompt tokens a layer keeps (pure torch, no vLLM).

Paper: *ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification*,
Yefei He, Feng Chen, Jing Liu, Wenqi Shao, Hong Zhou, Kaipeng Zhang, Bohan Zhuang,
arXiv:2410.08584. Equation numbers below are the paper's (docs/policies.md lists the
project's deviations).

For one sequence of ``n`` prompt tokens in one layer:

1. Probe rows ``P`` (``m = |P|``): the last ``num_recent`` positions plus ``num_random``
   distinct seeded-random positions from the rest (supplement, Table A).
2. ``A = causal_softmax(Q[P] K^T * scale)`` in fp32, averaged over all query heads -> ``[m, n]``.
3. Accumulated score (Eq. 6): ``a_j = sum_i A[i, j]``; the total mass is ``m``.
4. Budget (Eq. 7): ``p = min{p : sum of the p largest a_j >= tau * m}``.
5. Normalized score (Eq. 8): ``ã_j = a_j / c_j``, ``c_j`` = number of probes at positions ``>= j``
   (the probes that can see ``j``); ``ã_j = 0`` where ``c_j = 0``.
6. Important set (Eq. 9): ``T`` = the ``p`` largest ``ã_j`` (ties -> lower index), ascending.

Parameters:
    tau (float, default 0.975): fraction of attention mass to retain, in (0, 1]. The paper finds
        accuracy holds down to ~0.97 and drops sharply below. ``tau = 1`` keeps every token with
        non-zero accumulated mass (a probe's probability below e^-80 of its row's largest
        counts as exactly 0, as fp32 underflow would make it a little further down; see
        EXP_FLOOR).
    num_recent, num_random (int, default 64 each): probe counts. When ``n`` is small they are
        clamped: ``min(num_recent, n)`` recent probes, then ``min(num_random, n - recent)``
        random ones; so with ``n <= num_recent + num_random`` every position is a probe.
    keep_first (int, default 4): project addition, not in the paper. The first positions are
        attention sinks: they collect much of every row's mass, and EffiVLM-Bench shows dropping
        sinks hurts most at low budgets. Kept on top of the paper's set.
    keep_last (int, default 1): project addition. The last prompt token's attention output is
        what produces the first generated token, and ZipVL zeroes the attention output of dropped
        rows, so it must never be dropped. Kept on top of the paper's set.
    candidate_mask (bool [n], optional): positions that MAY be dropped (scope "visual": only
        image/video placeholder tokens). Positions where it is False are always kept.

How the budget interacts with the additions (the rule, stated once):
    ``T = TopP ∪ protected ∪ {j : not candidate_mask[j]}``, where ``TopP`` is the paper's
    top-``p`` set over ALL positions. Equivalently, a token is dropped iff the paper drops it AND
    it is a candidate AND it is not protected. So ``|T| >= p``, the extra tokens never displace a
    token the paper keeps, and with ``keep_first = keep_last = 0`` and no ``candidate_mask`` the
    result is exactly Eq. 6-9.

GQA: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Selection",
    "select_important_tokens",
    "select_important_tokens_varlen",
    "select_from_scores",
    "default_probe_indices",
    "probe_attention_by_group",
    "probe_column_sums",
    "probe_attention_matrix",
    "probe_attention_scores",
    "budget_from_accumulated",
    "top_p_by_normalized",
    "sparse_prefill_attention_reference",
]


@dataclass
class Selection:
    """What one layer keeps for one sequence.

    indices:       LongTensor [t], ascending kept positions (``t >= num_important``).
    num_important: p from Eq. 7 (before protected / non-candidate additions).
    accumulated:   fp32 [n], Eq. 6 (head-averaged column sums over the probe rows).
    normalized:    fp32 [n], Eq. 8 (0 where no probe sees the position).
    probe_idx:     LongTensor [m], ascending probe positions used.
    """

    indices: torch.Tensor
    num_important: int
    accumulated: torch.Tensor
    normalized: torch.Tensor
    probe_idx: torch.Tensor

    @property
    def keep_ratio(self) -> float:
        return self.indices.numel() / max(1, self.accumulated.numel())


# ----------------------------------------------------------------------------- validation


def _check_qk(query: torch.Tensor, key: torch.Tensor) -> tuple[int, int, int, int]:
    if query.dim() != 3:
        raise ValueError(f"query must be [n, num_heads, head_dim], got shape {tuple(query.shape)}")
    if key.dim() != 3:
        raise ValueError(f"key must be [n, num_kv_heads, head_dim], got shape {tuple(key.shape)}")
    n, num_heads, head_dim = query.shape
    if key.shape[0] != n:
        raise ValueError(f"query has {n} tokens but key has {key.shape[0]}")
    if key.shape[2] != head_dim:
        raise ValueError(f"query head_dim {head_dim} != key head_dim {key.shape[2]}")
    if n == 0:
        raise ValueError("empty input: n = 0 tokens")
    num_kv_heads = key.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    return n, num_heads, num_kv_heads, head_dim


def _check_tau(tau: float) -> None:
    if not (0.0 < tau <= 1.0):
        raise ValueError(f"tau must be in (0, 1], got {tau}")


def _check_nonneg(**counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _check_probe_idx(probe_idx: torch.Tensor, n: int) -> torch.Tensor:
    if probe_idx.dim() != 1 or probe_idx.dtype in (torch.bool,) or probe_idx.is_floating_point():
        raise ValueError(
            f"probe_idx must be a 1-D integer tensor, got shape {tuple(probe_idx.shape)} "
            f"dtype {probe_idx.dtype}")
    if probe_idx.numel() == 0:
        raise ValueError("probe_idx is empty: need at least one probe position")
    probe_idx = probe_idx.long()
    lo, hi = int(probe_idx.min()), int(probe_idx.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(f"probe_idx has position {bad} outside [0, {n})")
    sorted_idx = torch.sort(probe_idx).values
    dup = sorted_idx[1:][sorted_idx[1:] == sorted_idx[:-1]]
    if dup.numel():
        raise ValueError(f"probe_idx has duplicated position {int(dup[0])}")
    return sorted_idx


# ----------------------------------------------------------------------------- pieces


def default_probe_indices(n: int, num_recent: int = 64, num_random: int = 64, seed: int = 0,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Probe positions (supplement §B.1): the last ``num_recent`` plus ``num_random`` distinct
    positions drawn uniformly (seeded torch.Generator on CPU, so reproducible on any device)
    from the others. Both counts are clamped to what ``n`` allows. Returns LongTensor [m],
    ascending."""
    _check_nonneg(n=n, num_recent=num_recent, num_random=num_random)
    if n == 0:
        raise ValueError("empty input: n = 0 tokens")
    if num_recent + num_random == 0:
        raise ValueError("num_recent + num_random must be > 0 (no probe rows)")
    recent = min(num_recent, n)
    rest = n - recent
    random = min(num_random, rest)
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(rest, generator=gen)[:random]
    idx = torch.cat([torch.sort(picked).values, torch.arange(rest, n)])
    return idx.to(device=device) if device is not None else idx


def probe_attention_by_group(query: torch.Tensor, key: torch.Tensor, probe_idx: torch.Tensor,
                             scale: float):
    """Per-head causal softmax of the probe rows, one KV head's query group at a time.

    query [n, H, d], key [n, Hkv, d]; probe_idx LongTensor [m] (row ``i`` sees keys
    ``0..probe_idx[i]``). Yields ``(first query head of the group, probs [g, m, n] fp32)``:
    memory is O(g * m * n) at a time, never [H, m, n]."""
    n, num_heads, _ = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    probe_idx = probe_idx.to(query.device).long()
    q = query[probe_idx].float()                                           # [m, H, d]
    future = torch.arange(n, device=query.device)[None, :] > probe_idx[:, None]   # [m, n]
    for kv_head in range(num_kv_heads):
        qg = q[:, kv_head * group:(kv_head + 1) * group].transpose(0, 1)    # [g, m, d]
        logits = torch.matmul(qg, key[:, kv_head].float().T) * scale        # [g, m, n]
        logits.masked_fill_(future, float("-inf"))
        yield kv_head * group, torch.softmax(logits, dim=-1)


# Probabilities below e^-80 of their row's largest count as exactly 0 in `probe_column_sums`.
# Why: x86 exp is ~100x slower when its result is denormal (inputs in [-103, -87]) and 10-40x
# when it underflows or gets -inf, which is most of a peaked row; clamping the inputs at -80
# keeps every exp on the fast path. e^-80 (1.8e-35) is far below fp32 rounding of any sum these
# probabilities feed (each row sums to 1); fp32 underflow alone zeroes them below ~e^-103.
EXP_FLOOR = -80.0
_FLOOR_PROB = math.exp(EXP_FLOOR) * 1.001   # exp at the floor, with room for the last ulp


def probe_column_sums(query: torch.Tensor, key: torch.Tensor, probe_idx: torch.Tensor,
                      scale: float, per_head: bool = False, chunk: int = 16) -> torch.Tensor:
    """Column sums of the probe rows' causal softmax: ``s[j] = sum_h sum_{i in P} A^h[i, j]``
    fp32 ``[n]`` (summed, not averaged, over heads), or per head ``[H, n]`` with ``per_head``.

    The fast path of `probe_attention_by_group` (same math, fp32 logits from the bf16/fp16/fp32
    inputs; probabilities below e^-80 of their row's largest are 0, see EXP_FLOOR): the probe
    rows (ascending) go in chunks of ``chunk`` rows for every head at once, and a chunk only
    computes keys ``0..w-1`` (``w`` = its last probe + 1: later keys are masked for every row of
    it). Every chunk works in place in one reused buffer (logits -> exp -> column sums by a
    matrix-vector product with the rows' 1/sum): fresh multi-MB temporaries per step cost more
    in page faults than the arithmetic on a CPU."""
    n, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    probes = torch.sort(probe_idx.to(query.device).long()).values
    m = probes.numel()
    q = (query[probes].float() * scale).view(m, num_kv_heads, group, head_dim)
    q = q.transpose(0, 1).contiguous()                                  # [Hkv, m, g, d]
    k = key.transpose(0, 1).float()                                     # [Hkv, n, d]
    out = torch.zeros((num_kv_heads, group, n) if per_head else (n,), dtype=torch.float32,
                      device=query.device)
    pos = torch.arange(n, device=query.device)
    bounds = probes.tolist()
    chunk = min(chunk, m)
    buffer = torch.empty(num_kv_heads * chunk * group * (bounds[-1] + 1), dtype=torch.float32,
                         device=query.device)                           # the widest chunk
    for r0 in range(0, m, chunk):
        rows = probes[r0:r0 + chunk]
        r = rows.numel()
        first, width = bounds[r0] + 1, bounds[r0 + r - 1] + 1
        e = buffer[:num_kv_heads * r * group * width].view(num_kv_heads, r * group, width)
        torch.bmm(q[:, r0:r0 + r].reshape(num_kv_heads, r * group, head_dim),
                  k[:, :width].transpose(1, 2), out=e)                  # logits
        if first < width:
            future = pos[None, first:width] > rows[:, None]             # [r, w - first]
            e.view(num_kv_heads, r, group, width)[..., first:width].masked_fill_(
                future[:, None, :], float("-inf"))
        e.sub_(e.amax(-1, keepdim=True)).clamp_min_(EXP_FLOOR).exp_()
        torch.nn.functional.threshold_(e, _FLOOR_PROB, 0.0)            # floor (and future) -> 0
        inv_sum = e.sum(-1, keepdim=True).reciprocal_()                 # [Hkv, r * g, 1]
        if per_head:
            out[:, :, :width] += e.mul_(inv_sum).view(num_kv_heads, r, group, width).sum(1)
        else:
            out[:width] += torch.bmm(inv_sum.transpose(1, 2), e).sum((0, 1))
    return out.view(num_heads, n) if per_head else out


def probe_attention_matrix(query: torch.Tensor, key: torch.Tensor, probe_idx: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Head-averaged causal attention of the probe rows, ``A [m, n]`` fp32 (row i sees keys
    0..probe_idx[i]). Memory is O(g * m * n) at a time: one KV head's query group per step."""
    n, num_heads, num_kv_heads, head_dim = _check_qk(query, key)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    total = torch.zeros(probe_idx.numel(), n, dtype=torch.float32, device=query.device)
    for _, probs in probe_attention_by_group(query, key, probe_idx, scale):
        total += probs.sum(0)
    return total / num_heads


def probe_attention_scores(query: torch.Tensor, key: torch.Tensor, probe_idx: torch.Tensor,
                           scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 and Eq. 8 from the probe rows: ``(accumulated [n], normalized [n])``, fp32
    (`probe_column_sums` / H: same values as ``probe_attention_matrix(...).sum(0)`` up to fp32
    summation order)."""
    n, num_heads, _, head_dim = _check_qk(query, key)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    accumulated = probe_column_sums(query, key, probe_idx, scale) / num_heads
    return accumulated, normalize_by_visibility(accumulated, probe_idx)


def normalize_by_visibility(accumulated: torch.Tensor, probe_idx: torch.Tensor) -> torch.Tensor:
    """Eq. 8: ``a_j / c_j`` with ``c_j = |{i in P : i >= j}|``; 0 where ``c_j = 0``."""
    n = accumulated.numel()
    probes = torch.sort(probe_idx.to(accumulated.device).long()).values
    positions = torch.arange(n, device=accumulated.device)
    visible = probes.numel() - torch.searchsorted(probes, positions, side="left")   # c_j
    out = torch.zeros_like(accumulated, dtype=torch.float32)
    seen = visible > 0
    out[seen] = accumulated[seen].float() / visible[seen].float()
    return out


def budget_from_accumulated(accumulated: torch.Tensor, tau: float,
                            total_mass: float | None = None) -> int:
    """Eq. 7: the fewest tokens whose largest accumulated scores reach ``tau * total_mass``.

    ``total_mass`` is ``m`` (number of probe rows) in the paper; ``None`` uses
    ``accumulated.sum()``. The running sum is taken in float64. ``tau = 1`` (or a threshold the
    fp32 scores never reach because of rounding) returns the number of non-zero scores."""
    _check_tau(tau)
    if accumulated.dim() != 1 or accumulated.numel() == 0:
        raise ValueError(f"accumulated must be a non-empty 1-D tensor, got shape "
                         f"{tuple(accumulated.shape)}")
    scores = accumulated.double()
    nonzero = int((scores > 0).sum())
    if tau == 1.0:
        return nonzero
    total = float(scores.sum()) if total_mass is None else float(total_mass)
    # Partial selection: the k largest values in descending order (torch.topk) are the first k
    # of the full descending sort (ties are equal values, so their order cannot change a
    # running sum), so the cumsum over them decides p exactly when it reaches the threshold
    # within k; k doubles until it does (or covers every non-zero score).
    n = scores.numel()
    k = min(n, max(1024, nonzero // 4))
    while True:
        running = torch.cumsum(torch.topk(scores, k, sorted=True).values, 0)
        reached = torch.nonzero(running >= tau * total)
        if reached.numel():
            return min(int(reached[0]) + 1, nonzero)
        if k >= nonzero:      # every non-zero score summed: the threshold is out of reach
            return nonzero
        k = min(n, 2 * k)


def top_p_by_normalized(normalized: torch.Tensor, p: int) -> torch.Tensor:
    """Eq. 9: positions of the ``p`` largest normalized scores, ties to the lower index,
    returned ascending (LongTensor [p])."""
    if p < 0:
        raise ValueError(f"p must be >= 0, got {p}")
    n = normalized.numel()
    if p == 0:
        return torch.zeros(0, dtype=torch.long, device=normalized.device)
    if p >= n:
        return torch.arange(n, device=normalized.device)
    # Partial selection, identical to a stable descending sort's first p: the p-th largest
    # value v (a selection, O(n)); every position above v, then the lowest-index positions
    # equal to v until there are p.
    v = torch.kthvalue(normalized, n - p + 1).values
    above = normalized > v
    tied = torch.nonzero(normalized == v).flatten()
    keep = above.clone()
    keep[tied[:p - int(above.sum())]] = True
    return torch.nonzero(keep).flatten()


def select_from_scores(accumulated: torch.Tensor, normalized: torch.Tensor, num_probes: int, *,
                       tau: float = 0.975, keep_first: int = 4, keep_last: int = 1,
                       candidate_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Steps 5-7 plus the project's additions, from scores computed elsewhere (e.g. the fused
    probe kernel). Returns ``(indices ascending, p)``; see the module docstring for the rule."""
    _check_tau(tau)
    _check_nonneg(keep_first=keep_first, keep_last=keep_last)
    n = accumulated.numel()
    if normalized.shape != accumulated.shape:
        raise ValueError(f"normalized shape {tuple(normalized.shape)} != accumulated shape "
                         f"{tuple(accumulated.shape)}")
    p = budget_from_accumulated(accumulated, tau, total_mass=num_probes)
    keep = torch.zeros(n, dtype=torch.bool, device=accumulated.device)
    keep[top_p_by_normalized(normalized, p)] = True
    keep[:keep_first] = True
    if keep_last:
        keep[max(0, n - keep_last):] = True
    if candidate_mask is not None:
        if candidate_mask.dtype != torch.bool or candidate_mask.shape != (n,):
            raise ValueError(f"candidate_mask must be bool [{n}], got dtype {candidate_mask.dtype} "
                             f"shape {tuple(candidate_mask.shape)}")
        keep |= ~candidate_mask.to(keep.device)
    return torch.nonzero(keep).flatten(), p


# ----------------------------------------------------------------------------- public entry


def select_important_tokens(query: torch.Tensor, key: torch.Tensor, *, tau: float = 0.975,
                            num_recent: int = 64, num_random: int = 64,
                            probe_idx: torch.Tensor | None = None, keep_first: int = 4,
                            keep_last: int = 1, scale: float | None = None, seed: int = 0,
                            candidate_mask: torch.Tensor | None = None,
                            scores_fn=None) -> Selection:
    """ZipVL's important-token set for one sequence in one layer (Eq. 6-9).

    query: [n, num_heads, head_dim], key: [n, num_kv_heads, head_dim] (post-RoPE, causal).
    ``probe_idx`` (distinct positions) overrides the default probe choice. ``scale`` defaults to
    1/sqrt(head_dim). ``scores_fn(query, key, probe_idx, scale) -> (accumulated, normalized)``
    replaces `probe_attention_scores` (e.g. the fused Triton kernel,
    ``vllm_kvsparse.kernels.compute_probe_scores``). Other parameters: see the module docstring.
    """
    n, *_ = _check_qk(query, key)
    _check_tau(tau)
    _check_nonneg(num_recent=num_recent, num_random=num_random, keep_first=keep_first,
                  keep_last=keep_last)
    if probe_idx is None:
        probe_idx = default_probe_indices(n, num_recent, num_random, seed)
    probe_idx = _check_probe_idx(probe_idx.cpu(), n).to(query.device)
    accumulated, normalized = (scores_fn or probe_attention_scores)(query, key, probe_idx, scale)
    indices, p = select_from_scores(accumulated, normalized, probe_idx.numel(), tau=tau,
                                    keep_first=keep_first, keep_last=keep_last,
                                    candidate_mask=candidate_mask)
    return Selection(indices, p, accumulated, normalized, probe_idx)


def select_important_tokens_varlen(query: torch.Tensor, key: torch.Tensor,
                                   cu_seqlens: torch.Tensor, **kwargs) -> list[Selection]:
    """Packed batch: sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``. Returns one
    Selection per sequence, indices relative to the sequence start. ``candidate_mask`` (if
    given) is packed like the tokens."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    mask = kwargs.pop("candidate_mask", None)
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        seq_mask = None if mask is None else mask[start:end]
        out.append(select_important_tokens(query[start:end], key[start:end],
                                           candidate_mask=seq_mask, **kwargs))
    return out


def sparse_prefill_attention_reference(query: torch.Tensor, key: torch.Tensor,
                                       value: torch.Tensor, indices: torch.Tensor,
                                       scale: float | None = None,
                                       first_row: int = 0) -> torch.Tensor:
    """Token-sparse causal attention (step 8): queries in ``indices`` attend to keys in
    ``indices`` at original positions <= their own. Rows not in ``indices`` are zero.
    ``first_row`` > 0 computes only the query rows at positions >= first_row (the last chunk
    of a chunked prefill; the earlier rows ran before) and leaves the others zero.

    query [n, H, d], key [n, Hkv, d], value [n, Hkv, dv], indices LongTensor [t] ascending.
    fp32 math, output [n, H, dv] in query's dtype. Implemented as gather -> causal SDPA on the
    kept rows (fp32, GQA) -> scatter: T is ascending, so causality by original position is
    causality by rank within T, and SDPA's fused CPU/GPU kernels never build the [t, t]
    matrix."""
    n, num_heads, num_kv_heads, head_dim = _check_qk(query, key)
    if value.dim() != 3 or value.shape[:2] != key.shape[:2]:
        raise ValueError(f"value must be [n, num_kv_heads, dv] matching key {tuple(key.shape)}, "
                         f"got {tuple(value.shape)}")
    indices = indices.to(query.device).long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"indices must lie in [0, {n})")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError("indices must be strictly ascending")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(n, num_heads, value.shape[2], dtype=query.dtype, device=query.device)
    if indices.numel() == 0:
        return out
    # [1, h, t, d]: SDPA's fused (flash) CPU kernel only takes 4-D inputs; 3-D ones fall back
    # to the math path, which builds the [h, t, t] score matrix (10x slower, O(h t^2) memory).
    rows = indices if first_row <= 0 else indices[indices >= first_row]
    if rows.numel() == 0:
        return out
    q = query[rows].float().transpose(0, 1).unsqueeze(0)
    k, v = (x[indices].float().transpose(0, 1).unsqueeze(0) for x in (key, value))
    if rows.numel() == indices.numel():
        causal = {"is_causal": True}
    else:   # a suffix of the kept rows over all kept keys: causal by original position
        causal = {"attn_mask": indices[None, :] <= rows[:, None]}
    attn = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, scale=scale, enable_gqa=num_heads != num_kv_heads, **causal)
    out[rows] = attn[0].transpose(0, 1).to(query.dtype)
    return out
