"""ZipVL sparse prefill of one request in one layer: the device-independent part of the glue.

Calls the pure selection math (vllm_kvsparse.zipvl) and the attention kernels
(vllm_kvsparse.kernels), and records the kept set. Shared by the CPU backend and the GPU one.
"""

from __future__ import annotations

import time

import torch

from vllm_kvsparse import runtime, zipvl
from vllm_kvsparse.config import SparsityConfig
from vllm_kvsparse.records import LayerRecord, Recorder

_RECORDER: Recorder | None = None


def recorder(cfg: SparsityConfig) -> Recorder:
    global _RECORDER
    if _RECORDER is None:
        _RECORDER = Recorder(cfg.record_dir)
    return _RECORDER


class SparsePrefill:
    def __init__(self, cfg: SparsityConfig, layer_idx: int, scale: float):
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.scale = scale
        self.recorder = recorder(cfg)

    def __call__(self, req_id: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 num_prompt: int, visual_ranges) -> torch.Tensor:
        """query [t, H, D], key/value [t, Hkv, D] of one request, prompt = the first num_prompt
        rows (t > num_prompt only when a preempted request is recomputed). Returns [t, H, D]."""
        n = num_prompt
        t0 = time.perf_counter()
        candidates = runtime.visual_mask(n, visual_ranges) if self.cfg.scope == "visual" else None
        sel = zipvl.select_important_tokens(
            query[:n], key[:n], tau=self.cfg.tau, num_recent=self.cfg.num_recent_probes,
            num_random=self.cfg.num_random_probes, keep_first=self.cfg.keep_first,
            keep_last=self.cfg.keep_last, scale=self.scale, seed=self.cfg.seed,
            candidate_mask=candidates)
        probe_seconds = time.perf_counter() - t0
        out = torch.empty_like(query)
        out[:n] = zipvl.sparse_prefill_attention_reference(
            query[:n], key[:n], value[:n], sel.indices, self.scale)
        if query.shape[0] > n:
            out[n:] = _dense_tail(query, key, value, n, self.scale)
        self.recorder.add(LayerRecord(
            req_id=req_id, layer=self.layer_idx, num_tokens=n,
            num_important=sel.num_important, num_kept=int(sel.indices.numel()),
            probe_seconds=probe_seconds,
            kept=sel.indices.tolist() if self.recorder.wants_indices else None))
        return out


def _dense_tail(query, key, value, start: int, scale: float) -> torch.Tensor:
    """Causal attention of rows [start, t) over all keys (recomputed output tokens)."""
    t, num_heads, _ = query.shape
    group = num_heads // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1).transpose(0, 1)      # [H, t, d]
    v = value.float().repeat_interleave(group, dim=1).transpose(0, 1)
    q = query[start:].float().transpose(0, 1)                            # [H, t-start, d]
    logits = torch.matmul(q, k.transpose(1, 2)) * scale
    future = torch.arange(t)[None, :] > torch.arange(start, t)[:, None]
    logits.masked_fill_(future, float("-inf"))
    return torch.matmul(torch.softmax(logits, -1), v).transpose(0, 1).to(query.dtype)
