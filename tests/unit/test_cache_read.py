"""Reading a request's plain K/V back from vLLM's paged caches (attention/cache_read.py).

CPU: K/V are written at a request's slots by vLLM's own cache-write op, exactly as its CPU
backend does, then read back; the read must equal what was written, bit for bit, for every ISA
the op accepts on this machine (the others are skipped with the op's reason), every cache dtype
vLLM's CPU backend supports, several block sizes and KV-head counts, a scattered block table and
a token count that ends mid-block. FlashAttention: the cache is filled through
flash_attn_kv_views and read back (no vLLM needed)."""

from __future__ import annotations

import platform

import pytest
import torch

from vllm_kvsparse.attention import cache_read
from vllm_kvsparse.attention.flash_cache import flash_attn_kv_views

ISAS = ["vec", "vec16", "amx", "neon", "rvv", "vxe", "vsx"]
# vLLM's x86 build always has these two (cpu_attn.py `_get_attn_isa` falls back to them), so a
# rejection there is a failure, not a skip.
REQUIRED = {"vec", "vec16"} if platform.machine() in ("x86_64", "AMD64") else set()


def ops():
    return pytest.importorskip("vllm._custom_ops")


def write(kv_cache, key, value, slots, isa):
    """What vLLM's CPU backend does in do_kv_cache_update (cpu_attn.py)."""
    nb, h, bs, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)
    ops().cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def require_isa(isa, dtype, block_size, head_dim):
    """Skip (with the op's own message) a configuration vLLM's op rejects on this CPU/build."""
    probe = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
    one = torch.zeros(1, 1, head_dim, dtype=dtype)
    try:
        write(probe, one, one, torch.zeros(1, dtype=torch.long), isa)
    except RuntimeError as e:
        if isa in REQUIRED:
            raise
        pytest.skip(f"vLLM's cpu_attn_reshape_and_cache rejects isa={isa} {dtype} "
                    f"block_size={block_size} head_dim={head_dim} here: "
                    f"{str(e).strip().splitlines()[0]}")


def random_kv(n, heads, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, head_dim, generator=g).to(dtype) for _ in range(2)]


def scattered_row(num_blocks, used, seed):
    """A block-table row: `used` distinct, shuffled block ids, then padding entries (vLLM's rows
    are longer than a request's blocks)."""
    g = torch.Generator().manual_seed(seed)
    row = torch.randperm(num_blocks, generator=g)[:used]
    return torch.cat([row, torch.zeros(3, dtype=torch.long)]).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv_heads,head_dim", [(4, 64), (1, 128), (2, 80)])
def test_cpu_read_equals_written(isa, block_size, dtype, kv_heads, head_dim):
    require_isa(isa, dtype, block_size, head_dim)
    n = 2 * block_size + 5                        # ends mid-block
    used = -(-n // block_size)
    num_blocks = 4 * used + 3
    seed = block_size + kv_heads + head_dim
    key, value = random_kv(n, kv_heads, head_dim, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    kv_cache = torch.randn(num_blocks, kv_heads, block_size, 2 * head_dim,
                           generator=g).to(dtype)  # other requests' data around ours
    row = scattered_row(num_blocks, used, seed)
    pos = torch.arange(n)
    slots = row[pos // block_size].long() * block_size + pos % block_size
    write(kv_cache, key, value, slots, isa)
    before = kv_cache.clone()

    for m in (n, block_size - 1, 1, 0):           # the whole request, and prefixes of it
        k, v = cache_read.read_cpu_kv(kv_cache, row, m, isa, block_size)
        assert k.shape == v.shape == (m, kv_heads, head_dim)
        assert k.dtype == v.dtype == dtype and k.is_contiguous() and v.is_contiguous()
        assert torch.equal(k, key[:m]) and torch.equal(v, value[:m])
    assert torch.equal(kv_cache, before)          # reading does not modify the cache


def test_layout_is_learnt_once_per_configuration():
    require_isa("vec", torch.bfloat16, 32, 64)
    first = cache_read.cpu_layout("vec", 32, 2, 64, torch.bfloat16)
    assert cache_read.cpu_layout("vec", 32, 2, 64, torch.bfloat16) is first
    head, inner = first
    # vLLM's "vec" layout, for the record: per block and head, K is stored transposed
    # [head_dim, block_size], V row-major [block_size, head_dim] after it.
    r, d = torch.arange(32)[:, None], torch.arange(64)[None, :]
    assert torch.equal(inner[0, :, 1], d * 32 + r)
    assert torch.equal(inner[1, :, 1], 32 * 64 + r * 64 + d)
    assert (head[:, :, 1] == 1).all()


def test_fp8_cache_is_refused():
    cache = torch.zeros(2, 1, 32, 128, dtype=torch.uint8)
    with pytest.raises(NotImplementedError, match="quantises fp8"):
        cache_read.read_cpu_kv(cache, torch.tensor([0]), 4, "vec", 32, kv_cache_dtype="fp8")
    with pytest.raises(NotImplementedError, match="quantises fp8"):
        cache_read.read_cpu_kv(cache.bfloat16(), torch.tensor([0]), 4, "vec", 32,
                               kv_cache_dtype="fp8_e4m3")


def fake_write(kind):
    """Stand-ins for a cache write that is not a permutation of the written values."""
    def op(key, value, cache, slots, isa):
        nb, h, two_bs, d = cache.shape
        bs = two_bs // 2
        block = cache[slots[0] // bs]
        plain = torch.cat([key.transpose(0, 1), value.transpose(0, 1)], dim=1)  # [h, 2bs, d]
        if kind == "scaled":                      # fp8-like: values stored scaled
            block.copy_(plain * 0.5)
        elif kind == "padded":                    # leaves an element unwritten
            block.copy_(plain)
            block[0, 0, 0] = -1.0
        elif kind == "rounded":                   # exact on the index digits only
            block.copy_(plain.round())
        elif kind == "duplicated":                # one element written twice, one dropped
            plain[0, 1] = plain[0, 0]
            block.copy_(plain)
    return op


@pytest.mark.parametrize("kind,match", [("scaled", "unchanged"), ("padded", "unwritten"),
                                        ("duplicated", "not a permutation"),
                                        ("rounded", "arbitrary values")])
def test_non_permutation_write_is_refused(monkeypatch, kind, match):
    monkeypatch.setattr(cache_read, "_write", fake_write(kind))
    with pytest.raises(ValueError, match=match):
        cache_read.cpu_layout(f"fake-{kind}", 16, 2, 32, torch.float32)


def test_block_row_too_short_and_block_size_mismatch():
    cache = torch.zeros(4, 2, 16, 128)
    with pytest.raises(ValueError, match="need 2 blocks"):
        cache_read.read_cpu_kv(cache, torch.tensor([1]), 17, "vec", 16)
    with pytest.raises(ValueError, match="block size 16"):
        cache_read.read_cpu_kv(cache, torch.tensor([1]), 4, "vec", 32)


@pytest.mark.parametrize("physical", ["HND", "NHD"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_flash_read_equals_written(physical, block_size, dtype):
    """FlashAttention's cache, logical [num_blocks, Hkv, block_size, 2 * d]; vLLM may allocate
    it token-major (NHD) and hand the layer a permuted view: both must read back."""
    kv_heads, head_dim, n = 4, 64, 2 * block_size + 7
    used = -(-n // block_size)
    num_blocks = 3 * used + 2
    shape = (num_blocks, kv_heads, block_size, 2 * head_dim)
    g = torch.Generator().manual_seed(block_size)
    kv_cache = torch.randn(shape, generator=g).to(dtype)
    if physical == "NHD":
        kv_cache = kv_cache.transpose(1, 2).contiguous().transpose(1, 2)
    key, value = random_kv(n, kv_heads, head_dim, dtype, block_size + 1)
    row = scattered_row(num_blocks, used, block_size)
    key_cache, value_cache = flash_attn_kv_views(kv_cache, head_dim)
    pos = torch.arange(n)
    blocks, offsets = row[pos // block_size].long(), pos % block_size
    key_cache[blocks, offsets], value_cache[blocks, offsets] = key, value
    before = kv_cache.clone()
    for m in (n, block_size, 3, 0):
        k, v = cache_read.read_flash_kv(kv_cache, row, m, head_dim)
        assert k.shape == v.shape == (m, kv_heads, head_dim)
        assert torch.equal(k, key[:m]) and torch.equal(v, value[:m])
    assert torch.equal(kv_cache, before)
