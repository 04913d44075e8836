"""KV-sparsity policies (vllm_kvsparse.policies) against independent references written here
from shared/notes/policies.md with plain Python loops in float64."""

import math
import subprocess
import sys

import pytest
import torch

from vllm_kvsparse import zipvl
from vllm_kvsparse.policies import (METHOD_NAMES, POLICIES, AirCache, FastV, LayerInput,
                                    PolicyError, PromptInfo, PyramidKV, Random, SnapKV,
                                    StreamingLLM, VLCache, ZipVL, make_policy,
                                    select_all_layers)
from vllm_kvsparse.policies.aircache import clip_to_mean, observation_window, sample_skewness

H, HKV, D = 4, 2, 16
G = H // HKV
SCALE = 1 / math.sqrt(D)


# ----------------------------------------------------------------------------- inputs


def visual_mask(n, spans):
    mask = torch.zeros(n, dtype=torch.bool)
    for a, b in spans:
        mask[a:b] = True
    return mask


def make_layers(n, num_layers, seed=0, peaks=None):
    """One (query, key) per layer; ``peaks`` sharpen some layers' attention."""
    gen = torch.Generator().manual_seed(seed)
    peaks = peaks or [1.0 + 0.7 * l for l in range(num_layers)]
    out = []
    for layer in range(num_layers):
        q = torch.randn(n, H, D, generator=gen) * peaks[layer]
        k = torch.randn(n, HKV, D, generator=gen)
        out.append(LayerInput(layer, q, k, SCALE))
    return out


def prompt(n, num_layers, mask=None):
    return PromptInfo(n, mask, num_layers, H, HKV)


def run(policy, n, num_layers, mask=None, seed=0, peaks=None):
    inputs = make_layers(n, num_layers, seed, peaks)
    return select_all_layers(policy, prompt(n, num_layers, mask), inputs), inputs


# ----------------------------------------------------------------------------- the oracle


def floor_b(b, total):
    return math.floor(b * total + 1e-9)


def cap(b, total):
    return max(1, floor_b(b, total))


def attn_row(inp, i, h, keys):
    """{j: softmax_j(q_i . k_j * scale)} over ``keys`` (positions <= i), head h, float64."""
    q = inp.query[i, h].double().tolist()
    logits = {}
    for j in keys:
        kv = inp.key[j, h // G].double().tolist()
        logits[j] = inp.scale * sum(a * b for a, b in zip(q, kv))
    top = max(logits.values())
    ex = {j: math.exp(x - top) for j, x in logits.items()}
    total = sum(ex.values())
    return {j: e / total for j, e in ex.items()}


def top_lower(scores, k, pool):
    """k best of ``pool`` by score, ties to the lower index, ascending."""
    return sorted(sorted(pool, key=lambda j: (-scores[j], j))[:k])


# ----------------------------------------------------------------------------- zipvl


@pytest.mark.parametrize("options", [
    {}, {"tau": 0.9, "keep_first": 0, "keep_last": 0, "num_recent_probes": 8,
         "num_random_probes": 8, "seed": 3},
    {"tau": 0.8, "scope": "visual", "num_recent_probes": 16, "num_random_probes": 4},
])
def test_zipvl_policy_equals_select_important_tokens(options):
    n, mask = 70, visual_mask(70, [(5, 50)])
    policy = make_policy("zipvl", options)
    choices, inputs = run(policy, n, 2, mask)
    for choice, inp in zip(choices, inputs):
        sel = zipvl.select_important_tokens(
            inp.query, inp.key, tau=policy.tau, num_recent=policy.num_recent_probes,
            num_random=policy.num_random_probes, keep_first=policy.keep_first,
            keep_last=policy.keep_last, scale=SCALE, seed=policy.seed,
            candidate_mask=mask if policy.scope == "visual" else None)
        assert torch.equal(choice.indices, sel.indices)
        assert torch.equal(choice.priority, sel.normalized)
        assert choice.num_scored == sel.num_important
    if options.get("scope") == "visual":
        assert all((~mask)[c.indices].sum() == (~mask).sum() for c in choices)
        # no image in visual scope: nothing may be dropped
        st = policy.begin(prompt(n, 2, None))
        assert policy.layer(st, inputs[0]).indices.tolist() == list(range(n))


def test_zipvl_budget_option_has_its_own_message():
    with pytest.raises(PolicyError) as err:
        make_policy("zipvl", {"budget": 0.2})
    assert str(err.value) == ("zipvl: budget is not a zipvl parameter "
                              "(its budget is adaptive: set tau)")


# ----------------------------------------------------------------------------- fastv


def ref_fastv(inputs, mask, k, budget):
    n, num_layers = len(mask), len(inputs)
    visual = [j for j in range(n) if mask[j]]
    if k >= num_layers or not visual:
        return [list(range(n))] * num_layers
    inp = inputs[k - 1]
    a = [0.0] * n
    for h in range(H):
        for j, p in attn_row(inp, n - 1, h, range(n)).items():
            a[j] += p / H
    keep_v = max(1, math.floor(len(visual) * budget + 0.5))   # round half up
    kept = sorted([j for j in range(n) if not mask[j]] + top_lower(a, keep_v, visual))
    return [list(range(n))] * k + [kept] * (num_layers - k)


@pytest.mark.parametrize("k,budget,num_layers", [(2, 0.5, 4), (1, 0.25, 3), (3, 0.1, 4),
                                                 (4, 0.5, 4), (9, 0.5, 4)])
def test_fastv_layer_k(k, budget, num_layers):
    n, mask = 60, visual_mask(60, [(6, 44)])
    policy = FastV(k=k, budget=budget)
    choices, inputs = run(policy, n, num_layers, mask, seed=k)
    expect = ref_fastv(inputs, mask.tolist(), k, budget)
    assert [c.indices.tolist() for c in choices] == expect
    if k < num_layers:
        kept_visual = int(mask[choices[-1].indices].sum())
        assert kept_visual == max(1, math.floor(38 * budget + 0.5))   # 19, 10 (9.5 up), 4
        assert choices[-1].priority[~mask].min() > choices[-1].priority[mask].max()


def test_fastv_no_image_and_scores_fn():
    n = 50
    choices, _ = run(FastV(k=1), n, 3, None)
    assert all(c.indices.tolist() == list(range(n)) for c in choices)
    calls = []

    def scores_fn(q, k, probe, scale):
        calls.append(probe.tolist())
        return zipvl.probe_attention_scores(q, k, probe, scale)

    mask = visual_mask(n, [(3, 40)])
    inputs = make_layers(n, 3, seed=5)
    plain = select_all_layers(FastV(k=1), prompt(n, 3, mask), inputs)
    for inp in inputs:
        inp.scores_fn = scores_fn
    routed = select_all_layers(FastV(k=1), prompt(n, 3, mask), inputs)
    assert calls == [[n - 1]]
    assert [c.indices.tolist() for c in plain] == [c.indices.tolist() for c in routed]


# ----------------------------------------------------------------------------- snapkv / pyramidkv


def ref_snap_scores(inp, window, kernel, pooling):
    n = inp.query.shape[0]
    prefix = n - window
    v = [[0.0] * prefix for _ in range(H)]
    for h in range(H):
        for i in range(prefix, n):
            for j, p in attn_row(inp, i, h, range(i + 1)).items():
                if j < prefix:
                    v[h][j] += p
    r = kernel // 2
    s = [0.0] * prefix
    for h in range(H):
        for j in range(prefix):
            vals = [v[h][t] if 0 <= t < prefix else 0.0 for t in range(j - r, j + r + 1)]
            s[j] += (sum(vals) / kernel if pooling == "avg" else max(vals)) / H
    return s


def ref_snap_keep(inp, budget, window, kernel, pooling, count=None):
    n = inp.query.shape[0]
    c = cap(budget, n)
    if n <= c:
        return list(range(n))
    w = min(window, c)
    s = ref_snap_scores(inp, w, kernel, pooling)
    count = c - w if count is None else count
    return top_lower(s, count, range(n - w)) + list(range(n - w, n))


@pytest.mark.parametrize("budget,window,kernel,pooling,n", [
    (0.2, 4, 5, "avg", 60), (0.3, 6, 7, "max", 60), (0.25, 8, 1, "avg", 48),
    (0.1, 32, 5, "max", 70),        # C = 7 < window: window clamped to C, nothing scored
    (0.5, 3, 3, "avg", 41),
])
def test_snapkv_matches_reference(budget, window, kernel, pooling, n):
    policy = SnapKV(budget=budget, window=window, kernel=kernel, pooling=pooling)
    choices, inputs = run(policy, n, 2, seed=n + kernel)
    for choice, inp in zip(choices, inputs):
        expect = ref_snap_keep(inp, budget, window, kernel, pooling)
        assert choice.indices.tolist() == expect
        assert len(expect) == cap(budget, n)
        w = min(window, cap(budget, n))
        scores = ref_snap_scores(inp, w, kernel, pooling)
        torch.testing.assert_close(choice.priority[:n - w].double(),
                                   torch.tensor(scores, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6)
        assert choice.priority[n - w:].min() > choice.priority[:n - w].max()


def test_snapkv_avg_pooling_routes_through_scores_fn():
    calls = []

    def scores_fn(q, k, probe, scale):
        calls.append(probe.numel())
        return zipvl.probe_attention_scores(q, k, probe, scale)

    inputs = make_layers(60, 2, seed=1)
    plain = select_all_layers(SnapKV(window=5), prompt(60, 2), inputs)
    for inp in inputs:
        inp.scores_fn = scores_fn
    routed = select_all_layers(SnapKV(window=5), prompt(60, 2), inputs)
    assert calls == [5, 5]
    assert [c.indices.tolist() for c in plain] == [c.indices.tolist() for c in routed]
    calls.clear()
    select_all_layers(SnapKV(window=5, pooling="max"), prompt(60, 2), inputs)
    assert calls == []   # max pooling needs per-head scores: torch path


def ref_pyramid_counts(n, budget, window, beta, num_layers):
    c = cap(budget, n)
    w = min(window, c)
    b = c - w
    lo = b // beta
    hi = 2 * b - lo
    if hi >= n - w:
        hi = n - w
        lo = 2 * b - hi
    step = (hi - lo) // (num_layers - 1)
    if n < 2 * b:
        return [b] * num_layers
    return [hi - l * step for l in range(num_layers)]


@pytest.mark.parametrize("budget,expect_counts", [
    (0.3, [39, 27, 15, 3]),     # C=24, B=20: min=1, max=39, step=12
    (0.54, [76, 52, 28, 4]),    # C=43, B=39: max clipped to n-w=76, min=2B-max=2, step=24
    (0.8, [60, 60, 60, 60]),    # C=64, B=60: n < 2B -> uniform (plain SnapKV)
])
def test_pyramidkv_schedule(budget, expect_counts):
    n, window, num_layers = 80, 4, 4
    assert ref_pyramid_counts(n, budget, window, 20, num_layers) == expect_counts
    policy = PyramidKV(budget=budget, window=window, kernel=3, pooling="max")
    choices, inputs = run(policy, n, num_layers, seed=7)
    for layer, (choice, inp) in enumerate(zip(choices, inputs)):
        assert choice.num_scored == expect_counts[layer]
        assert choice.indices.tolist() == ref_snap_keep(inp, budget, window, 3, "max",
                                                        count=expect_counts[layer])
    if budget == 0.8:
        snap = select_all_layers(SnapKV(budget=budget, window=window, kernel=3, pooling="max"),
                                 prompt(n, num_layers), inputs)
        assert [c.indices.tolist() for c in snap] == [c.indices.tolist() for c in choices]


def test_pyramidkv_single_layer_and_no_compression():
    choices, _ = run(PyramidKV(budget=0.3, window=4), 80, 1)
    assert len(choices[0].indices) == 24                    # L = 1: uniform B
    choices, _ = run(PyramidKV(budget=1.0, window=4), 80, 3)
    assert all(c.indices.tolist() == list(range(80)) for c in choices)


# ----------------------------------------------------------------------------- streamingllm


def test_streamingllm():
    choices, _ = run(StreamingLLM(budget=0.2), 60, 2)        # C=12: 4 sinks + 8 recent
    assert choices[0].indices.tolist() == [0, 1, 2, 3] + list(range(52, 60))
    prio = choices[0].priority
    assert prio[:4].min() > prio[4:].max() and bool((prio[5:] > prio[4:-1]).all())
    choices, _ = run(StreamingLLM(budget=0.05, sinks=4), 60, 1)   # C=3 < sinks
    assert choices[0].indices.tolist() == [0, 1, 2]
    choices, _ = run(StreamingLLM(budget=0.1, sinks=0), 60, 1)
    assert choices[0].indices.tolist() == list(range(54, 60))


# ----------------------------------------------------------------------------- vlcache


def ref_vlcache(inputs, mask, budget, wf=0.1, adaptive=True, thr=0.01, lo=0.009):
    n, num_layers = len(mask), len(inputs)
    visual = [j for j in range(n) if mask[j]]
    start = visual[-1] + 1 if visual else n
    rows = list(range(start, n)) if start < n else list(range(n - min(n, 32), n))
    den = sum(i + 1 for i in rows)
    gammas, scores = [], []
    for inp in inputs:
        s, sparsity = [0.0] * n, []
        for h in range(H):
            nnz = 0
            for i in rows:
                row = attn_row(inp, i, h, range(i + 1))
                top = max(row.values())
                nnz += sum(1 for p in row.values() if p >= thr * top)
                for j, p in row.items():
                    s[j] += p
            sparsity.append((den - nnz) / den)
        gammas.append(sum(sparsity) / H)
        scores.append(s)
    w = floor_b(wf * budget, n)
    total = sum(1 - g for g in gammas)
    if adaptive:
        alphas = [min(1.0, max(lo, (1 - g) / total * (1 - wf) * budget * num_layers))
                  for g in gammas]
    else:
        alphas = [(1 - wf) * budget] * num_layers
    keeps = [top_lower(s, min(n - w, floor_b(a, n)), range(n - w)) + list(range(n - w, n))
             for s, a in zip(scores, alphas)]
    return keeps, gammas, alphas


@pytest.mark.parametrize("budget,kwargs,spans", [
    (0.3, {}, [(4, 40)]),
    (0.7, {}, [(4, 40)]),                          # a dense layer's alpha clips at 1
    (0.1, {"min_ratio": 0.06}, [(4, 40)]),         # the sparse layer's alpha clips at min_ratio
    (0.3, {"layer_adaptive": False, "sparsity_threshold": 0.05}, [(2, 20), (25, 40)]),
    (0.3, {}, []),                                 # no image: last 32 rows probe
    (0.3, {}, [(10, 60)]),                         # image at the end: last 32 rows probe
])
def test_vlcache_matches_reference(budget, kwargs, spans):
    n, num_layers = 60, 3
    mask = visual_mask(n, spans)
    policy = VLCache(budget=budget, **kwargs)
    peaks = [0.05, 2.0, 6.0]                        # near-uniform, medium, very peaked
    inputs = make_layers(n, num_layers, seed=2, peaks=peaks)
    state = policy.begin(prompt(n, num_layers, mask))
    assert all(policy.layer(state, inp) is None for inp in inputs)
    choices = policy.finish(state)
    keeps, gammas, alphas = ref_vlcache(inputs, mask.tolist(), budget,
                                        wf=policy.window_fraction, adaptive=policy.layer_adaptive,
                                        thr=policy.sparsity_threshold, lo=policy.min_ratio)
    got_gammas = [state.data["layers"][l][1] for l in range(num_layers)]
    assert got_gammas == pytest.approx(gammas, abs=1e-9)
    assert policy.layer_ratios(got_gammas) == pytest.approx(alphas, abs=1e-9)
    assert [choices[l].indices.tolist() for l in range(num_layers)] == keeps
    if budget == 0.7:
        assert alphas[0] == 1.0
    if "min_ratio" in kwargs:
        assert alphas[2] == 0.06


# ----------------------------------------------------------------------------- aircache


def ref_skew(x):
    n = len(x)
    if n < 3:
        return 0.0
    mu = sum(x) / n
    sd = math.sqrt(sum((v - mu) ** 2 for v in x) / (n - 1))
    return 0.0 if sd == 0 else n / ((n - 1) * (n - 2)) * sum(((v - mu) / sd) ** 3 for v in x)


def ref_aircache(inputs, mask, budget, alpha):
    n = len(mask)
    text = [j for j in range(n) if not mask[j]]
    visual = [j for j in range(n) if mask[j]]
    window = [j for j in text if j > visual[-1]] or text   # the text after the image
    imps, strengths, skews, elites = [], [], [], []
    for inp in inputs:
        att = [0.0] * n
        for h in range(H):
            for j, p in attn_row(inp, window[-1], h, window).items():
                att[j] += p / H
        top = max(att[j] for j in window)
        elite = [j for j in window if att[j] >= alpha * top]
        keys = sorted(visual + elite)
        imp = {v: 0.0 for v in visual}
        for i in elite:
            for h in range(H):
                for j, p in attn_row(inp, i, h, [t for t in keys if t <= i]).items():
                    if j in imp:
                        imp[j] += p / H / len(elite)
        x = [imp[v] for v in visual]
        imps.append(imp)
        strengths.append(sum(x))
        skews.append(ref_skew(x))
        elites.append(elite)
    ms = sum(strengths) / len(strengths)
    sk = [max(0.0, s) for s in skews]
    mk = sum(sk) / len(sk)
    raw = [0.5 * (s / ms + (k / mk if mk > 0 else 1.0)) * budget for s, k in zip(strengths, sk)]
    r = raw[:]
    for _ in range(2000):                           # clip to [0, 1], rescale to mean budget
        r = [min(1.0, max(0.0, v)) for v in r]
        r = [v * budget / (sum(r) / len(r)) for v in r]
    r = [min(1.0, v) for v in r]
    keeps = [sorted(text + top_lower(imp, floor_b(ratio, len(visual)), visual))
             for imp, ratio in zip(imps, r)]
    return keeps, r, strengths, skews, elites


@pytest.mark.parametrize("budget,alpha,seed", [(0.2, 0.9, 0), (0.5, 0.5, 1), (0.85, 0.3, 3)])
def test_aircache_matches_reference(budget, alpha, seed):
    n, num_layers = 60, 3
    mask = visual_mask(n, [(6, 44)])
    policy = AirCache(budget=budget, alpha=alpha)
    inputs = make_layers(n, num_layers, seed=seed, peaks=[0.3, 1.5, 3.0])
    state = policy.begin(prompt(n, num_layers, mask))
    assert all(policy.layer(state, inp) is None for inp in inputs)
    choices = policy.finish(state)
    keeps, ratios, strengths, skews, elites = ref_aircache(inputs, mask.tolist(), budget, alpha)
    got = [state.data["layers"][l] for l in range(num_layers)]
    assert [g[1] for g in got] == pytest.approx(strengths, rel=1e-4)
    assert [g[2] for g in got] == pytest.approx(skews, rel=1e-3, abs=1e-4)
    assert policy.layer_ratios([g[1] for g in got], [g[2] for g in got]) == \
        pytest.approx(ratios, abs=1e-6)
    assert sum(ratios) / num_layers == pytest.approx(budget)
    assert [choices[l].indices.tolist() for l in range(num_layers)] == keeps
    for choice in choices.values():
        assert bool(torch.isin(torch.nonzero(~mask).flatten(), choice.indices).all())
    if seed == 1:
        assert any(len(e) > 1 for e in elites)               # several elite rows
        assert all(e[0] >= 44 for e in elites)               # elite rows after the image
    if seed == 3:
        assert ratios.count(1.0) == 2                        # two layers clipped at 1
        assert min(skews) < 0                                # a negative skewness clipped at 0


def test_aircache_helpers():
    assert sample_skewness(torch.tensor([1.0, 2.0, 3.0, 10.0])) == pytest.approx(
        ref_skew([1.0, 2.0, 3.0, 10.0]))
    assert sample_skewness(torch.tensor([1.0, 2.0])) == 0.0
    assert sample_skewness(torch.tensor([2.0, 2.0, 2.0])) == 0.0
    assert clip_to_mean([3.0, 1.0, 0.0, 0.0], 0.5) == pytest.approx([1.0, 1.0, 0.0, 0.0])
    assert clip_to_mean([4.0, 1.0, 1.0, 0.0], 0.5) == pytest.approx([1.0, 0.5, 0.5, 0.0])
    # skewness clipped at 0 before the normalisation; zero mean -> that term is 1
    policy = AirCache(budget=0.2)
    assert policy.layer_ratios([1.0, 1.0], [-1.0, -2.0]) == pytest.approx([0.2, 0.2])
    assert policy.layer_ratios([1.0, 3.0], [-1.0, 2.0]) == pytest.approx(
        [0.5 * (0.5 + 0.0) * 0.2, 0.5 * (1.5 + 2.0) * 0.2])


def test_aircache_routes_through_scores_fn():
    calls = []

    def scores_fn(q, k, probe, scale):
        calls.append((q.shape[0], probe.numel()))
        return zipvl.probe_attention_scores(q, k, probe, scale)

    n, mask = 60, visual_mask(60, [(6, 44)])
    inputs = make_layers(n, 2, seed=4)
    plain = select_all_layers(AirCache(alpha=0.5), prompt(n, 2, mask), inputs)
    for inp in inputs:
        inp.scores_fn = scores_fn
    routed = select_all_layers(AirCache(alpha=0.5), prompt(n, 2, mask), inputs)
    assert len(calls) == 4 and calls[0] == (16, 1)          # the 16 text tokens after the image
    assert all(rows >= 38 for rows, _ in calls[1::2])       # visual ∪ elite keys
    assert [c.indices.tolist() for c in plain] == [c.indices.tolist() for c in routed]


def test_aircache_elite_rows_come_from_the_text_after_the_image():
    # A sink before the image that every row attends to would be the only elite row, and it
    # sees no visual key: every importance 0. The window keeps the elite rows after the image.
    n, mask = 60, visual_mask(60, [(6, 44)])
    inputs = make_layers(n, 2, seed=5)
    for inp in inputs:
        inp.key[2] = 0
        inp.key[2, :, 0] = 40.0           # key 2 (system text) dominates every row
        inp.query[:, :, 0] = 1.0
    policy = AirCache(budget=0.1)
    state = policy.begin(prompt(n, 2, mask))
    for inp in inputs:
        policy.layer(state, inp)
    assert policy.query_rows(state.prompt).tolist() == list(range(44, 60))
    for importance, strength, _ in state.data["layers"].values():
        assert strength > 0 and bool((importance > 0).all())
    assert observation_window(torch.tensor([False] * 4 + [True] * 4)).tolist() == [0, 1, 2, 3]


def test_aircache_no_image_keeps_all():
    choices, _ = run(AirCache(), 40, 2, None)
    assert all(c.indices.tolist() == list(range(40)) for c in choices)


# ----------------------------------------------------------------------------- random


def test_random_seed():
    n = 80
    a, _ = run(Random(budget=0.25, seed=1), n, 2)
    b, _ = run(Random(budget=0.25, seed=1), n, 2, seed=9)       # other q/k: same draw
    c, _ = run(Random(budget=0.25, seed=2), n, 2)
    assert [x.indices.tolist() for x in a] == [x.indices.tolist() for x in b]
    assert a[0].indices.tolist() != c[0].indices.tolist()
    assert a[0].indices.tolist() != a[1].indices.tolist()       # layers draw separately
    assert all(len(x.indices) == 20 for x in a + c)
    kept = a[0].priority[a[0].indices].min()
    dropped = a[0].priority[[j for j in range(n) if j not in set(a[0].indices.tolist())]]
    assert bool((dropped <= kept).all())
    mask = visual_mask(n, [(10, 70)])
    v, _ = run(Random(budget=0.25, scope="visual"), n, 2, mask)
    for x in v:
        assert int(mask[x.indices].sum()) == 15 and int((~mask)[x.indices].sum()) == 20


# ----------------------------------------------------------------------------- registry


BAD_VALUE = {"zipvl": ("tau", 1.5), "fastv": ("k", 0), "snapkv": ("window", -3),
             "pyramidkv": ("beta", 0), "streamingllm": ("sinks", -1),
             "vlcache": ("sparsity_threshold", 0.0), "aircache": ("alpha", 2),
             "random": ("scope", "text")}


def test_registry_order_and_rows():
    assert METHOD_NAMES == ("zipvl", "fastv", "snapkv", "pyramidkv", "streamingllm", "vlcache",
                            "aircache", "random")
    assert set(BAD_VALUE) == set(POLICIES)
    assert POLICIES["zipvl"] is ZipVL and isinstance(make_policy("random"), Random)
    assert [n for n in METHOD_NAMES if POLICIES[n].sparse_prefill] == ["zipvl", "fastv"]
    assert [n for n in METHOD_NAMES if POLICIES[n].deferred] == ["vlcache", "aircache"]
    assert [n for n in METHOD_NAMES if POLICIES[n].visual_only] == ["fastv", "aircache"]
    with pytest.raises(PolicyError, match="unknown KV-sparsity method 'h2o'"):
        make_policy("h2o", {})


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method(name):
    n, num_layers = 64, 4
    mask = visual_mask(n, [(5, 50)])
    policy = make_policy(name, {"window": 8} if "window" in POLICIES[name].option_keys() else {})
    choices, _ = run(policy, n, num_layers, mask)
    assert len(choices) == num_layers
    for c in choices:
        idx = c.indices.tolist()
        assert c.indices.dtype == torch.long and c.indices.device.type == "cpu"
        assert idx == sorted(set(idx)) and 0 < len(idx) <= n and 0 <= idx[0] and idx[-1] < n
        assert c.priority.shape == (n,) and c.priority.dtype == torch.float32
        assert torch.isfinite(c.priority).all()
    if name != "zipvl":
        assert any(len(c.indices) < n for c in choices)
        full, _ = run(make_policy(name, {"budget": 1.0}), n, num_layers, mask)
        assert all(c.indices.tolist() == list(range(n)) for c in full)
    # options: unknown keys and bad values, one line naming the method
    with pytest.raises(PolicyError) as err:
        make_policy(name, {"budgett": 0.3})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{name}: unknown option 'budgett'; valid keys are")
    for key in POLICIES[name].option_keys():
        assert key in msg
    key, value = BAD_VALUE[name]
    with pytest.raises(PolicyError) as err:
        make_policy(name, {key: value})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{name}: {key}={value!r} is invalid; valid values")
    if name != "zipvl":
        for bad in (0.0, 1.5, True, "0.2", float("nan")):
            with pytest.raises(PolicyError, match=f"^{name}: budget="):
                make_policy(name, {"budget": bad})


def test_error_message_example():
    with pytest.raises(PolicyError) as err:
        SnapKV(budget=0.2, window=-3)
    assert str(err.value) == "snapkv: window=-3 is invalid; valid values are integers >= 1"
    with pytest.raises(PolicyError, match="^snapkv: kernel=4 is invalid; valid values are odd"):
        SnapKV(kernel=4)
    with pytest.raises(PolicyError, match="^snapkv: pooling='mean' is invalid; valid values "
                                          "are 'avg', 'max'$"):
        SnapKV(pooling="mean")


def test_no_vllm_import():
    code = ("import sys, vllm_kvsparse.policies; "
            "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("n,spans", [(96, [(10, 70)]), (40, [(0, 30)]), (50, [])])
def test_query_rows_are_all_a_method_reads(name, n, spans):
    """Chunked prefill keeps only `query_rows` of the earlier chunks: the decisions must be
    the same when every other query row is replaced by garbage (here: huge random values)."""
    num_layers = 4
    mask = visual_mask(n, spans) if spans else None
    options = {"window": 8} if "window" in POLICIES[name].option_keys() else {}
    if name == "zipvl":
        options.update(num_recent_probes=8, num_random_probes=8)
    else:
        options["budget"] = 0.3
    policy = make_policy(name, options)
    info = prompt(n, num_layers, mask)
    rows = policy.query_rows(info)
    assert rows.dtype == torch.long and rows.device.type == "cpu"
    assert rows.tolist() == sorted(set(rows.tolist())) and all(0 <= r < n for r in rows.tolist())
    if name in ("zipvl", "snapkv", "pyramidkv", "fastv"):
        assert 0 < rows.numel() < n        # a real saving for the probe-row methods
    inputs = make_layers(n, num_layers, seed=3)
    garbage = []
    gen = torch.Generator().manual_seed(9)
    for inp in inputs:
        q = torch.randn(inp.query.shape, generator=gen) * 1e3
        q[rows] = inp.query[rows]
        garbage.append(LayerInput(inp.layer_idx, q, inp.key, inp.scale))
    want = select_all_layers(policy, info, inputs)
    got = select_all_layers(policy, prompt(n, num_layers, mask), garbage)
    for a, b in zip(want, got):
        assert a.indices.tolist() == b.indices.tolist()
        assert torch.equal(a.priority, b.priority)
