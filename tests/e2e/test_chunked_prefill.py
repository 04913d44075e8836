"""Chunked prefill with every kind of method, on a real vLLM engine (CPU).

A long image prompt prefilled chunk by chunk (--max-num-batched-tokens below the prompt
length, chunked prefill on: vLLM's defaults are kept) must select what the same prompt
prefilled in one step selects: the earlier chunks keep only the method's query rows, and the
step that completes the prompt reads their K/V back from vLLM's ISA-packed CPU cache
(attention/cache_read.py). Methods with a dense prefill (snapkv, vlcache) see the same hidden
states either way, so every layer's kept set must match; so must FastV's (decided once at layer
k-1, before any sparse attention). ZipVL's one-step prefill is sparse in
every layer (dropped rows get zero attention output), while its chunked prefill computed the
earlier chunks dense: from layer 1 on the keys differ, so only layer 0 (whose keys are the
embeddings') must match; later layers are compared by overlap (>= 60%; 78% seen).
"""

from __future__ import annotations

import pytest

from helpers import run_offline_all
from vllm_kvsparse.records import read_records

# one 672x672 image (576 visual tokens) plus text: ~600 prompt tokens, 3 chunks of 256
PROMPTS = [{"image": {"size": [672, 672], "seed": 3}, "question": "What colour is the square?"},
           {"image": {"size": [560, 560], "seed": 4}, "question": "Where is the square?"}]
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 256}
ONE_STEP = {"enable_chunked_prefill": False, "max_num_batched_tokens": 2048}


def kept_sets(rec_dir):
    """{(prompt length, layer): kept positions} (prompt lengths are distinct here)."""
    return {(r["num_tokens"], r["layer"]): r["kept"] for r in read_records(str(rec_dir))}


def run(model, method, options, engines: dict, tmp_path):
    """The same prompts through one engine per scheduler setting, all at once: name ->
    (outputs, kept sets)."""
    def spec(engine, rec):
        return {"model": model, "prompts": PROMPTS, "max_tokens": 4, "engine": engine,
                "additional_config": {"kv_sparsity": method, "kv_sparsity_config": {
                    "min_prompt_len": 128, "record_dir": str(rec), **options}}}
    outs = run_offline_all({name: (spec(engine, tmp_path / name / "rec"), tmp_path / name)
                            for name, engine in engines.items()})
    return {name: (out, kept_sets(tmp_path / name / "rec")) for name, out in outs.items()}


@pytest.mark.parametrize("method,options", [
    ("zipvl", {"tau": 0.9}),
    ("fastv", {"k": 1, "budget": 0.3}),
    ("snapkv", {"budget": 0.2}),
    ("vlcache", {"budget": 0.2}),
])
def test_chunked_prefill_selects_as_one_step(peaked_model, tmp_path, method, options):
    runs = run(peaked_model, method, options, {"one": ONE_STEP, "chunked": CHUNKED}, tmp_path)
    (one_out, one), (chunked_out, chunked) = runs["one"], runs["chunked"]
    lens = sorted({n for n, _ in one})
    assert chunked_out["scheduler"] == {"enable_chunked_prefill": True,     # kept as asked
                                        "max_num_batched_tokens": 256}
    assert len(lens) == 2 and min(lens) > 256          # both prompts really were chunked
    assert set(chunked) == set(one)
    compared = one if method != "zipvl" else {key: v for key, v in one.items() if key[1] == 0}
    for key in compared:
        assert chunked[key] == one[key], f"{method}: prompt length/layer {key} differs"
    assert any(len(v) < key[0] for key, v in one.items())   # something was dropped
    if method == "zipvl":
        for key in one:
            a, b = set(one[key]), set(chunked[key])
            assert len(a & b) >= 0.6 * min(len(a), len(b)), key
    elif method != "fastv":   # dense prefill: the same hidden states, the same tokens
        assert chunked_out["outputs"] == one_out["outputs"]
