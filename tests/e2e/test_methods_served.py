"""Every `--kv-sparsity` method end to end on real vLLM: served from the command line with an
image request answered, real KV blocks freed exactly as the kept sets imply, metrics labelled by
method; `budget: 1.0` (keep everything) token-identical to `--kv-sparsity none`."""

import json
import time
from contextlib import ExitStack

import pytest
from helpers import VllmServer, chat_image, make_image, run_offline
from test_metrics import scrape, value

from vllm_kvsparse import eviction
from vllm_kvsparse.bench.server import start_all
from vllm_kvsparse.policies import METHOD_NAMES
from vllm_kvsparse.records import read_records

pytestmark = pytest.mark.e2e

BLOCK = 32            # the eviction block size (the plugin's default with eviction)
# Parameters per method that make the tiny model's prompts (~270 tokens per image) drop tokens.
LOW = {"zipvl": {"tau": 0.8}, "fastv": {"k": 1, "budget": 0.3}}
KEEP_ALL = {"zipvl": {"tau": 1.0}}    # every other method: {"budget": 1.0}
NON_ZIPVL = [m for m in METHOD_NAMES if m != "zipvl"]   # zipvl: test_sparse_prefill.py


def blocks_freed_by(record: dict) -> int:
    """Blocks one (request, layer) gives back: the full prompt blocks minus those holding its
    kept tokens before the prompt's last partial block (topped up to whole blocks)."""
    full = eviction.full_prompt_blocks(record["num_tokens"], BLOCK)
    front = sum(1 for p in record["kept"] if p < full * BLOCK)
    assert front % BLOCK == 0, "kept tokens before the tail fill whole blocks"
    return full - front // BLOCK


def _serve_args(method: str, rec) -> list[str]:
    options = {"min_prompt_len": 0, "record_dir": str(rec), **LOW.get(method, {"budget": 0.3})}
    return ["--kv-sparsity", method, "--kv-sparsity-config", json.dumps(options)]


def _exercise(srv, method: str) -> dict:
    """Two image requests, then the server's metrics and log."""
    client = srv.client()
    answers = [chat_image(client, make_image(seed=seed), max_tokens=8) for seed in (1, 2)]
    time.sleep(1.0)   # let the last step's stats land
    return {"answers": answers, "samples": scrape(srv.url),
            "model": client.models.list().data[0].id, "log": srv.log()}


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """Every method's server exercised, 3 servers started at once (a start is mostly each
    engine's own profiling and warm-up, which overlap): method -> results and record dir."""
    out = {}
    for i in range(0, len(METHOD_NAMES), 3):
        batch = {m: tmp_path_factory.mktemp(m) for m in METHOD_NAMES[i:i + 3]}
        with ExitStack() as stack:
            servers = start_all(stack, {m: VllmServer(tiny_model, _serve_args(m, d / "records"),
                                                      d / "srv") for m, d in batch.items()})
            for m, srv in servers.items():
                out[m] = {**_exercise(srv, m), "records": batch[m] / "records"}
    return out


@pytest.mark.parametrize("method", METHOD_NAMES)   # zipvl's served metrics: test_metrics.py too
def test_method_served_frees_the_blocks_its_kept_sets_imply(method, served):
    res = served[method]
    for answer in res["answers"]:
        # random weights: the 8 tokens may detokenize to nothing; that they came is the point
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 8
    assert "vllm-kvsparse: kv-sparsity=" + method in res["log"]
    samples, model = res["samples"], res["model"]
    records = read_records(str(res["records"]))
    assert {r["method"] for r in records} == {method}
    assert len({(r["req_id"], r["layer"]) for r in records}) == 2 * 2   # 2 requests x 2 layers
    labels = {"model_name": model, "method": method}
    freed = value(samples, "kvsparse_kv_blocks_freed_total", **labels)
    assert freed > 0 and freed == sum(blocks_freed_by(r) for r in records)
    kept = value(samples, "kvsparse_prompt_tokens_kept_total", **labels)
    assert kept == sum(r["num_kept"] for r in records)
    if method in ("fastv", "aircache"):   # only visual tokens may go
        for r in records:
            visual = {p for s, e in r["visual_ranges"] for p in range(s, e)}
            assert set(range(r["num_tokens"])) - set(r["kept"]) <= visual


PROMPTS = [{"image": {"seed": 1}}, {"image": [{"seed": 2}, {"seed": 3, "size": [224, 336]}]},
           {"tokens": 700, "seed": 0}]


@pytest.fixture(scope="module")
def dense_outputs(tiny_model, tmp_path_factory):
    return run_offline({"model": tiny_model, "prompts": PROMPTS, "max_tokens": 24,
                        "engine": {"block_size": BLOCK},
                        "additional_config": {"kv_sparsity": "none"}},
                       tmp_path_factory.mktemp("none"))["outputs"]


@pytest.mark.parametrize("method", NON_ZIPVL)
def test_budget_one_is_token_identical_to_none(method, tiny_model, dense_outputs, tmp_path):
    rec = tmp_path / "records"
    options = {"min_prompt_len": 0, "record_dir": str(rec), **KEEP_ALL.get(method,
                                                                         {"budget": 1.0})}
    out = run_offline({"model": tiny_model, "prompts": PROMPTS, "max_tokens": 24,
                       "additional_config": {"kv_sparsity": method,
                                             "kv_sparsity_config": options}}, tmp_path)
    assert out["outputs"] == dense_outputs
    records = read_records(str(rec))
    assert len(records) == len(PROMPTS) * 2 and all(
        r["num_kept"] == r["num_tokens"] for r in records)   # the method really ran, kept all
