"""The CUDA glue (attention/cuda.py, platform_cuda.py) exercised on CPU with vLLM's own classes.

No GPU and no FlashAttention kernel here, so this checks everything around that kernel: the
FlashAttention metadata builder's per-step plan (sparse rows, dense-row sub-metadata, virtual
block tables of compacted requests), the impl's sparse rows (selection, sparse attention,
in-cache compaction through FlashAttention's cache views, eviction report), the CUDA-graph
support reported to vLLM, and the CUDA platform's start-up checks. The dense-row call into
FlashAttention itself only runs on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from vllm_kvsparse import runtime, zipvl
from vllm_kvsparse.records import read_records

BLOCK = 16
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32
LAYER = "model.language_model.layers.0.self_attn.attn"


def engine_config(model, tmp_path, monkeypatch, method, options):
    """A real VllmConfig of the tiny model with `method` + eviction (built on the CPU platform;
    the FlashAttention classes only read its generic parts), and a fresh worker state."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvsparse import records

    monkeypatch.setenv("VLLM_KVSPARSE_STATS_DIR", str(tmp_path / "stats"))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    monkeypatch.setattr(records, "_RECORDERS", {})
    runtime.bind(runtime.WorkerRuntime())           # a fresh worker-process state per test
    (tmp_path / "stats").mkdir(exist_ok=True)
    options = {"min_prompt_len": 64, "record_dir": str(tmp_path / "records"), **options}
    args = EngineArgs(model=model, max_model_len=512, block_size=BLOCK,
                      additional_config={"kv_sparsity": method, "kv_sparsity_config": options})
    return args.create_engine_config()


@pytest.fixture
def vllm_config(tiny_model, tmp_path, monkeypatch):
    return engine_config(tiny_model, tmp_path, monkeypatch, "zipvl",
                         {"tau": 0.5, "num_recent_probes": 8, "num_random_probes": 8})


def flash_builder(vllm_config, layer_idx=0):
    from vllm_kvsparse.attention.cuda import KVSparseFlashAttentionMetadataBuilder
    from vllm_kvsparse.kv import KVSparseAttentionSpec

    spec = KVSparseAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM,
                                 dtype=torch.float32, layer_idx=layer_idx)
    return KVSparseFlashAttentionMetadataBuilder(spec, [LAYER], vllm_config, torch.device("cpu"))


def common_metadata(query_lens, seq_lens, tables):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.tensor([0] + query_lens).cumsum(0).int()
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    slots = []
    for r, (q, s) in enumerate(zip(query_lens, seq_lens)):
        pos = torch.arange(s - q, s)
        slots.append(tables[r, pos // BLOCK].long() * BLOCK + pos % BLOCK)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=len(query_lens),
        num_actual_tokens=sum(query_lens), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_table_tensor=tables, slot_mapping=torch.cat(slots),
        seq_lens_cpu_upper_bound=seq.clone())


def test_builder_plans_sparse_rows_and_dense_sub_metadata(vllm_config):
    """Batch: a decode row, a 100-token prompt (sparse), a 20-token prompt (dense, short)."""
    builder = flash_builder(vllm_config)
    tables = torch.arange(30, dtype=torch.int32).reshape(3, 10)
    cm = common_metadata([1, 100, 20], [41, 100, 20], tables)
    rows = [runtime.RequestRow("decode", 30, ()), runtime.RequestRow("long", 100, ((10, 90),)),
            runtime.RequestRow("short", 20, ())]
    plan = builder._plan(cm, rows)
    assert [(r.req_id, r.start, r.end, r.num_prompt) for r in plan.sparse_rows] == \
        [("long", 1, 101, 100)]
    assert plan.block_size == BLOCK                          # layer 0 evicts
    assert plan.dense_tokens.tolist() == [0] + list(range(101, 121))
    md = plan.dense_md                                       # vLLM's FlashAttentionMetadata
    assert type(md).__name__ == "FlashAttentionMetadata"
    assert md.query_start_loc.tolist() == [0, 1, 21]
    assert md.seq_lens.tolist() == [41, 20]
    assert md.block_table.tolist() == tables[[0, 2]].tolist()
    assert torch.equal(md.slot_mapping, cm.slot_mapping[plan.dense_tokens])
    assert (md.num_actual_tokens, md.max_query_len, md.max_seq_len) == (21, 20, 41)


def test_builder_gives_compacted_decode_rows_a_virtual_block_table(vllm_config):
    builder = flash_builder(vllm_config)
    tables = torch.arange(20, dtype=torch.int32).reshape(2, 10) + 100
    cm = common_metadata([1, 1], [71, 40], tables)
    rows = [runtime.RequestRow("a", 70, ()), runtime.RequestRow("b", 39, ())]
    runtime.current().note_compaction("a", 0, 2, 4)   # layer 0 kept blocks [0, 2) of 4 full ones
    view, decode_rows = builder._virtual_view(cm, rows)
    assert decode_rows == [("a", 0, 1, 70)]
    assert view.seq_lens.tolist() == [71 - 2 * BLOCK, 40]
    assert view.block_table_tensor[0].tolist()[:4] == [100, 101, 104, 105]
    assert view.block_table_tensor[1].tolist() == tables[1].tolist()
    assert cm.seq_lens.tolist() == [71, 40]      # the runner's shared buffers are untouched
    assert cm.block_table_tensor[0].tolist() == tables[0].tolist()
    assert view.max_seq_len == 40
    # the plan classifies rows by their true lengths: in the view "a" (70-token prompt, 1
    # output token) looks 32 tokens short of its prompt, yet it is a decode row, not a chunk
    from vllm_kvsparse.attention.common import _host_seq_lens
    stale = runtime.PartialPrompt(torch.tensor([0]))   # even with chunk state left over
    stale.computed = 71 - 2 * BLOCK - 1
    runtime.current()._partials["a"] = stale
    assert builder._plan(view, rows) is not None       # (what the view alone would say)
    assert builder._plan(view, rows, _host_seq_lens(cm)) is None


def test_partial_prompt_keeps_probe_rows_of_every_chunk():
    """Chunk state: the query rows a method reads, kept per layer from the chunk computing
    them; usable only if every chunk before the completing one went through it."""
    rt = runtime.bind(runtime.WorkerRuntime())
    q = torch.arange(1, 13, dtype=torch.float32).view(12, 1, 1)
    rt.begin_step()
    rt.forget_partial("r")
    part = rt.partial_prompt("r", fresh=True, make_rows=lambda: torch.tensor([1, 5, 9]))
    for layer in (0, 1):
        part.keep(layer, 0, q[:4] * (layer + 1))
    rt.end_step()
    assert rt.has_partial("r", 4) and not rt.has_partial("r", 8)
    rt.begin_step()
    assert rt.partial_prompt("r", fresh=False, make_rows=None) is part
    for layer in (0, 1):
        part.keep(layer, 4, q[4:8] * (layer + 1))
    rt.end_step()
    assert rt.has_partial("r", 8)
    full = part.assemble(1, 8, q[8:] * 2)
    want = torch.zeros(12, 1, 1)
    want[[1, 5]] = q[[1, 5]] * 2
    want[8:] = q[8:] * 2
    assert torch.equal(full, want)
    rt.begin_step()
    rt.forget_partial("r")                       # the prompt starts over (preemption)
    assert not rt.has_partial("r", 8)
    rt.end_step()


def test_cudagraph_support_reported_to_vllm(vllm_config):
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm_kvsparse.attention.cuda import KVSparseFlashAttentionMetadataBuilder as B

    assert B.get_cudagraph_support(vllm_config, None) == AttentionCGSupport.NEVER  # evicting
    ac = dict(vllm_config.additional_config)
    ac["kv_sparsity_config"] = dict(ac["kv_sparsity_config"], evict=False)
    no_evict = SimpleNamespace(additional_config=ac)
    assert B.get_cudagraph_support(no_evict, None).value <= \
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE.value


def peaked_prompt(n, seed):
    """q/k with a few heavy-hitter keys, so tau 0.5 keeps a small set."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(HEADS, HEAD_DIM, generator=g)
    q = torch.randn(n, HEADS, HEAD_DIM, generator=g) * 0.3 + shared
    k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g) * 0.1
    k[[0, 7, 33, 61]] += 2.0 * shared.reshape(KV_HEADS, -1, HEAD_DIM).mean(1)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g)
    return q, k, v


def test_impl_sparse_rows_attend_over_kept_set_and_compact_in_cache(vllm_config):
    """Two 100-token prompts prefilled in one step through KVSparseFlashAttentionImpl.forward:
    outputs equal the fp32 reference on the recorded kept sets, each request's kept K/V are
    moved inside FlashAttention's cache views to its first blocks, the rest of the cache is
    untouched, and the evicted block ranges are reported."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from vllm_kvsparse.attention.cuda import (KVSparseFlashAttentionImpl,
                                              KVSparseFlashAttentionMetadata,
                                              flash_attn_kv_views)

    n, num_blocks = 100, 16
    prompts = [peaked_prompt(n, seed) for seed in (1, 2)]
    q, k, v = (torch.cat([p[i] for p in prompts]) for i in range(3))
    tables = torch.tensor([[3, 9, 1, 12, 5, 7, 0, 15], [2, 4, 6, 8, 10, 11, 13, 14]],
                          dtype=torch.int32)
    kv_cache = torch.randn(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM)
    key_cache, value_cache = flash_attn_kv_views(kv_cache, HEAD_DIM)
    cm = common_metadata([n, n], [n, n], tables)
    for r in range(2):                           # what do_kv_cache_update wrote before forward
        for pos in range(n):
            block, slot = tables[r, pos // BLOCK], pos % BLOCK
            key_cache[block, slot], value_cache[block, slot] = k[r * n + pos], v[r * n + pos]
    before = kv_cache.clone()

    builder = flash_builder(vllm_config)
    md = KVSparseFlashAttentionMetadata.extend(
        FlashAttentionMetadataBuilder.build(builder, 0, cm),
        builder._plan(cm, [runtime.RequestRow("r0", n, ()), runtime.RequestRow("r1", n, ())]),
        None)
    assert md.kvsparse.dense_md is None
    with set_current_vllm_config(vllm_config):
        impl = KVSparseFlashAttentionImpl(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, None,
                                          None, "auto")
    out = torch.full_like(q, float("nan"))
    impl.forward(SimpleNamespace(layer_name=LAYER), q, k, v, kv_cache, md, out)
    evictions = runtime.current().take_evictions(set())

    records = {r["req_id"]: r for r in read_records(impl.sparsity.record_dir)}
    for r, req in enumerate(("r0", "r1")):
        kept = torch.tensor(records[req]["kept"])
        assert 0 < kept.numel() < n
        s = slice(r * n, (r + 1) * n)
        want = zipvl.sparse_prefill_attention_reference(q[s], k[s], v[s], kept, impl.scale)
        torch.testing.assert_close(out[s], want, rtol=1e-5, atol=1e-5)
        front, full = evictions[req][0]
        assert full == n // BLOCK and 0 < front < full
        moved = kept[:front * BLOCK]
        for j, pos in enumerate(moved.tolist()):        # compacted front, in order
            block, slot = tables[r, j // BLOCK], j % BLOCK
            assert torch.equal(key_cache[block, slot], k[r * n + pos])
            assert torch.equal(value_cache[block, slot], v[r * n + pos])
        tail = tables[r, full]                           # the partial last block stays put
        assert torch.equal(kv_cache[tail], before[tail])
    untouched = sorted(set(range(num_blocks)) - set(tables.flatten().tolist()))
    assert torch.equal(kv_cache[untouched], before[untouched])


CUDA_PLATFORM_SCRIPT = textwrap.dedent("""
    import json, sys, types
    # vllm.platforms.cuda imports a compiled CUDA extension at module level; the hooks under
    # test do not use it. Stubbed in this child process only.
    sys.modules["vllm._C_stable_libtorch"] = types.ModuleType("vllm._C_stable_libtorch")
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
    from vllm_kvsparse import platform_cuda as pc
    from vllm_kvsparse.config import SparsityConfig, SparsityConfigError

    # vLLM binds CudaPlatform to its NVML or non-NVML class at import; the plugin follows.
    out = {"mro": [c.__name__ for c in pc.KVSparseCudaPlatform.__mro__[:3]],
           "same_base": pc.KVSparseCudaPlatform.__mro__[2] is CudaPlatform,
           "worker": pc.KVSparseCudaPlatform.kvsparse_worker_cls}
    cfg = SparsityConfig.from_options("zipvl", {})
    def config(backend=None, async_scheduling=True):
        return types.SimpleNamespace(
            attention_config=types.SimpleNamespace(backend=backend),
            scheduler_config=types.SimpleNamespace(async_scheduling=async_scheduling))
    errors = []
    for backend, cap in ((E.TRITON_ATTN, DeviceCapability(9, 0)),
                         (None, DeviceCapability(7, 5))):
        try:
            pc.check_attention_backend(config(backend), cfg, cap)
        except SparsityConfigError as e:
            errors.append(str(e))
    pc.check_attention_backend(config(E.FLASH_ATTN), cfg, DeviceCapability(8, 0))
    for dtype in ("fp8", "fp8_e5m2", "fp8_e4m3"):
        try:
            pc.check_kv_cache_dtype(types.SimpleNamespace(
                cache_config=types.SimpleNamespace(cache_dtype=dtype)), cfg)
        except SparsityConfigError as e:
            errors.append(str(e))
    for dtype in ("auto", "bfloat16", "float16"):
        pc.check_kv_cache_dtype(types.SimpleNamespace(
            cache_config=types.SimpleNamespace(cache_dtype=dtype)), cfg)
    vc, changed = config(), []
    pc.select_attention_backend(vc, changed)
    pc.disable_async_scheduling(vc, changed)
    out.update(errors=errors, backend=vc.attention_config.backend.name,
               async_scheduling=vc.scheduler_config.async_scheduling, changed=changed)
    print("RESULT " + json.dumps(out))
""")


def test_cuda_platform_wiring_and_start_up_checks():
    proc = subprocess.run([sys.executable, "-c", CUDA_PLATFORM_SCRIPT], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["mro"][:2] == ["KVSparseCudaPlatform", "KVSparsePlatformMixin"]
    assert out["same_base"] and out["mro"][2] in ("NvmlCudaPlatform", "NonNvmlCudaPlatform")
    assert out["worker"] == "vllm_kvsparse.gpu_worker.KVSparseGPUWorker"
    assert len(out["errors"]) == 5
    for error, dtype in zip(out["errors"][2:], ("fp8", "fp8_e5m2", "fp8_e4m3")):
        assert f"--kv-cache-dtype={dtype}" in error and "auto" in error and "\n" not in error
    assert "--attention-backend=TRITON_ATTN" in out["errors"][0]
    assert "FLASH_ATTN" in out["errors"][0] and "\n" not in out["errors"][0]
    assert "compute capability >= 8.0" in out["errors"][1] and "7.5" in out["errors"][1]
    assert out["backend"] == "FLASH_ATTN" and out["async_scheduling"] is False
    assert out["changed"] == ["attention backend FLASH_ATTN", "async scheduling off"]


def test_gpu_worker_and_backend_registration_targets():
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_kvsparse import plugin
    from vllm_kvsparse.attention.cuda import KVSparseFlashAttentionBackend as B
    from vllm_kvsparse.gpu_worker import KVSparseGPUWorker

    assert issubclass(KVSparseGPUWorker, Worker)
    assert issubclass(B, FlashAttentionBackend) and B.get_name() == "FLASH_ATTN"
    assert B.forward_includes_kv_cache_update is False   # cache written before forward
    name, path = plugin._BACKENDS["cuda"]
    assert name == B.get_name() and path.endswith(B.__name__)


def test_cuda_kernel_calls_of_sparse_prefill_match_the_cpu_paths():
    """The two calls SparsePrefill makes on CUDA tensors, forced onto the Triton kernels
    (interpreter, fp32), agree with the torch paths it uses on CPU."""
    from functools import partial

    from vllm_kvsparse.attention import layer_sparsity as sp

    q, k, v = peaked_prompt(96, seed=3)
    scale = HEAD_DIM ** -0.5
    common = dict(tau=0.5, num_recent=8, num_random=8, scale=scale, seed=0)
    torch_sel = zipvl.select_important_tokens(q, k, **common)
    triton_sel = zipvl.select_important_tokens(
        q, k, scores_fn=partial(sp._fused_probe_scores, backend="triton"), **common)
    torch.testing.assert_close(triton_sel.accumulated, torch_sel.accumulated,
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(triton_sel.indices, torch_sel.indices)
    assert 0 < torch_sel.indices.numel() < 96
    want = sp._sparse_attention(q, k, v, torch_sel.indices, scale)             # CPU: SDPA
    got = sp._sparse_attention(q, k, v, torch_sel.indices, scale, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class ImplicitHostTensors(torch.overrides.TorchFunctionMode):
    """Records tensor factories called without a device: on a GPU they would create host
    tensors next to CUDA ones (a device mismatch). CPU stands in for CUDA here."""

    FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor,
                 torch.randn, torch.rand, torch.randperm, torch.linspace}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


def test_dense_tail_creates_every_tensor_on_the_inputs_device():
    """`_dense_tail` (recomputed output tokens after a preemption, evict: false) builds its
    causal mask on the logits' device, and equals an independent fp32 reference."""
    from vllm_kvsparse.attention.layer_sparsity import _dense_tail

    q, k, v = peaked_prompt(70, seed=5)
    with ImplicitHostTensors() as mode:
        out = _dense_tail(q, k, v, 60, HEAD_DIM ** -0.5)
    assert mode.calls == []
    kk, vv = (x.repeat_interleave(HEADS // KV_HEADS, 1) for x in (k, v))
    for row in range(60, 70):
        for h in range(HEADS):
            p = torch.softmax(q[row, h] @ kk[:row + 1, h].T * HEAD_DIM ** -0.5, -1)
            torch.testing.assert_close(out[row - 60, h], p @ vv[:row + 1, h],
                                       rtol=1e-5, atol=1e-5)


def test_dense_sub_batch_never_overwrites_the_full_batch_fa3_schedule(vllm_config, monkeypatch):
    """With full CUDA graphs, FlashAttention-3's builder keeps ONE scheduler_metadata buffer and
    returns views of it. The plugin's dense-row sub-build must not write into it, or exempt
    layers and keep-all rows of the full batch would run with the sub-batch's schedule."""
    from vllm.v1.attention.backends import flash_attn

    def fake_schedule(*, batch_size, cu_seqlens_q, cache_seqlens, **_):   # FA3's AOT planner
        return torch.cat([torch.tensor([batch_size]), cache_seqlens, cu_seqlens_q]).int()

    # Not imported on a CPU build (no FlashAttention kernels): provided here.
    monkeypatch.setattr(flash_attn, "get_scheduler_metadata", fake_schedule, raising=False)
    builder = flash_builder(vllm_config)
    builder.aot_schedule, builder.use_full_cuda_graph = True, True   # what FA3 + graphs set
    builder.scheduler_metadata = torch.zeros(64, dtype=torch.int32)
    tables = torch.arange(30, dtype=torch.int32).reshape(3, 10)
    cm = common_metadata([1, 100, 20], [41, 100, 20], tables)
    rows = [runtime.RequestRow("decode", 30, ()), runtime.RequestRow("long", 100, ()),
            runtime.RequestRow("short", 20, ())]
    md = flash_attn.FlashAttentionMetadataBuilder.build(builder, 0, cm)
    full = fake_schedule(batch_size=3, cu_seqlens_q=cm.query_start_loc, cache_seqlens=cm.seq_lens)
    assert torch.equal(md.scheduler_metadata, full)          # a view of the shared buffer
    plan = builder._plan(cm, rows)                           # builds the dense rows' metadata
    assert plan.dense_md is not None and plan.dense_md.num_actual_tokens == 21
    assert torch.equal(md.scheduler_metadata, full)
    assert plan.dense_md.scheduler_metadata is None          # scheduled by FA at run time


def test_metadata_reused_for_another_kv_group_carries_that_groups_block_table(vllm_config):
    """vLLM reuses a group's metadata for another group with an equal spec (eviction off):
    update_block_table must swap the dense rows' block table and slots as well."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from vllm_kvsparse.attention.cuda import KVSparseFlashAttentionMetadata

    ac = dict(vllm_config.additional_config)
    ac["kv_sparsity_config"] = dict(ac["kv_sparsity_config"], evict=False)
    vllm_config.additional_config = ac
    builder = flash_builder(vllm_config)
    assert builder.evict_layer is None and builder.supports_update_block_table
    tables = torch.arange(30, dtype=torch.int32).reshape(3, 10)
    cm = common_metadata([1, 100, 20], [41, 100, 20], tables)
    md = KVSparseFlashAttentionMetadata.extend(
        FlashAttentionMetadataBuilder.build(builder, 0, cm),
        builder._plan(cm, [runtime.RequestRow("decode", 30, ()),
                           runtime.RequestRow("long", 100, ()),
                           runtime.RequestRow("short", 20, ())]), None)
    other_tables, other_slots = tables + 500, cm.slot_mapping + 10_000
    other = builder.update_block_table(md, other_tables, other_slots)
    dense = other.kvsparse.dense_md
    assert dense.block_table.tolist() == other_tables[[0, 2]].tolist()
    assert torch.equal(dense.slot_mapping, other_slots[md.kvsparse.dense_tokens])
    assert other.block_table is other_tables
    assert md.kvsparse.dense_md.block_table.tolist() == tables[[0, 2]].tolist()  # untouched
    assert other.kvsparse.sparse_rows == md.kvsparse.sparse_rows


def test_evicting_builders_never_share_metadata_across_groups(vllm_config):
    assert flash_builder(vllm_config).supports_update_block_table is False


def test_deferred_method_keeps_kv_whole_until_the_step_ends(tiny_model, tmp_path, monkeypatch):
    """VL-Cache decides every layer's budget after all layers: each layer's forward attends
    dense and leaves its cache alone; the worker's end of step compacts every layer as the
    recorded kept sets say and reports the evictions."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from vllm_kvsparse.attention import cuda as glue

    config = engine_config(tiny_model, tmp_path, monkeypatch, "vlcache", {"budget": 0.3})
    n, num_blocks = 100, 16
    q, k, v = peaked_prompt(n, seed=4)
    table = torch.tensor([[3, 9, 1, 12, 5, 7, 0, 15]], dtype=torch.int32)
    cm = common_metadata([n], [n], table)
    row = runtime.RequestRow("r", n, ((20, 80),))
    caches, outputs, rt = [], [], runtime.current()
    rt.begin_step()
    for layer_idx in (0, 1):
        builder = flash_builder(config, layer_idx)
        md = glue.KVSparseFlashAttentionMetadata.extend(
            FlashAttentionMetadataBuilder.build(builder, 0, cm), builder._plan(cm, [row]), None)
        kv_cache = torch.randn(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM)
        key_cache, value_cache = glue.flash_attn_kv_views(kv_cache, HEAD_DIM)
        for pos in range(n):
            key_cache[table[0, pos // BLOCK], pos % BLOCK] = k[pos] * (layer_idx + 1)
            value_cache[table[0, pos // BLOCK], pos % BLOCK] = v[pos] * (layer_idx + 1)
        with set_current_vllm_config(config):
            impl = glue.KVSparseFlashAttentionImpl(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS,
                                                   None, None, "auto")
        # FlashAttention's kernel is CUDA-only: dense attention stands in (it is not under test)
        monkeypatch.setattr(glue.FlashAttentionImpl, "forward",
                            lambda self, *a, **kw: a[-1].zero_())
        before = kv_cache.clone()
        out = torch.full_like(q, float("nan"))
        impl.forward(SimpleNamespace(layer_name=LAYER.replace(".0.", f".{layer_idx}.")),
                     q, k * (layer_idx + 1), v * (layer_idx + 1), kv_cache, md, out)
        assert torch.equal(kv_cache, before)            # nothing moved before the step ends
        assert not out.isnan().any()                    # attended (dense) in the layer
        caches.append((kv_cache, key_cache, value_cache))
    rec_dir = impl.sparsity.record_dir
    assert not os.path.isdir(rec_dir) or read_records(rec_dir) == []   # no decision yet
    rt.end_step()
    evictions = rt.take_evictions({"r"})
    records = {r["layer"]: r for r in read_records(impl.sparsity.record_dir)}
    assert sorted(records) == [0, 1] and all(r["method"] == "vlcache" for r in records.values())
    for layer_idx, (kv_cache, key_cache, value_cache) in enumerate(caches):
        kept = torch.tensor(records[layer_idx]["kept"])
        front, full = evictions["r"][layer_idx]
        assert full == n // BLOCK and 0 < front < full
        for j, pos in enumerate(kept[:front * BLOCK].tolist()):
            block, slot = table[0, j // BLOCK], j % BLOCK
            assert torch.equal(key_cache[block, slot], k[pos] * (layer_idx + 1))
            assert torch.equal(value_cache[block, slot], v[pos] * (layer_idx + 1))


ZIPVL_SMALL = {"tau": 0.5, "num_recent_probes": 8, "num_random_probes": 8}
# every method but fastv, which keeps all of layer k-1 and drops from layer k on (one layer
# here; fastv chunked: tests/e2e/test_chunked_prefill.py)


@pytest.mark.parametrize("method,options,chunks", [
    ("zipvl", ZIPVL_SMALL, [40, 30, 30]),
    ("zipvl", ZIPVL_SMALL, [17, 83]),
    ("snapkv", {"budget": 0.3, "window": 8}, [50, 45, 5]),
    ("pyramidkv", {"budget": 0.3, "window": 8}, [96, 4]),
    ("streamingllm", {"budget": 0.3}, [20, 80]),
    ("vlcache", {"budget": 0.3}, [64, 36]),
    ("aircache", {"budget": 0.3}, [5, 60, 35]),
    ("random", {"budget": 0.3}, [70, 30]),
])
def test_chunked_prompt_selects_as_one_step(tiny_model, tmp_path, monkeypatch, method, options,
                                            chunks):
    """A 100-token prompt prefilled in chunks through KVSparseFlashAttentionImpl.forward: the
    earlier chunks run dense and keep only the method's query rows; the completing chunk reads
    the earlier K/V back from FlashAttention's cache and selects exactly the set the same
    prompt prefilled in one step selects; its sparse rows' outputs equal that step's rows; the
    compacted cache and the eviction report are the same."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from vllm_kvsparse.attention import cuda as glue

    config = engine_config(tiny_model, tmp_path, monkeypatch, method, options)
    n, num_blocks = sum(chunks), 16
    q, k, v = peaked_prompt(n, seed=5)
    table = torch.tensor([[3, 9, 1, 12, 5, 7, 0, 15]], dtype=torch.int32)
    # FlashAttention's kernel is CUDA-only: a marker stands in for vLLM's dense rows
    monkeypatch.setattr(glue.FlashAttentionImpl, "forward",
                        lambda self, *a, **kw: a[-1].fill_(7.0))
    with set_current_vllm_config(config):
        impl = glue.KVSparseFlashAttentionImpl(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS,
                                               None, None, "auto")
    layer = SimpleNamespace(layer_name=LAYER)
    builder, rt = flash_builder(config), runtime.current()

    def run(req_id, step_lens):
        kv_cache = torch.zeros(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM)
        key_cache, value_cache = glue.flash_attn_kv_views(kv_cache, HEAD_DIM)
        out, done = torch.full_like(q, float("nan")), 0
        for c in step_lens:
            rt.begin_step()
            for pos in range(done, done + c):   # what do_kv_cache_update wrote before forward
                key_cache[table[0, pos // BLOCK], pos % BLOCK] = k[pos]
                value_cache[table[0, pos // BLOCK], pos % BLOCK] = v[pos]
            cm = common_metadata([c], [done + c], table)
            plan = builder._plan(cm, [runtime.RequestRow(req_id, n, ((10, 60),))])
            md = glue.KVSparseFlashAttentionMetadata.extend(
                FlashAttentionMetadataBuilder.build(builder, 0, cm), plan, None)
            s = slice(done, done + c)
            impl.forward(layer, q[s], k[s], v[s], kv_cache, md, out[s])
            rt.end_step()
            done += c
        return kv_cache, out, rt.take_evictions({req_id})

    one_cache, one_out, one_ev = run("one", [n])
    cache, out, ev = run("chunked", chunks)
    records = {r["req_id"]: r for r in read_records(impl.sparsity.record_dir)}
    assert 0 < len(records["one"]["kept"]) < n
    assert records["chunked"]["kept"] == records["one"]["kept"]
    assert ev["chunked"] == one_ev["one"]
    assert torch.equal(cache, one_cache)
    last = slice(n - chunks[-1], n)
    torch.testing.assert_close(out[last], one_out[last], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:n - chunks[-1]], torch.full_like(out[:n - chunks[-1]], 7.0))
    assert "chunked" not in rt._partials        # the kept query rows went with the step
