"""vLLM CPU attention backend with ZipVL token-sparse prefill and KV eviction.

Subclasses vLLM 0.32's CPU backend (v1/attention/backends/cpu_attn.py); everything but the
compaction write and the read-back of earlier chunks' K/V (both in vLLM's ISA-specific block
layout) is shared with the CUDA backend (common.py). With sparsity off it is vLLM's
backend unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata,
                                                 CPUAttentionMetadataBuilder)

from vllm import _custom_ops as ops

from vllm_kvsparse.attention import cache_read, cpu_kernel
from vllm_kvsparse.attention.common import (KVSparseBuilderMixin, KVSparseImplMixin,
                                            KVSparseMetadataFields)


class KVSparseCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # must stay an AttentionBackendEnum member name (attention.py:433)

    @staticmethod
    def get_impl_cls():
        return KVSparseCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return KVSparseCPUMetadataBuilder


@dataclass
class KVSparseCPUAttentionMetadata(KVSparseMetadataFields, CPUAttentionMetadata):
    pass


class KVSparseCPUMetadataBuilder(KVSparseBuilderMixin, CPUAttentionMetadataBuilder):
    metadata_cls = KVSparseCPUAttentionMetadata

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_sparsity(kv_cache_spec, vllm_config)


class KVSparseCPUAttentionImpl(KVSparseImplMixin, CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_sparsity()

    def _sparse_kernel(self, layer, kv_cache):
        """The CPU's sparse attention kernel (cpu_kernel.choose_kernel): vLLM's own CPU
        attention kernel over the kept rows (cpu_kernel.py), in the cache dtype and the layer's
        ISA, as dense prefill runs it (AMX or AVX-512 CPUs); on an AVX2-only CPU the fp32 torch
        SDPA path, which is faster per FLOP there. Returns None for the torch path
        (layer_sparsity's default)."""
        if cpu_kernel.choose_kernel(self.sparsity.cpu_sparse_kernel, layer.isa) == "torch":
            return None
        spec = cpu_kernel.CPUKernelSpec(
            isa=layer.isa, block_size=kv_cache.shape[2], cache_dtype=kv_cache.dtype,
            kv_cache_dtype=self.kv_cache_dtype, k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float)
        kernel = functools.partial(cpu_kernel.sparse_prefill_attention, spec=spec)
        kernel.name = f"vllm-cpu-attn:{spec.isa}"
        return kernel

    def _compact_rows(self, layer, rows, kv_cache, block_table, block_size) -> None:
        """The CPU cache's element order inside a block is ISA-specific (vLLM 0.32's
        cpu_attn.py packs it per ISA for its kernels), so the kept tokens are re-written
        through vLLM's own cache-write op from the rows' plain K/V rather than moved inside
        the cache."""
        num_blocks, num_kv_heads, _, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(
            num_blocks, num_kv_heads, block_size * 2, -1).chunk(2, dim=2)
        for row, sel, inp in rows:
            front = sel.front_blocks
            if front >= sel.prompt_blocks:
                continue
            kept_front = sel.indices[:front * block_size].to(inp.key.device)
            slots = torch.arange(front * block_size, device=inp.key.device)
            slots = block_table[row.row, slots // block_size].long() * block_size \
                + slots % block_size
            ops.cpu_attn_reshape_and_cache(
                inp.key[kept_front], inp.value[kept_front], key_cache, value_cache, slots,
                layer.isa, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                kv_cache_dtype=self.kv_cache_dtype)

    def _read_cached_kv(self, layer, kv_cache, block_row, num_tokens: int):
        """Earlier chunks' K/V, read back in the layout vLLM's cache-write op produced for
        this layer's ISA (cache_read.py learns it from that op)."""
        return cache_read.read_cpu_kv(kv_cache, block_row, num_tokens, layer.isa,
                                      kv_cache.shape[2], self.kv_cache_dtype)
