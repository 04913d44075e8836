"""Engine-core side of eviction: frees the blocks the worker reports after each step.

The worker learns each layer's kept count only in the prefill forward, so it returns a
KVSparseModelRunnerOutput carrying `kvsparse_evictions = {req_id: {layer: (first, last)}}`,
which reaches the scheduler's update_from_output (this relies on synchronous scheduling: the
CUDA platform turns async scheduling off, the CPU platform never enables it). vLLM warns that
custom schedulers are not a public interface: this class only adds a step before the stock
update, and marks, on arrival, the prompts the method may compact as private to the prefix
cache (they neither read nor publish cached blocks; KVSparseManager.cache_blocks).
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvsparse import metrics
from vllm_kvsparse.config import SparsityConfig
from vllm_kvsparse.kv import KVSparseAttentionSpec, KVSparseModelRunnerOutput

logger = logging.getLogger("vllm.kvsparse")


class KVSparseScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.sparsity = SparsityConfig.from_additional_config(vllm_config.additional_config)
        # blocks freed are labelled with this engine's data-parallel rank
        metrics.sink("engine", engine=metrics.engine_index(vllm_config))

    def add_request(self, request) -> None:
        """Prefix caching with compaction: a prompt the method selects on is prefilled from
        its first token (no prefix-cache hit: selection scores all of its keys, and
        compaction rewrites its blocks in place) and publishes none of its blocks
        (KVSparseManager.cache_blocks): no other request can hit a block compaction
        rewrites or frees. Shorter prompts read and publish as in stock vLLM."""
        if self.sparsity.selects(request.num_prompt_tokens):
            request.skip_reading_prefix_cache = True
            request.kvsparse_private = True
        super().add_request(request)

    def update_from_output(self, scheduler_output, model_runner_output):
        if isinstance(model_runner_output, KVSparseModelRunnerOutput):
            self._evict(model_runner_output.kvsparse_evictions)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _evict(self, evictions: dict) -> None:
        managers = {m.kv_cache_spec.layer_idx: m
                    for m in self.kv_cache_manager.coordinator.single_type_managers
                    if isinstance(m.kv_cache_spec, KVSparseAttentionSpec)}
        for req_id, layers in evictions.items():
            if req_id not in self.requests:   # finished or aborted meanwhile: nothing to free
                continue
            freed = sum(managers[layer].evict(req_id, first, last)
                        for layer, (first, last) in layers.items())
            metrics.sink("engine").add("kv_blocks_freed", freed)
            logger.debug("vllm-kvsparse: req=%s freed %d KV blocks", req_id, freed)
        metrics.sink("engine").flush()
