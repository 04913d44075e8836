"""The plugin's CPU platform: vLLM 0.32's CpuPlatform plus the `--kv-sparsity` flags
(the shared hooks are in platform.KVSparsePlatformMixin). CPU adds a finer KV block size with
eviction, and with `--kv-sparsity none` a worker that only works around a vLLM 0.32 CPU crash
(seeded requests with chunked prefill; chunked_seed.py)."""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from vllm_kvsparse.platform import KVSparsePlatformMixin

EVICTION_BLOCK_SIZE = 32  # finer than the CPU default 128; the CPU kernels want multiples of 32


class KVSparseCpuPlatform(KVSparsePlatformMixin, CpuPlatform):
    """vLLM's CPU platform with the plugin's flags and start-up checks."""

    kvsparse_worker_cls = "vllm_kvsparse.cpu_worker.KVSparseCPUWorker"
    # With --kv-sparsity none (or the plugin merely installed): vLLM's CPUWorker plus only the
    # workaround for vLLM 0.32's crash on seeded requests with chunked prefill (chunked_seed.py),
    # which the sparse worker carries too. Outputs are stock vLLM's wherever stock vLLM does
    # not crash.
    none_worker_cls = "vllm_kvsparse.cpu_worker.ChunkedSeedCPUWorker"

    @classmethod
    def _adjust(cls, vllm_config, cfg, changed, block_size_was_set) -> None:
        if cfg.evicts and not block_size_was_set:
            # Eviction frees whole blocks: finer blocks free more (the CPU default is 128).
            vllm_config.cache_config.block_size = EVICTION_BLOCK_SIZE
            changed.append(f"block_size={EVICTION_BLOCK_SIZE}")
