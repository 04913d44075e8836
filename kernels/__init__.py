"""ZipVL kernels (installed as ``vllm_kvsparse.kernels``): one file per kernel, each holding a
torch ``*_reference`` and a Triton ``*_triton`` launcher. No vLLM import anywhere.

The functions below pick the implementation:
    backend="auto"   Triton on CUDA tensors, torch on anything else;
    backend="triton" Triton always (CPU tensors need TRITON_INTERPRET=1, i.e. tests);
    backend="torch"  the reference.
The choice is logged once per kernel (logger "vllm_kvsparse.kernels"). Errors are never
swallowed: a failing Triton launch raises, it does not fall back to torch. Nothing here imports
triton until a Triton path is taken, so the CPU runtime does not depend on it.
(The dispatchers are not named after their modules on purpose: importing the submodule
``probe_scores`` would overwrite a package attribute of the same name.)
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

logger = logging.getLogger("vllm_kvsparse.kernels")
_announced: set[tuple[str, str]] = set()

__all__ = ["compute_probe_scores", "sparse_prefill_attention", "compact_kv", "compact_blocks",
           "choose_backend"]


def choose_backend(kernel: str, tensor: torch.Tensor, backend: str = "auto") -> str:
    """Resolve ``backend`` for ``kernel`` given the tensors' device; log the choice once."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "triton" if tensor.is_cuda else "torch"
    if backend == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{kernel}: Triton on {tensor.device} tensors needs "
                           f"TRITON_INTERPRET=1 set before triton is imported")
    if (kernel, backend) not in _announced:
        _announced.add((kernel, backend))
        logger.info("kernel %s: using the %s implementation (%s tensors)", kernel, backend,
                    tensor.device.type)
    return backend


def _impl(module: str, kernel: str, backend: str):
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, f"{kernel}_{'triton' if backend == 'triton' else 'reference'}")


def compute_probe_scores(probe_query: torch.Tensor, probe_pos: torch.Tensor,
                         key: torch.Tensor | None = None, *, scale: float | None = None,
                         key_cache: torch.Tensor | None = None,
                         block_table: torch.Tensor | None = None, seq_len: int | None = None,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """ZipVL Eq. 6 / Eq. 8 column scores ``(accumulated [n], normalized [n])`` fp32 from
    probe queries [m, H, d] at positions [m], against dense keys [n, Hkv, d] or the paged
    ``key_cache`` [num_blocks, block_size, Hkv, d] + ``block_table`` [max_blocks] + ``seq_len``.
    See kernels/probe_scores.py."""
    backend = choose_backend("probe_scores", probe_query, backend)
    return _impl("probe_scores", "probe_scores", backend)(
        probe_query, probe_pos, key, scale=scale, key_cache=key_cache,
        block_table=block_table, seq_len=seq_len)


def sparse_prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             indices: torch.Tensor, cu_seqlens: torch.Tensor,
                             cu_indices: torch.Tensor, *, scale: float | None = None,
                             max_kept: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention among the kept tokens only (varlen batch); zeros for other rows.
    See kernels/sparse_attention.py for shapes."""
    backend = choose_backend("sparse_attention", query, backend)
    impl = _impl("sparse_attention", "sparse_attention", backend)
    if backend == "triton":
        return impl(query, key, value, indices, cu_seqlens, cu_indices, scale=scale,
                    max_kept=max_kept)
    return impl(query, key, value, indices, cu_seqlens, cu_indices, scale=scale)


def compact_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
               kept: torch.Tensor, cu_kept: torch.Tensor, *, backend: str = "auto") -> None:
    """In place: each request's kept K/V rows move, in order, to its first slots (GPU paged
    layout [num_blocks, block_size, Hkv, d]). See kernels/kv_compaction.py."""
    backend = choose_backend("kv_compaction", key_cache, backend)
    _impl("kv_compaction", "compact_kv", backend)(key_cache, value_cache, block_tables, kept,
                                                  cu_kept)


def compact_blocks(kv_cache: torch.Tensor, block_table_row: torch.Tensor,
                   src_blocks: torch.Tensor, dst_blocks: torch.Tensor) -> None:
    """Whole-block compaction for any layout whose dim 0 is the block (vLLM's CPU cache).
    Plain torch indexing on every device."""
    choose_backend("block_compaction", kv_cache, "torch")
    _impl("kv_compaction", "compact_blocks", "torch")(kv_cache, block_table_row, src_blocks,
                                                      dst_blocks)
