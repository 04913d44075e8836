"""ZipVL sparse prefill of one request in one layer: the device-independent part of the glue.

Calls the pure selection math (vllm_kvsparse.zipvl) and the attention kernels, and records the
kept set. Shared by the CPU and CUDA backends. On CUDA tensors the probe scores and the sparse
attention run the project's Triton kernels (vllm_kvsparse.kernels); on CPU tensors the torch
paths of zipvl.py (fp32, SDPA's fused CPU kernel).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from vllm_kvsparse import eviction, kernels, metrics, runtime, zipvl
from vllm_kvsparse.config import SparsityConfig
from vllm_kvsparse.records import LayerRecord, Recorder

_RECORDER: Recorder | None = None


def recorder(cfg: SparsityConfig) -> Recorder:
    global _RECORDER
    if _RECORDER is None:
        _RECORDER = Recorder(cfg.record_dir)
    return _RECORDER


@dataclass
class RowSelection:
    req_id: str
    num_prompt: int
    indices: torch.Tensor   # kept prompt positions, ascending
    record: LayerRecord
    front_blocks: int | None = None   # with eviction: blocks [0, F) hold the kept tokens < M
    prompt_blocks: int | None = None  # with eviction: blocks entirely inside the prompt

    @property
    def keeps_all(self) -> bool:
        return self.indices.numel() == self.num_prompt


class SparsePrefill:
    def __init__(self, cfg: SparsityConfig, layer_idx: int, scale: float):
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.scale = scale
        self.recorder = recorder(cfg)

    def select(self, req_id: str, query: torch.Tensor, key: torch.Tensor, num_prompt: int,
               visual_ranges, block_size: int | None = None) -> RowSelection:
        """ZipVL's important set over the first num_prompt rows of one request's
        query [t, H, D] / key [t, Hkv, D] (t > num_prompt only for a recomputed request)."""
        n = num_prompt
        t0 = time.perf_counter()
        candidates = runtime.visual_mask(n, visual_ranges) if self.cfg.scope == "visual" else None
        sel = zipvl.select_important_tokens(
            query[:n], key[:n], tau=self.cfg.tau, num_recent=self.cfg.num_recent_probes,
            num_random=self.cfg.num_random_probes, keep_first=self.cfg.keep_first,
            keep_last=self.cfg.keep_last, scale=self.scale, seed=self.cfg.seed,
            candidate_mask=candidates,
            scores_fn=_fused_probe_scores if query.is_cuda else None)
        indices, front_blocks, prompt_blocks = sel.indices, None, None
        if block_size is not None:
            indices, front_blocks = eviction.kept_set_for_eviction(
                sel.indices, sel.normalized, n, block_size)
            prompt_blocks = eviction.full_prompt_blocks(n, block_size)
        record = LayerRecord(
            req_id=req_id, layer=self.layer_idx, num_tokens=n,
            num_important=sel.num_important, num_kept=int(indices.numel()),
            probe_seconds=time.perf_counter() - t0,
            kept=indices.tolist() if self.recorder.wants_indices else None,
            visual_ranges=[list(r) for r in visual_ranges] if self.recorder.wants_indices
            else None)
        self.recorder.add(record)
        metrics.sink().observe_layer(self.layer_idx, n, record.num_kept, record.probe_seconds,
                                     num_heads=query.shape[1], head_dim=query.shape[2])
        return RowSelection(req_id, n, indices, record, front_blocks, prompt_blocks)

    def attend(self, sel: RowSelection, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> torch.Tensor:
        """Attention output [t, H, D] of one request: prompt rows in T attend to T (causal by
        original position), other prompt rows are zero. Rows past the prompt (output tokens
        recomputed after a preemption) attend as decoding did: over T and the output tokens
        when eviction is on, over everything otherwise."""
        n, t = sel.num_prompt, query.shape[0]
        out = torch.empty_like(query)
        if self.cfg.evicts or t == n:
            rows = torch.cat([sel.indices.to(query.device), torch.arange(n, t, device=query.device)])
            out[:] = _sparse_attention(query, key, value, rows, self.scale)
        else:
            out[:n] = _sparse_attention(query[:n], key[:n], value[:n], sel.indices, self.scale)
            out[n:] = _dense_tail(query, key, value, n, self.scale)
        if self.cfg.record_dir and self.cfg.record_tensors:
            self._save_tensors(sel, query, key, value, out)
        return out

    def _save_tensors(self, sel, query, key, value, out) -> None:
        """Debug: the inputs and output of this layer's sparse prefill, for reference checks."""
        path = os.path.join(self.cfg.record_dir,
                            f"tensors-{sel.req_id}-layer{self.layer_idx}.pt")
        torch.save({"query": query, "key": key, "value": value, "output": out,
                    "kept": sel.indices, "scale": self.scale}, path)


def _fused_probe_scores(query, key, probe_idx, scale, backend: str = "auto"):
    """Eq. 6 / Eq. 8 scores by the fused Triton kernel (no [H, m, n] matrix)."""
    return kernels.compute_probe_scores(query[probe_idx], probe_idx, key, scale=scale,
                                        backend=backend)


def _sparse_attention(query, key, value, indices, scale, backend: str = "auto") -> torch.Tensor:
    """Causal attention among the kept rows of one sequence, zeros elsewhere: the Triton
    gather-on-the-fly kernel on CUDA, SDPA over the gathered rows on CPU."""
    if backend == "auto" and not query.is_cuda:
        return zipvl.sparse_prefill_attention_reference(query, key, value, indices, scale)
    bounds = torch.tensor([0, query.shape[0]], dtype=torch.int32, device=query.device)
    kept = torch.tensor([0, indices.numel()], dtype=torch.int32, device=query.device)
    return kernels.sparse_prefill_attention(query, key, value, indices, bounds, kept,
                                            scale=scale, max_kept=indices.numel(),
                                            backend=backend)


def _dense_tail(query, key, value, start: int, scale: float) -> torch.Tensor:
    """Causal attention of rows [start, t) over all keys (recomputed output tokens)."""
    t, num_heads, _ = query.shape
    group = num_heads // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1).transpose(0, 1)      # [H, t, d]
    v = value.float().repeat_interleave(group, dim=1).transpose(0, 1)
    q = query[start:].float().transpose(0, 1)                            # [H, t-start, d]
    logits = torch.matmul(q, k.transpose(1, 2)) * scale
    positions = torch.arange(t, device=query.device)   # on the logits' device (CUDA on a GPU)
    future = positions[None, :] > positions[start:, None]
    logits.masked_fill_(future, float("-inf"))
    return torch.matmul(torch.softmax(logits, -1), v).transpose(0, 1).to(query.dtype)
