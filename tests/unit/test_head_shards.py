"""Tensor parallelism for the policies: each shard (rank) sees H/TP query heads and selects
with scores all-reduced over the shards (policies.HeadShards). Simulated here with one thread
per shard and an all-reduce that sums the shards' tensors in rank order (as vLLM's CPU shared-
memory all-reduce does), so every shard gets bit-identical sums.

Checked for every method: all shards choose the same kept set in every layer, and it is the set
one device holding all heads chooses (the head mean is then a mean of per-shard means: equal up
to float rounding; these inputs have no token at a rounding boundary, asserted exactly)."""

import threading

import pytest
import torch

from vllm_kvsparse.policies import (METHOD_NAMES, HeadShards, LayerInput, PromptInfo,
                                    make_policy, select_all_layers)

H, HKV, D, N, LAYERS = 4, 2, 16, 160, 3
SPANS = [(10, 120)]  # one image's placeholder tokens

OPTIONS = {  # budgets that compress these prompts, so a wrong reduction changes the sets
    "zipvl": {"tau": 0.9, "num_recent_probes": 16, "num_random_probes": 16},
    "fastv": {"k": 1, "budget": 0.3},
    "snapkv": {"budget": 0.3, "window": 8},
    "pyramidkv": {"budget": 0.3, "window": 8, "beta": 4},
    "streamingllm": {"budget": 0.3},
    "vlcache": {"budget": 0.3},
    "aircache": {"budget": 0.3, "alpha": 0.5},
    "random": {"budget": 0.3},
}


class ThreadAllReduce:
    """All-reduce (sum) among `size` threads: every caller gets the same rank-ordered sum."""

    def __init__(self, size: int):
        self.size = size
        self.slots: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size, timeout=30)
        self.calls = [0] * size

    def for_rank(self, rank: int):
        def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = x.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()   # nobody overwrites a slot before everyone has summed
            return total
        return all_reduce_sum


def layer_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [LayerInput(layer, torch.randn(N, H, D, generator=gen) * (2.0 + layer),
                       torch.randn(N, HKV, D, generator=gen), D ** -0.5)
            for layer in range(LAYERS)]


def visual():
    mask = torch.zeros(N, dtype=torch.bool)
    for a, b in SPANS:
        mask[a:b] = True
    return mask


def shard(inp: LayerInput, rank: int, size: int, shards: HeadShards) -> LayerInput:
    """Rank `rank`'s view, as vLLM's TP splits a layer: query heads in contiguous blocks; KV
    heads split the same way, or replicated when there are fewer KV heads than ranks."""
    q_per = H // size
    query = inp.query[:, rank * q_per:(rank + 1) * q_per]
    if HKV >= size:
        kv_per = HKV // size
        key = inp.key[:, rank * kv_per:(rank + 1) * kv_per]
    else:   # each rank holds the one KV head its query heads read
        kv = rank * q_per // (H // HKV)
        key = inp.key[:, kv:kv + 1]
    return LayerInput(inp.layer_idx, query, key, inp.scale, shards=shards)


def run_sharded(policy, inputs, size: int):
    reducer = ThreadAllReduce(size)
    results: list = [None] * size
    errors: list = []

    def worker(rank):
        try:
            shards = HeadShards(size, reducer.for_rank(rank))
            views = [shard(inp, rank, size, shards) for inp in inputs]
            prompt = PromptInfo(N, visual(), LAYERS, H // size, views[0].key.shape[1])
            results[rank] = select_all_layers(policy, prompt, views)
        except BaseException as e:   # surface a shard's failure (and free the others)
            errors.append(e)
            reducer.barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, reducer.calls


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_shards_select_what_one_device_selects(name, size):
    policy = make_policy(name, OPTIONS[name])
    inputs = layer_inputs()
    whole = select_all_layers(policy, PromptInfo(N, visual(), LAYERS, H, HKV), inputs)
    per_rank, calls = run_sharded(policy, inputs, size)
    assert len(set(calls)) == 1, f"ranks made different numbers of all-reduce calls: {calls}"
    compressed = sum(c.indices.numel() < N for c in whole)
    assert compressed, f"{name}: nothing compressed, the check would be vacuous"
    for layer in range(LAYERS):
        sets = [per_rank[r][layer].indices.tolist() for r in range(size)]
        assert all(s == sets[0] for s in sets), f"{name} layer {layer}: ranks disagree"
        assert sets[0] == whole[layer].indices.tolist(), f"{name} layer {layer}: != one device"


def test_scoring_methods_reduce_once_per_scored_layer():
    """Communication: one all-reduce of an n-vector per scored layer (fastv: its one scoring
    layer; aircache: two, elite rows then importance); none for score-free methods."""
    inputs = layer_inputs()
    expect = {"zipvl": LAYERS, "snapkv": LAYERS, "pyramidkv": LAYERS, "vlcache": LAYERS,
              "fastv": 1, "aircache": 2 * LAYERS, "streamingllm": 0, "random": 0}
    for name, count in expect.items():
        _, calls = run_sharded(make_policy(name, OPTIONS[name]), inputs, 2)
        assert calls == [count, count], f"{name}: {calls}"
