"""ZipVL token-sparse prefill inside vLLM (`--kv-sparsity zipvl`). Real vLLM on CPU, tiny models."""

import concurrent.futures as cf
import math
from contextlib import ExitStack

import pytest
import torch
from helpers import VllmServer, chat_image, make_image, run_offline, run_offline_all

from vllm_kvsparse import zipvl
from vllm_kvsparse.bench.server import start_all
from vllm_kvsparse.records import read_records

pytestmark = pytest.mark.e2e

TEXT = "<|im_start|>user\nDescribe a red car on the left.<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [{"image": {"seed": 1}}, {"image": [{"seed": 2}, {"seed": 3, "size": [224, 336]}]},
           {"tokens": 700, "seed": 0}, {"text": TEXT}]


def zipvl_config(**options):
    return {"kv_sparsity": "zipvl", "kv_sparsity_config": {"min_prompt_len": 0, **options}}


def test_tau_one_offline_is_identical_to_none(tiny_model, tmp_path):
    rec = tmp_path / "records"
    runs = run_offline_all({
        "none": ({"model": tiny_model, "prompts": PROMPTS,
                  "additional_config": {"kv_sparsity": "none"}}, tmp_path / "none"),
        "keep_all": ({"model": tiny_model, "prompts": PROMPTS,
                      "additional_config": zipvl_config(tau=1.0, record_dir=str(rec))},
                     tmp_path / "zipvl")})
    assert runs["keep_all"]["outputs"] == runs["none"]["outputs"]
    records = read_records(str(rec))
    # the sparse path really ran: every layer of every prompt selected, and kept everything
    assert len({(r["req_id"], r["layer"]) for r in records}) == len(PROMPTS) * 2
    assert all(r["num_kept"] == r["num_tokens"] for r in records)


# vLLM 0.32's CPU attention refuses FP8 caches without AVX-512 or AMX (cpu_attn.py); the CI
# machine may be either CPU kind (an AMD EPYC without AVX-512, or a Xeon with AMX).
CPU_HAS_FP8_KV = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_supported()


@pytest.mark.skipif(not CPU_HAS_FP8_KV,
                    reason="this CPU has neither AVX-512 nor AMX: vLLM's CPU backend has no FP8 "
                           "KV cache here")
@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2"])
def test_tau_one_with_fp8_kv_cache_is_identical_to_none(tiny_model, tmp_path, cache_dtype):
    """CPU serves quantized KV caches with sparsity on (CUDA refuses them at start-up), with
    chunked prefill off (refused with it: the cache holds no plain K/V to read back)."""
    spec = {"model": tiny_model, "prompts": PROMPTS[:3], "max_tokens": 24,
            "engine": {"kv_cache_dtype": cache_dtype, "enable_chunked_prefill": False,
                       "max_num_batched_tokens": 2048}}
    rec = tmp_path / "records"
    runs = run_offline_all({
        "none": ({**spec, "additional_config": {"kv_sparsity": "none"}}, tmp_path / "n"),
        "keep_all": ({**spec, "additional_config": zipvl_config(tau=1.0, record_dir=str(rec))},
                     tmp_path / "z")})
    assert runs["keep_all"]["outputs"] == runs["none"]["outputs"]
    assert len(read_records(str(rec))) == 3 * 2     # the sparse path ran in every layer


def test_tau_one_served_is_identical_to_none(tiny_model, tmp_path):
    images = [make_image(seed=s) for s in (11, 12)]
    modes = {"none": ["--kv-sparsity", "none"],
             "zipvl": ["--kv-sparsity", "zipvl", "--kv-sparsity-config",
                       '{"tau": 1.0, "min_prompt_len": 0}']}
    with ExitStack() as stack:   # both servers started at once
        servers = start_all(stack, {mode: VllmServer(tiny_model, args, tmp_path / mode)
                                    for mode, args in modes.items()})
        answers = {mode: [chat_image(srv.client(), img, max_tokens=24).choices[0].message
                          .content for img in images] for mode, srv in servers.items()}
    assert answers["zipvl"] == answers["none"]


def reference_sparse_attention(q, k, v, kept, scale):
    """Independent fp32 reference: causal attention over the kept set only, zeros elsewhere."""
    n, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    out = torch.zeros(n, num_heads, v.shape[-1])
    kk = k.float().repeat_interleave(group, 1)
    vv = v.float().repeat_interleave(group, 1)
    for h in range(num_heads):
        logits = q[kept, h].float() @ kk[kept, h].T * scale
        future = kept[None, :] > kept[:, None]
        probs = torch.softmax(logits.masked_fill(future, -math.inf), -1)
        out[kept, h] = probs @ vv[kept, h]
    return out


def expected_cpu_kernel(forced: str | None) -> str:
    """The sparse kernel the CPU backend must report (attention/cpu_kernel.choose_kernel)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_kvsparse.attention import cpu_kernel

    isa = _get_attn_isa(torch.bfloat16, 32, 64, "auto")
    use_torch = cpu_kernel.choose_kernel(forced or "auto", isa) == "torch"
    return "torch-reference" if use_torch else f"vllm-cpu-attn:{isa}"


# forced=None: the kernel the CPU picks; "vllm": vLLM's own kernel whatever the CPU.
@pytest.mark.parametrize("forced", [None, "vllm"])
def test_prefill_output_equals_fp32_reference_on_kept_set(peaked_model, tmp_path, forced):
    """Tolerance (bf16 model and cache): the inputs are bf16 (exact in fp32); vLLM's kernel
    keeps fp32 logits and softmax but rounds the weights to bf16 before P.V and writes a bf16
    output, each a relative error of at most u = 2**-9 (of |o| and of max|v|); the torch path
    rounds only the output. 2e-2 absolute and relative is 4u times the tiny model's max|v|
    (~2.5) with margin."""
    rec = tmp_path / "records"
    kernel_option = {"cpu_sparse_kernel": forced} if forced else {}
    run_offline({"model": peaked_model, "prompts": PROMPTS[:3], "max_tokens": 2,
                 "additional_config": zipvl_config(tau=0.9, record_dir=str(rec), evict=False,
                                                   record_tensors=True, **kernel_option)},
                tmp_path)
    files = sorted(rec.glob("tensors-*.pt"))
    assert len(files) >= 3 * 4 - 1   # every (request, layer) that dropped something
    kernel = expected_cpu_kernel(forced)
    for path in files:
        t = torch.load(path)
        assert t["kernel"] == kernel      # the kernel claimed really ran (no silent fallback)
        kept, n = t["kept"], t["query"].shape[0]
        assert kept.numel() < n
        ref = reference_sparse_attention(t["query"], t["key"], t["value"], kept, t["scale"])
        torch.testing.assert_close(t["output"].float(), ref, atol=2e-2, rtol=2e-2)
        assert not t["output"][torch.isin(torch.arange(n), kept, invert=True)].any()
        # the recorded set is ZipVL's selection for these very queries and keys
        again = zipvl.select_important_tokens(t["query"], t["key"], tau=0.9,
                                              scale=t["scale"]).indices
        assert torch.equal(again, kept)


def test_peaked_model_keeps_fewer_tokens_and_batching_matches_sequential(peaked_model,
                                                                         tmp_path):
    rec = tmp_path / "records"
    args = ["--kv-sparsity", "zipvl", "--kv-sparsity-config",
            f'{{"tau": 0.9, "min_prompt_len": 0, "record_dir": "{rec}"}}']
    images = [make_image(seed=s) for s in range(20, 24)]
    with VllmServer(peaked_model, args, tmp_path / "srv") as srv:
        client = srv.client()
        one_by_one = [chat_image(client, img).choices[0].message.content for img in images]
        with cf.ThreadPoolExecutor(len(images)) as pool:
            together = list(pool.map(lambda im: chat_image(client, im).choices[0].message
                                     .content, images))
    assert all(one_by_one) and together == one_by_one
    records = read_records(str(rec))
    assert len(records) == 2 * len(images) * 4
    ratios = {}
    for r in records:
        ratios.setdefault(r["layer"], []).append(r["num_kept"] / r["num_tokens"])
    means = {layer: sum(v) / len(v) for layer, v in ratios.items()}
    assert sum(means.values()) / len(means) < 0.8, means
    assert max(means.values()) - min(means.values()) > 0.02, means  # layer-adaptive


def test_visual_scope_never_drops_text_and_odd_inputs_work(peaked_model, tmp_path):
    rec = tmp_path / "records"
    prompts = [{"image": {"seed": 4}}, {"image": {"seed": 5, "size": [1, 1]}},
               {"image": {"seed": 6, "size": [28, 28]}}, {"text": TEXT},
               {"tokens": 10, "seed": 1},       # shorter than the 128 probes
               {"tokens": 2047, "seed": 3}]     # max_model_len - 1
    out = run_offline({"model": peaked_model, "prompts": prompts, "max_tokens": 1,
                       "additional_config": zipvl_config(tau=0.5, scope="visual",
                                                         record_dir=str(rec))}, tmp_path)
    assert all(len(o) == 1 for o in out["outputs"])
    records = read_records(str(rec))
    assert len(records) == len(prompts) * 4
    dropped_visual = 0
    for r in records:
        visual = set()
        for start, end in r["visual_ranges"]:
            visual.update(range(start, end))
        dropped = set(range(r["num_tokens"])) - set(r["kept"])
        assert dropped <= visual, "a text token was dropped"
        dropped_visual += len(dropped)
    assert dropped_visual > 0   # the visual tokens really were candidates
