"""Prefix caching stays on with eviction (vLLM's default), on a real `vllm serve` (CPU).

The plugin's scheduler keeps every prompt the method selects on (>= min_prompt_len) out of the
prefix cache: it reads no cached block (selection scores all of its keys; compaction rewrites
its blocks in place) and publishes none (KVSparseManager.cache_blocks), so no request is ever
served a block that compaction rewrote or freed. Shorter prompts read and publish as in stock
vLLM. Checked against a cold server (same flags, --no-enable-prefix-caching), with chunked
prefill on (--max-num-batched-tokens below the image prompts' length).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
import requests
from helpers import VllmServer, chat_image, image_data_url, make_image
from test_metrics import scrape, value

from vllm_kvsparse.bench.server import start_all

pytestmark = pytest.mark.e2e

ARGS = ["--kv-sparsity", "zipvl", "--kv-sparsity-config",
        json.dumps({"tau": 0.8, "min_prompt_len": 200}), "--max-num-batched-tokens", "128"]
SHORT = "Describe a red square on a grey background in a few words. " * 4   # < 200 tokens


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    """(prefix caching on: vLLM's default, prefix caching off: the cold reference)."""
    work = tmp_path_factory.mktemp("prefix")
    with ExitStack() as stack:   # both started at once
        servers = start_all(stack, {
            "cached": VllmServer(tiny_model, ARGS, work / "cached"),
            "cold": VllmServer(tiny_model, [*ARGS, "--no-enable-prefix-caching"], work / "cold")})
        yield servers["cached"], servers["cold"]


def ask_image(srv, img, question, max_tokens=8):
    reply = chat_image(srv.client(), img, question, max_tokens=max_tokens)
    return reply.choices[0].message.content, reply.usage.prompt_tokens


def ask_text(srv, prompt, max_tokens=8):
    client = srv.client()
    reply = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                      max_tokens=max_tokens, temperature=0)
    return reply.choices[0].text, reply.usage.prompt_tokens


def hits(srv) -> float:
    return value(scrape(srv.url), "vllm:prefix_cache_hits_total")


def test_compacted_prompts_are_never_served_from_the_prefix_cache(servers):
    cached, cold = servers
    img = make_image(seed=11)
    before = scrape(cached.url)
    first, n = ask_image(cached, img, "What is in this image?")
    again, _ = ask_image(cached, img, "What is in this image?")          # the same prompt
    shared, _ = ask_image(cached, img, "Which colour is the square?")    # a long shared prefix
    after = scrape(cached.url)
    assert n > 256                                                       # chunked (> 128)
    assert first == again == ask_image(cold, img, "What is in this image?")[0]
    assert shared == ask_image(cold, img, "Which colour is the square?")[0]
    assert value(after, "vllm:prefix_cache_hits_total") == \
        value(before, "vllm:prefix_cache_hits_total")
    assert value(after, "kvsparse_kv_blocks_freed_total") > \
        value(before, "kvsparse_kv_blocks_freed_total")                  # really compacted


def test_short_prompts_still_hit_the_prefix_cache(servers):
    cached, cold = servers
    before = hits(cached)
    first, n = ask_text(cached, SHORT)
    again, _ = ask_text(cached, SHORT)
    assert n < 200 and first == again == ask_text(cold, SHORT)[0]
    assert hits(cached) - before >= 32 * (n // 32 - 1)   # the second read its full blocks


def test_no_leak_after_200_mixed_requests(servers):
    cached, _ = servers
    images = [make_image(seed=s) for s in range(3)]

    def one(i):
        if i % 3 == 0:
            return ask_image(cached, images[i % 2], "What is in this image?", max_tokens=2)
        if i % 3 == 1:
            return ask_image(cached, images[2], f"Question {i}: where is it?", max_tokens=2)
        return ask_text(cached, SHORT + f" Variant {i % 4}.", max_tokens=2)

    before = scrape(cached.url)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(200)))
    after = scrape(cached.url)
    assert len(answers) == 200 and all(n > 0 for _, n in answers)
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0                  # every block back
    assert value(after, "vllm:prefix_cache_hits_total") > \
        value(before, "vllm:prefix_cache_hits_total")                    # short ones hit
    assert value(after, "kvsparse_kv_blocks_freed_total") > \
        value(before, "kvsparse_kv_blocks_freed_total")


def test_seeded_sampled_chunked_prompt_is_compacted_and_reproducible(servers):
    """vLLM 0.32's CPU crash on seeded chunked prompts (chunked_seed.py) with a prompt the
    method compacts: answered, twice the same tokens (neither run reads the prefix cache)."""
    cached, _ = servers
    client = cached.client()
    model = client.models.list().data[0].id
    img = make_image(seed=21)
    before = scrape(cached.url)

    def sampled():
        return client.chat.completions.create(
            model=model, max_tokens=8, temperature=0.8, seed=3,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(img)}},
                {"type": "text", "text": "Tell me a story about it."}]}]).choices[0].message.content

    assert sampled() == sampled()
    assert value(scrape(cached.url), "kvsparse_kv_blocks_freed_total") > \
        value(before, "kvsparse_kv_blocks_freed_total")
    assert requests.get(cached.url + "/health", timeout=10).status_code == 200
