"""vLLM 0.32 CPU crash on a seeded request whose prompt is prefilled in chunks, and the plugin's
workaround (vllm_kvsparse/chunked_seed.py, which has the root cause with vLLM file:line).

Every server chunks prompts at 512 tokens (`--max-num-batched-tokens 512`, chunked prefill on:
vLLM's default) and keeps prefix caching on (vLLM's default with `--kv-sparsity none`), with
the CPU default block size 128. The prompts are 1025..1152 tokens: a fresh one is prefilled in
three steps (512 + 512 + the rest), the first two of which sample a token vLLM discards; sent
again, the prefix cache covers exactly the first two chunks (1024 tokens, 8 whole blocks), so
the same last chunk runs alone in one step that keeps its token: the same logits, and a
sampling path with no discarded step. The seeded output of that repeat is the reference for
"same output as when the prompt is not chunked".

- stock vLLM, no plugin loaded: greedy requests and the one-step repeat work; a fresh seeded
  sampled chunked prompt kills the engine with `CPU Generator does not use offset`. When vLLM
  fixes this, test_stock_vllm_still_crashes fails and says to remove the workaround.
- with the plugin, two worker routes, one server each:
  `none`: `--kv-sparsity none` (the plugin merely installed): the platform sets
          `cpu_worker.ChunkedSeedCPUWorker` (vLLM's CPUWorker plus the workaround);
  `snapkv`: `--kv-sparsity snapkv` with min_prompt_len above these prompts, so they run
          dense and still read/publish the prefix cache: the worker every sparsity method runs
          (KVSparseCPUWorker: KVSparseWorkerMixin over the workaround over vLLM's CPUWorker).
          A seeded chunked prompt that a method does compact: tests/e2e/test_prefix_caching.py.
  The crashing request succeeds, its tokens equal the one-step repeat's (and stock vLLM's
  one-step output), the server keeps answering, and a second seed gives other tokens.
"""

from __future__ import annotations

import random
import time
from contextlib import ExitStack

import pytest
import requests
from helpers import VllmServer

from vllm_kvsparse.bench.server import start_all
from vllm_kvsparse.tiny_model import WORDS

pytestmark = pytest.mark.e2e

CHUNK = 512
ARGS = ["--max-num-batched-tokens", str(CHUNK)]
ROUTES = {
    "none": ["--kv-sparsity", "none"],
    # a real method, on prompts below its min_prompt_len (dense, so the prefix-cache reference
    # below works); block size 128 as the others (eviction would pick 32)
    "snapkv": ["--kv-sparsity", "snapkv", "--kv-sparsity-config", '{"min_prompt_len": 4096}',
               "--block-size", "128"],
}
CRASH = "RuntimeError: CPU Generator does not use offset"
SAMPLED = {"temperature": 0.8, "seed": 0}
MAX_TOKENS = 12


def prompt(tag: str) -> str:
    """~1,080 tokens of the tiny tokenizer's words; `tag` makes the prefix (and cache) unique."""
    rng = random.Random(tag)
    return tag + " " + " ".join(rng.choice(WORDS) for _ in range(1000))


def chat(url: str, text: str, **sampling) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": text}],
        "max_tokens": MAX_TOKENS, "ignore_eos": True, "return_token_ids": True, **sampling})


def tokens(resp: requests.Response) -> list[int]:
    assert resp.status_code == 200, resp.text[:2000]
    body = resp.json()
    n = body["usage"]["prompt_tokens"]
    # 2 chunks + the rest, and a prefix-cache hit of exactly those 2 chunks (see the docstring)
    assert 2 * CHUNK < n <= 2 * CHUNK + 128, f"prompt has {n} tokens; adjust prompt()"
    ids = body["choices"][0]["token_ids"]
    assert len(ids) == MAX_TOKENS
    return ids


def serve(tiny_model, workdir, args, plugins):
    return VllmServer(tiny_model, [*ARGS, "--served-model-name", "tiny", *args], workdir,
                      plugins=plugins)


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    """Stock vLLM (no plugin) and the plugin on every route, all started at once."""
    specs = {"stock": serve(tiny_model, tmp_path_factory.mktemp("stock"), [], plugins=False)}
    specs.update({route: serve(tiny_model, tmp_path_factory.mktemp(route), args, plugins=True)
                  for route, args in ROUTES.items()})
    with ExitStack() as stack:
        yield start_all(stack, specs)


@pytest.fixture(scope="module")
def stock(servers):
    """Stock vLLM: what works, the one-step reference, then the crashing request."""
    out = {}
    srv = servers["stock"]
    text = prompt("reference")
    out["greedy"] = tokens(chat(srv.url, text, temperature=0, seed=0))   # fills the cache
    out["one_step"] = tokens(chat(srv.url, text, **SAMPLED))            # prefix-cache hit
    try:
        out["crashing"] = chat(srv.url, prompt("fresh"), **SAMPLED)
    except requests.RequestException as e:
        out["crashing"] = e
    time.sleep(2)
    try:
        out["health"] = requests.get(srv.url + "/health", timeout=10).status_code
    except requests.RequestException as e:
        out["health"] = repr(e)
    out["log"] = srv.log()
    return out


@pytest.fixture(scope="module", params=list(ROUTES))
def plugin(request, servers):
    return servers[request.param]


def test_stock_vllm_still_crashes(stock):
    """The bug is vLLM's: stock vLLM 0.32 (no plugin) dies on a fresh seeded chunked prompt."""
    crashing = stock["crashing"]
    if isinstance(crashing, requests.Response) and crashing.status_code == 200:
        pytest.fail("stock vLLM no longer crashes on a seeded request with a chunked prompt: "
                    "the vLLM bug is fixed; remove the workaround (vllm_kvsparse/chunked_seed.py, "
                    "ChunkedSeedCPUWorker and platform_cpu.none_worker_cls) and this test")
    assert CRASH in stock["log"], "stock vLLM failed, but not with the known error:\n" + \
        stock["log"][-4000:]
    assert not isinstance(crashing, requests.Response) or crashing.status_code >= 500
    assert stock["health"] != 200, "the engine died, yet /health answers 200"


def test_stock_vllm_greedy_and_one_step_seeded_work(stock):
    """Greedy requests (seed or not) have no generator; a one-step prefill discards nothing."""
    assert len(stock["greedy"]) == len(stock["one_step"]) == MAX_TOKENS


def test_plugin_serves_seeded_chunked_prompts_reproducibly(plugin, stock):
    text = prompt("reference")
    chunked = tokens(chat(plugin.url, text, **SAMPLED))      # fresh: 3 steps, 2 discarded
    one_step = tokens(chat(plugin.url, text, **SAMPLED))     # prefix-cache hit: 1 step
    assert chunked == one_step, "the discarded chunks moved the request's generator"
    assert chunked == stock["one_step"], "not stock vLLM's one-step output for this seed"
    # the server stays up and keeps serving: greedy, another seed, a fresh chunked prompt again
    assert tokens(chat(plugin.url, text, temperature=0, seed=0)) == stock["greedy"]
    other_seed = tokens(chat(plugin.url, prompt("other"), temperature=0.8, seed=1))
    same_prompt_seed0 = tokens(chat(plugin.url, prompt("other"), **SAMPLED))
    assert other_seed != same_prompt_seed0, "the seed made no difference"
    assert requests.get(plugin.url + "/health", timeout=10).status_code == 200
    log = plugin.log()
    assert CRASH not in log
    assert "seeded request in a partial prefill step" in log, "the workaround did not run"
