"""The plugin's CPU platform: vLLM 0.32's CpuPlatform plus the `--kv-sparsity` flags
(the shared hooks are in platform.KVSparsePlatformMixin). CPU adds a finer KV block size with
eviction."""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from vllm_kvsparse.platform import KVSparsePlatformMixin

EVICTION_BLOCK_SIZE = 32  # finer than the CPU default 128; the CPU kernels want multiples of 32


class KVSparseCpuPlatform(KVSparsePlatformMixin, CpuPlatform):
    """vLLM's CPU platform with the plugin's flags and start-up checks."""

    kvsparse_worker_cls = "vllm_kvsparse.cpu_worker.KVSparseCPUWorker"

    @classmethod
    def _adjust(cls, vllm_config, cfg, changed, block_size_was_set) -> None:
        if cfg.evicts and not block_size_was_set:
            # Eviction frees whole blocks: finer blocks free more (the CPU default is 128).
            vllm_config.cache_config.block_size = EVICTION_BLOCK_SIZE
            changed.append(f"block_size={EVICTION_BLOCK_SIZE}")
