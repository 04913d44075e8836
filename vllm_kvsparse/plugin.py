"""vLLM entry points (pyproject.toml). vLLM calls these in every process it starts."""

from __future__ import annotations


def activate_platform() -> str | None:
    """`vllm.platform_plugins`: on a CPU build of vLLM, use the plugin's CPU platform.

    Returns None elsewhere, so vLLM picks its own platform (the GPU path is not wired yet:
    there `--kv-sparsity` is not a known flag and vLLM rejects it).
    """
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is not None:
        return "vllm_kvsparse.platform.KVSparseCpuPlatform"
    return None


def register() -> None:
    """`vllm.general_plugins`: process-local registrations, run once per process.

    The CPU attention backend is registered by overriding the CPU_ATTN enum path (vLLM's
    `register_backend`): CPU platforms resolve their backend through that path, so the plugin's
    backend is used even where the platform plugin is skipped (VLLM_TARGET_DEVICE=cpu). With
    sparsity off it behaves exactly like vLLM's; with sparsity on but the platform hooks not
    run, it refuses to start (see attention/cpu.py).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN,
                     "vllm_kvsparse.attention.cpu.KVSparseCPUAttentionBackend")
    from vllm_kvsparse.kv import register_specs
    register_specs()  # the worker builds KVSparseAttentionSpecs, the engine core reads them
