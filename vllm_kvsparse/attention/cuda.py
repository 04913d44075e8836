"""vLLM FlashAttention backend (the default on CUDA) with ZipVL token-sparse prefill and KV
eviction.

Subclasses vLLM 0.32's FlashAttention backend (v1/attention/backends/flash_attn.py); the plan,
selection, sparse attention and bookkeeping are shared with the CPU backend (common.py). What
is CUDA-specific is only:
  - the compaction: FlashAttention's cache is plain [block, slot, kv_head, head_dim] per K and
    V (strided views of the layer's tensor), so kept tokens are moved inside the cache by the
    project's Triton kernel (vllm_kvsparse.kernels.compact_kv), one launch per layer and step;
  - CUDA graphs: the plan and the virtual block tables are Python-side, per step. Full graphs
    are therefore limited to pure single-token decode batches, and disabled with eviction on
    (decode rows then read per-layer virtual tables that a captured graph would not see);
    piecewise graphs, which run attention eagerly, stay on. vLLM itself downgrades the graph
    mode from what the builder reports (`get_cudagraph_support`).
The probe-score and sparse-attention kernels are picked in layer_sparsity.py by the tensors'
device (Triton on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadata,
                                                   FlashAttentionMetadataBuilder)

from vllm_kvsparse.attention.common import (KVSparseBuilderMixin, KVSparseImplMixin,
                                            KVSparseMetadataFields, sparsity_from)
from vllm_kvsparse.attention.flash_cache import (compact_in_cache, flash_attn_kv_views,
                                                 read_flash_kv)

__all__ = ["KVSparseFlashAttentionBackend", "KVSparseFlashAttentionImpl",
           "KVSparseFlashAttentionMetadata", "KVSparseFlashAttentionMetadataBuilder",
           "compact_in_cache", "flash_attn_kv_views"]


class KVSparseFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "FLASH_ATTN"  # must stay an AttentionBackendEnum member name

    @staticmethod
    def get_impl_cls():
        return KVSparseFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return KVSparseFlashAttentionMetadataBuilder


@dataclass
class KVSparseFlashAttentionMetadata(KVSparseMetadataFields, FlashAttentionMetadata):
    pass


class KVSparseFlashAttentionMetadataBuilder(KVSparseBuilderMixin, FlashAttentionMetadataBuilder):
    metadata_cls = KVSparseFlashAttentionMetadata

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_sparsity(kv_cache_spec, vllm_config)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        stock = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        sparsity = sparsity_from(vllm_config)
        if not sparsity.enabled:
            return stock
        wanted = (AttentionCGSupport.NEVER if sparsity.evicts
                  else AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
        return wanted if wanted.value < stock.value else stock


class KVSparseFlashAttentionImpl(KVSparseImplMixin, FlashAttentionImpl):
    compaction_reads_step_kv = False   # kept tokens move inside the cache

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_sparsity()

    def _compact_rows(self, layer, rows, kv_cache, block_table, block_size) -> None:
        key_cache, value_cache = flash_attn_kv_views(kv_cache, self.head_size)
        compact_in_cache(key_cache, value_cache, block_table,
                         [(row, sel) for row, sel, _ in rows], block_size)

    def _read_cached_kv(self, layer, kv_cache, block_row, num_tokens: int):
        """Earlier chunks' K/V: FlashAttention's cache is plain [block, slot, head, dim]."""
        return read_flash_kv(kv_cache, block_row, num_tokens, self.head_size)
