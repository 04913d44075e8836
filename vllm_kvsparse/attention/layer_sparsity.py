"""One decoder layer's side of a KV-sparsity method, for every method: the device-independent
part of the glue, shared by the CPU and CUDA backends.

`LayerSparsity.decide` hands one request's prompt queries and keys to the method's policy
(vllm_kvsparse.policies) and turns its Choice into what the backend needs: the kept positions
(topped up to whole KV blocks when the layer evicts), a record and the metrics.
`LayerSparsity.attend` is the token-sparse attention of the methods whose prefill is sparse
(zipvl, fastv). On CUDA tensors the probe scores and the sparse attention run the project's
Triton kernels (vllm_kvsparse.kernels); on CPU tensors the torch paths (fp32, SDPA's fused
CPU kernel).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from vllm_kvsparse import eviction, kernels, metrics, zipvl
from vllm_kvsparse.config import SparsityConfig
from vllm_kvsparse.policies import Choice, LayerInput, PromptInfo
from vllm_kvsparse.records import LayerRecord, recorder
from vllm_kvsparse.runtime import WorkerRuntime, visual_mask


@dataclass
class RowSelection:
    req_id: str
    num_prompt: int
    indices: torch.Tensor   # kept prompt positions, ascending
    record: LayerRecord
    sparse_attention: bool            # attend over `indices` only in this step (zipvl, fastv)
    front_blocks: int | None = None   # with eviction: blocks [0, F) hold the kept tokens < M
    prompt_blocks: int | None = None  # with eviction: blocks entirely inside the prompt

    def kept_and_outputs(self, t: int, device) -> torch.Tensor:
        """The rows a recomputed request's output tokens [num_prompt, t) attend over, as its
        decode did with eviction on: the kept prompt positions, then the output tokens."""
        return torch.cat([self.indices.to(device),
                          torch.arange(self.num_prompt, t, device=device)])


class LayerSparsity:
    def __init__(self, cfg: SparsityConfig, layer_idx: int, scale: float):
        self.cfg = cfg
        self.policy = cfg.policy
        self.layer_idx = layer_idx
        self.scale = scale
        self.recorder = recorder(cfg.record_dir)

    def decide(self, runtime: WorkerRuntime, row, query: torch.Tensor, key: torch.Tensor,
               block_size: int | None) -> RowSelection | None:
        """The kept set of one request in this layer, from its prompt rows of query [t, H, D] /
        key [t, Hkv, D] (t > num_prompt only for a recomputed request); None when the method
        defers the decision to the end of the step."""
        n = row.num_prompt
        t0 = time.perf_counter()
        state = runtime.policy_state(
            row.req_id, self.policy, lambda: self.prompt_info(row, query.shape[1], key.shape[1]))
        choice = self.policy.layer(state, LayerInput(
            self.layer_idx, query[:n], key[:n], self.scale,
            scores_fn=_fused_probe_scores if query.is_cuda else None,
            shards=runtime.head_shards))
        if choice is None:
            return None
        return self.selection(row, choice, block_size, time.perf_counter() - t0,
                              num_heads=query.shape[1], head_dim=query.shape[2],
                              tp_rank=runtime.tp_rank)

    def prompt_info(self, row, num_heads: int, num_kv_heads: int) -> PromptInfo:
        """What the policy knows of one request's prompt (heads: this rank's)."""
        n = row.num_prompt
        mask = visual_mask(n, row.visual_ranges) if row.visual_ranges else None
        return PromptInfo(n, mask, self.cfg.num_layers, num_heads, num_kv_heads)

    def selection(self, row, choice: Choice, block_size: int | None, seconds: float,
                  num_heads: int, head_dim: int, tp_rank: int = 0) -> RowSelection:
        """A policy's Choice for one request as the backend uses it, recorded and counted."""
        n = row.num_prompt
        indices, front_blocks, prompt_blocks = choice.indices, None, None
        if block_size is not None:
            indices, front_blocks = eviction.kept_set_for_eviction(
                choice.indices, choice.priority, n, block_size)
            prompt_blocks = eviction.full_prompt_blocks(n, block_size)
        num_kept = int(indices.numel())
        record = LayerRecord(
            req_id=row.req_id, layer=self.layer_idx, method=self.cfg.method, num_tokens=n,
            num_important=choice.num_scored if choice.num_scored is not None else num_kept,
            num_kept=num_kept, probe_seconds=seconds,
            kept=indices.tolist() if self.recorder.wants_indices else None,
            visual_ranges=[list(r) for r in row.visual_ranges] if self.recorder.wants_indices
            else None, tp_rank=tp_rank)
        self.recorder.add(record)
        sparse_attention = self.policy.sparse_prefill and num_kept < n
        before = getattr(row, "num_computed", 0)   # chunked prompt: positions computed dense
        metrics.sink().observe_layer(
            self.layer_idx, n, num_kept, seconds, num_heads=num_heads, head_dim=head_dim,
            prefill_sparse=sparse_attention, num_before=before,
            kept_before=int((indices < before).sum()) if before else 0)
        return RowSelection(row.req_id, n, indices, record, sparse_attention, front_blocks,
                            prompt_blocks)

    def attend(self, sel: RowSelection, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, kernel=None, first_row: int = 0) -> torch.Tensor:
        """Attention output [t, H, D] of one request: prompt rows in T attend to T (causal by
        original position), other prompt rows are zero. Rows past the prompt (output tokens
        recomputed after a preemption) attend as decoding did: over T and the output tokens
        when eviction is on, over everything otherwise.

        ``kernel(query, key, value, indices, scale, first_row=...)`` is the backend's sparse
        attention (CPU: vLLM's own kernel over the kept rows, attention/cpu_kernel.py); None:
        the Triton kernel on CUDA tensors, the torch reference on CPU ones. ``first_row``: rows
        before it ran in earlier chunks; only rows from it on are needed (the others may be
        left zero)."""
        n, t = sel.num_prompt, query.shape[0]
        if self.cfg.evicts or t == n:
            out = _sparse_attention(query, key, value, sel.kept_and_outputs(t, query.device),
                                    self.scale, kernel=kernel, first_row=first_row)
        else:
            out = torch.empty_like(query)
            out[:n] = _sparse_attention(query[:n], key[:n], value[:n], sel.indices, self.scale,
                                        kernel=kernel, first_row=first_row)
            out[n:] = _dense_tail(query, key, value, n, self.scale)
        if self.cfg.record_tensors:
            name = getattr(kernel, "name", None) or (
                "triton" if query.is_cuda else "torch-reference")
            self._save_tensors(sel, query, key, value, out, name)
        return out

    def attend_outputs_after_prompt(self, sel: RowSelection, query: torch.Tensor,
                                    key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Rows [num_prompt, t) of a request recomputed after a preemption, under a method
        whose prefill is dense: they attend as decoding did before the preemption, over the
        kept prompt tokens and the output tokens (eviction on)."""
        rows = sel.kept_and_outputs(query.shape[0], query.device)
        return _sparse_attention(query, key, value, rows, self.scale)[sel.num_prompt:]

    def save_prefill_kv(self, req_id: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """Debug (record_tensors): a dense prefill's prompt K/V of this layer before eviction,
        so a test can recompute decode attention over the recorded kept set. The caller checks
        record_tensors (once per step, off the hot path when unset; the config makes it imply
        record_dir)."""
        torch.save({"key": key, "value": value, "scale": self.scale},
                   os.path.join(self.cfg.record_dir, f"prefill-{req_id}-layer{self.layer_idx}.pt"))

    def _save_tensors(self, sel, query, key, value, out, kernel: str) -> None:
        """Debug: the inputs and output of this layer's sparse prefill (and the kernel that
        computed it), for reference checks."""
        path = os.path.join(self.cfg.record_dir,
                            f"tensors-{sel.req_id}-layer{self.layer_idx}.pt")
        torch.save({"query": query, "key": key, "value": value, "output": out,
                    "kept": sel.indices, "scale": self.scale, "kernel": kernel}, path)


def _fused_probe_scores(query, key, probe_idx, scale, backend: str = "auto"):
    """Head-averaged probe-row column sums (ZipVL Eq. 6 / Eq. 8) by the fused Triton kernel
    (no [H, m, n] matrix); the policies' `scores_fn` on CUDA."""
    return kernels.compute_probe_scores(query[probe_idx], probe_idx, key, scale=scale,
                                        backend=backend)


def _sparse_attention(query, key, value, indices, scale, backend: str = "auto",
                      kernel=None, first_row: int = 0) -> torch.Tensor:
    """Causal attention among the kept rows of one sequence, zeros elsewhere: ``kernel`` when
    the backend gives one (CPU: vLLM's kernel), else the Triton gather-on-the-fly kernel on
    CUDA, SDPA over the gathered rows (the fp32 reference) on CPU. Rows before ``first_row``
    are not needed: the CPU paths skip them; the Triton kernel computes every kept row."""
    if kernel is not None:
        return kernel(query, key, value, indices, scale, first_row=first_row)
    if backend == "auto" and not query.is_cuda:
        return zipvl.sparse_prefill_attention_reference(query, key, value, indices, scale,
                                                        first_row=first_row)
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
