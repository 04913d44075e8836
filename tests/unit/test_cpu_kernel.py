"""Token-sparse prefill through vLLM's own CPU attention kernel (attention/cpu_kernel.py)
against the fp32 torch reference, and the CPU backend's use of it (no silent fallback).

Tolerance: the kernel computes as vLLM's dense CPU path does, on the cache dtype (bf16 here):
bf16 K/V (exact, the inputs are bf16 already), fp32 logits and softmax, the softmax weights
rounded to bf16 before the P.V product on the vector ISAs, and a bf16 output. bf16's unit
roundoff is u = 2**-9; the output rounding costs <= u |o| and the weight rounding
<= u * sum_j p_j |v_j| <= u * max|v|. We allow 4x that: atol = 4u * max|v|, rtol = 4u."""

import functools

import pytest
import torch

pytest.importorskip("vllm._custom_ops")

from vllm_kvsparse import zipvl  # noqa: E402
from vllm_kvsparse.attention import cpu_kernel  # noqa: E402

U = 2.0 ** -9


def qkv(n, heads, kv_heads, d, seed, peak=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, heads, d, generator=g) * peak).bfloat16()
    k = torch.randn(n, kv_heads, d, generator=g).bfloat16()
    v = torch.randn(n, kv_heads, d, generator=g).bfloat16()
    return q, k, v


def assert_bf16_close(out, ref, v):
    torch.testing.assert_close(out.float(), ref, rtol=4 * U,
                               atol=4 * U * float(v.float().abs().max()))


@pytest.mark.parametrize("n,heads,kv_heads,d,kept,seed", [
    (1000, 16, 4, 64, 300, 0),      # the benchmark model's shapes
    (517, 8, 8, 128, 517, 1),       # everything kept, MHA, head_dim 128
    (200, 28, 4, 64, 33, 2),        # Qwen2-VL-7B head ratio, kept not a block multiple
    (40, 4, 2, 64, 1, 3),           # one kept row
])
def test_matches_fp32_reference(n, heads, kv_heads, d, kept, seed):
    q, k, v = qkv(n, heads, kv_heads, d, seed, peak=3.0)
    g = torch.Generator().manual_seed(seed + 100)
    idx = torch.sort(torch.randperm(n, generator=g)[:kept]).values
    spec = cpu_kernel.default_spec(torch.bfloat16, d)
    before = cpu_kernel.CALLS["cpu_attention_with_kv_cache"]
    out = cpu_kernel.sparse_prefill_attention(q, k, v, idx, d ** -0.5, spec)
    assert cpu_kernel.CALLS["cpu_attention_with_kv_cache"] == before + 1
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = zipvl.sparse_prefill_attention_reference(q.float(), k.float(), v.float(), idx,
                                                   d ** -0.5)
    assert_bf16_close(out, ref, v)
    dropped = torch.isin(torch.arange(n), idx, invert=True)
    assert not out[dropped].any()


def test_empty_kept_set_is_zero_without_kernel_call():
    q, k, v = qkv(10, 4, 2, 64, 0)
    before = cpu_kernel.CALLS["cpu_attention_with_kv_cache"]
    out = cpu_kernel.sparse_prefill_attention(q, k, v, torch.zeros(0, dtype=torch.long), 0.1,
                                              cpu_kernel.default_spec(torch.bfloat16, 64))
    assert not out.any() and cpu_kernel.CALLS["cpu_attention_with_kv_cache"] == before


def test_all_kept_is_bit_identical_to_dense_kernel_call():
    """With every row kept the sparse path is vLLM's dense prefill of the same sequence."""
    q, k, v = qkv(300, 16, 4, 64, 5)
    spec = cpu_kernel.default_spec(torch.bfloat16, 64)
    dense = cpu_kernel.causal_attention(q, k, v, 0.125, spec)
    sparse = cpu_kernel.sparse_prefill_attention(q, k, v, torch.arange(300), 0.125, spec)
    assert torch.equal(dense, sparse)


def test_layer_sparsity_attend_uses_the_given_kernel(monkeypatch):
    """LayerSparsity.attend runs the backend's kernel, not the torch reference."""
    from vllm_kvsparse.attention import cpu as kv_cpu
    from vllm_kvsparse.attention.layer_sparsity import LayerSparsity, RowSelection
    from vllm_kvsparse.config import SparsityConfig

    class Layer:
        isa = cpu_kernel.default_spec(torch.bfloat16, 64).isa
        _k_scale_float = _v_scale_float = 1.0

    impl = object.__new__(kv_cpu.KVSparseCPUAttentionImpl)
    impl.kv_cache_dtype = "auto"
    impl.sparsity = SparsityConfig.from_options("zipvl", {"cpu_sparse_kernel": "vllm"})
    kv_cache = torch.empty(4, 4, 32, 128, dtype=torch.bfloat16)
    kernel = impl._sparse_kernel(Layer(), kv_cache)
    assert isinstance(kernel, functools.partial)
    assert kernel.func is cpu_kernel.sparse_prefill_attention
    assert kernel.name == f"vllm-cpu-attn:{Layer.isa}"
    assert kernel.keywords["spec"].block_size == 32

    cfg = SparsityConfig.from_additional_config(
        {"kv_sparsity": "zipvl", "kv_sparsity_config": {"evict": False}})
    ls = LayerSparsity(cfg, 0, 0.125)
    q, k, v = qkv(120, 16, 4, 64, 7)
    idx = torch.arange(0, 120, 3)
    sel = RowSelection("r", 120, idx, record=None, sparse_attention=True)
    before = cpu_kernel.CALLS["cpu_attention_with_kv_cache"]
    out = ls.attend(sel, q, k, v, kernel=kernel)
    assert cpu_kernel.CALLS["cpu_attention_with_kv_cache"] == before + 1
    ref = zipvl.sparse_prefill_attention_reference(q.float(), k.float(), v.float(), idx, 0.125)
    assert_bf16_close(out, ref, v)


def test_kernel_choice():
    # auto: vLLM's kernel on AMX and AVX-512 CPUs, torch SDPA on AVX2 (measured, cpu_kernel.py)
    assert cpu_kernel.choose_kernel("auto", "amx", "AVX512") == "vllm"
    assert cpu_kernel.choose_kernel("auto", "amx", "AVX2") == "vllm"
    assert cpu_kernel.choose_kernel("auto", "vec", "AVX512") == "vllm"
    assert cpu_kernel.choose_kernel("auto", "vec", "AVX2") == "torch"
    assert cpu_kernel.choose_kernel("auto", "vec16", "DEFAULT") == "torch"
    assert cpu_kernel.choose_kernel("vllm", "vec", "AVX2") == "vllm"
    assert cpu_kernel.choose_kernel("torch", "amx", "AVX512") == "torch"
    from vllm_kvsparse.config import SparsityConfig, SparsityConfigError
    with pytest.raises(SparsityConfigError, match="cpu_sparse_kernel: 'bogus' is invalid; "
                                                  "valid values are auto, vllm, torch"):
        SparsityConfig.from_options("zipvl", {"cpu_sparse_kernel": "bogus"})


@pytest.mark.parametrize("first_row", [0, 1, 333, 700, 999, 1000])
def test_first_row_computes_only_the_last_chunks_rows(first_row):
    """The completing chunk of a chunked prefill (first_row = positions computed earlier):
    rows from first_row on equal the full computation, on vLLM's kernel and on the torch
    reference; rows before are zero."""
    n, d = 1000, 64
    q, k, v = qkv(n, 16, 4, d, 7, peak=3.0)
    g = torch.Generator().manual_seed(8)
    idx = torch.sort(torch.randperm(n, generator=g)[:400]).values
    spec = cpu_kernel.default_spec(torch.bfloat16, d)
    full_ref = zipvl.sparse_prefill_attention_reference(q.float(), k.float(), v.float(), idx,
                                                        d ** -0.5)
    ref = zipvl.sparse_prefill_attention_reference(q.float(), k.float(), v.float(), idx,
                                                   d ** -0.5, first_row=first_row)
    out = cpu_kernel.sparse_prefill_attention(q, k, v, idx, d ** -0.5, spec,
                                              first_row=first_row)
    torch.testing.assert_close(ref[first_row:], full_ref[first_row:], rtol=1e-5, atol=1e-6)
    assert not ref[:first_row].any() and not out[:first_row].any()
    assert_bf16_close(out[first_row:], full_ref[first_row:], v)
