"""KV-cache pieces of eviction: one KV-cache group per decoder layer, so each layer can give
back its own number of blocks, and the model-runner output that tells the scheduler which.

Groups overlay one backing allocation (vLLM's hybrid KV-cache manager), so a block freed by
layer i can be used by layer j at once; one group per layer costs no extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import ModelRunnerOutput


@dataclass
class KVSparseModelRunnerOutput(ModelRunnerOutput):
    """vLLM's ModelRunnerOutput plus the step's evicted block ranges, from the worker to the
    plugin's scheduler: {req_id: {layer_idx: (first_block, last_block)}}."""

    kvsparse_evictions: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)

    @classmethod
    def extend(cls, output: ModelRunnerOutput, evictions) -> "KVSparseModelRunnerOutput":
        new = object.__new__(cls)
        new.__dict__.update(vars(output))
        new.kvsparse_evictions = evictions
        return new


@dataclass(frozen=True, kw_only=True)
class KVSparseAttentionSpec(FullAttentionSpec):
    """FullAttentionSpec of one decoder layer (layer_idx): never merged with another layer."""

    layer_idx: int = -1

    @classmethod
    def merge(cls, specs):
        if len({s.layer_idx for s in specs}) != 1:
            # vLLM's grouping catches AssertionError: different layers -> different groups.
            raise AssertionError("KVSparseAttentionSpec: one KV-cache group per layer")
        base = FullAttentionSpec.merge(specs)
        return cls(**{f.name: getattr(base, f.name) for f in fields(FullAttentionSpec)},
                   layer_idx=specs[0].layer_idx)

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(isinstance(s, KVSparseAttentionSpec) and s.layer_idx == self.layer_idx
                   for s in kv_cache_specs.values())


class KVSparseManager(FullAttentionManager):
    """Full-attention manager of one layer's group, plus eviction of a block range."""

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        """Publish no block of a request the plugin may compact (marked by the plugin's
        scheduler): compaction rewrites its front blocks in place and frees the others."""
        if getattr(request, "kvsparse_private", False):
            return
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def evict(self, request_id: str, first_block: int, last_block: int) -> int:
        """Free the request's logical blocks [first, last) (null block in their place, as vLLM's
        sliding-window managers do). Returns how many blocks went back to the pool."""
        before = self.block_pool.get_num_free_blocks()
        self._remove_blocks_in_range(request_id, first_block, last_block)
        return self.block_pool.get_num_free_blocks() - before


_registered = False


def register_specs() -> None:
    """Register the spec and its manager (idempotent; every process that builds or reads specs)."""
    global _registered
    if _registered:
        return
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    # Fill the registry with vLLM's built-ins first: it only does so while it is empty.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(KVSparseAttentionSpec, KVSparseManager,
                                 uniform_type_base_spec=KVSparseAttentionSpec)
    _registered = True
