"""The plugin's CUDA platform: vLLM 0.32's CudaPlatform plus the `--kv-sparsity` flags.

A separate module from platform.py because `vllm.platforms.cuda` only imports on a CUDA build
of vLLM. The shared hooks are in platform.KVSparsePlatformMixin; CUDA adds:
  - the sparse path wraps vLLM's FlashAttention backend (attention/cuda.py), so FlashAttention
    is selected when no backend was asked for, and any other backend is refused;
  - FlashAttention needs compute capability >= 8.0 (A100, 4090, H100, ...);
  - async scheduling off: the worker reports evicted blocks and flushes metrics on the
    ModelRunnerOutput of the step, which async scheduling defers into a wrapper;
  - no quantized KV cache: with `--kv-cache-dtype fp8*` (or another quantized dtype) vLLM quantizes the query before the backend's
    forward, and the Triton probe and sparse-attention kernels take 16/32-bit inputs only.
    Refused at start-up rather than dequantized (no GPU has been available to test a
    dequantizing path). vLLM's CPU backend keeps K/V in the plain step tensors, so CPU serves
    fp8 caches (tests/e2e/test_sparse_prefill.py).
"""

from __future__ import annotations

from vllm.platforms.cuda import CudaPlatform

from vllm_kvsparse.config import SparsityConfig, SparsityConfigError
from vllm_kvsparse.platform import KVSparsePlatformMixin

SPARSE_BACKEND = "FLASH_ATTN"


def check_attention_backend(vllm_config, cfg: SparsityConfig, capability) -> None:
    """Refuse an attention backend or a GPU the sparse path does not wrap (one line)."""
    chosen = vllm_config.attention_config.backend
    if chosen is not None and chosen.name != SPARSE_BACKEND:
        raise SparsityConfigError(
            f"kv-sparsity={cfg.method} runs on the {SPARSE_BACKEND} attention backend; got "
            f"--attention-backend={chosen.name} (use {SPARSE_BACKEND} or leave it unset)")
    if capability is not None and capability.to_int() < 80:
        raise SparsityConfigError(
            f"kv-sparsity={cfg.method} needs FlashAttention, i.e. a GPU of compute capability "
            f">= 8.0; this GPU is {capability.major}.{capability.minor}")


UNQUANTIZED_CACHE_DTYPES = ("auto", "bfloat16", "float16")


def check_kv_cache_dtype(vllm_config, cfg: SparsityConfig) -> None:
    """Refuse a quantized (fp8, fp4, ...) KV cache (one line)."""
    dtype = str(vllm_config.cache_config.cache_dtype)
    if dtype not in UNQUANTIZED_CACHE_DTYPES:
        raise SparsityConfigError(
            f"kv-sparsity={cfg.method} does not support --kv-cache-dtype={dtype} on CUDA (the "
            "sparse kernels take 16/32-bit queries); use --kv-cache-dtype auto, bfloat16 or "
            "float16, or --kv-sparsity none")


def select_attention_backend(vllm_config, changed: list[str]) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if vllm_config.attention_config.backend is None:
        vllm_config.attention_config.backend = AttentionBackendEnum[SPARSE_BACKEND]
        changed.append(f"attention backend {SPARSE_BACKEND}")


def disable_async_scheduling(vllm_config, changed: list[str]) -> None:
    if vllm_config.scheduler_config.async_scheduling:
        vllm_config.scheduler_config.async_scheduling = False
        changed.append("async scheduling off")


class KVSparseCudaPlatform(KVSparsePlatformMixin, CudaPlatform):
    """vLLM's CUDA platform with the plugin's flags and start-up checks."""

    kvsparse_worker_cls = "vllm_kvsparse.gpu_worker.KVSparseGPUWorker"

    @classmethod
    def _check_platform(cls, vllm_config, cfg) -> None:
        if cfg.enabled:
            check_attention_backend(vllm_config, cfg, cls.get_device_capability())
            check_kv_cache_dtype(vllm_config, cfg)

    @classmethod
    def _adjust(cls, vllm_config, cfg, changed, block_size_was_set) -> None:
        select_attention_backend(vllm_config, changed)
        disable_async_scheduling(vllm_config, changed)
