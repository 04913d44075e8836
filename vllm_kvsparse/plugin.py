"""vLLM entry points (pyproject.toml). vLLM calls these in every process it starts."""

from __future__ import annotations

# The vLLM backend each platform uses for decoder attention, and the plugin's subclass of it.
_BACKENDS = {
    "cpu": ("CPU_ATTN", "vllm_kvsparse.attention.cpu.KVSparseCPUAttentionBackend"),
    "cuda": ("FLASH_ATTN", "vllm_kvsparse.attention.cuda.KVSparseFlashAttentionBackend"),
}


def activate_platform() -> str | None:
    """`vllm.platform_plugins`: the plugin's platform on a CPU or CUDA build of vLLM (vLLM's
    own platform plus the `--kv-sparsity` flags); None elsewhere (ROCm, XPU, TPU, ...), so vLLM
    picks its own platform and `--kv-sparsity` is an unknown flag there."""
    from vllm.platforms import cpu_platform_plugin, cuda_platform_plugin

    if cpu_platform_plugin() is not None:
        return "vllm_kvsparse.platform_cpu.KVSparseCpuPlatform"
    if cuda_platform_plugin() is not None:
        return "vllm_kvsparse.platform_cuda.KVSparseCudaPlatform"
    return None


def register() -> None:
    """`vllm.general_plugins`: process-local registrations, run once per process.

    The attention backend is registered by overriding its enum path (vLLM's
    `register_backend`): the platforms resolve their backend through that path, so the
    plugin's backend is used even where the platform plugin is skipped (VLLM_TARGET_DEVICE
    set). With sparsity off it behaves exactly like vLLM's; with sparsity on but the platform
    hooks not run, it refuses to start (attention/common.py).
    """
    from vllm.platforms import current_platform

    kind = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else None
    if kind is None:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    name, path = _BACKENDS[kind]
    register_backend(AttentionBackendEnum[name], path)
    from vllm_kvsparse.kv import register_specs
    register_specs()  # the worker builds KVSparseAttentionSpecs, the engine core reads them
