"""vLLM CPU attention backend with ZipVL token-sparse prefill.

Subclasses vLLM 0.32's CPU backend (v1/attention/backends/cpu_attn.py). With sparsity off it
is vLLM's backend unchanged. With `--kv-sparsity zipvl`, per step:

  builder.build   splits the batch into rows whose whole prompt is prefilled now ("sparse rows",
                  long enough and not exempt) and the rest ("dense rows": decode, short prompts),
                  and builds vLLM's metadata for the dense rows alone.
  impl.forward    dense rows: vLLM's paged CPU kernel, as stock.
                  sparse rows: probe scores -> p -> important set T (zipvl.py), attention for
                  T over T only, zeros for the other rows (ZipVL §3.3), one record per layer.

The KV cache write is untouched (vLLM writes every prompt token); eviction is a later stage.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata,
                                                 CPUAttentionMetadataBuilder)

from vllm_kvsparse import runtime
from vllm_kvsparse.attention.sparse_prefill import SparsePrefill
from vllm_kvsparse.config import SparsityConfig

logger = logging.getLogger("vllm.kvsparse")

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@dataclass
class SparseRow:
    """A request whose whole prompt (plus, after a preemption, its recomputed output tokens)
    is prefilled in this step: batch tokens [start, end), prompt = the first num_prompt."""

    req_id: str
    start: int
    end: int
    num_prompt: int
    visual_ranges: tuple[tuple[int, int], ...]


@dataclass
class StepPlan:
    sparse_rows: list[SparseRow]
    dense_md: CPUAttentionMetadata | None   # vLLM metadata of the dense rows alone
    dense_tokens: torch.Tensor | None       # their token indices in the batch


class KVSparseCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # must stay an AttentionBackendEnum member name (attention.py:433)

    @staticmethod
    def get_impl_cls():
        return KVSparseCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return KVSparseCPUMetadataBuilder


class KVSparseCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.sparsity = SparsityConfig.from_additional_config(vllm_config.additional_config)
        if self.sparsity.enabled and self.sparsity.num_layers is None:
            # Sparsity was asked for, but the platform hooks that prepare vLLM for it never ran.
            raise RuntimeError(
                f"kv-sparsity={self.sparsity.method} was requested but the vllm-kvsparse "
                "platform is not active (is VLLM_TARGET_DEVICE=cpu exported? unset it)")

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        md.kvsparse = self._plan(common_attn_metadata) if self.sparsity.enabled else None
        return md

    def _plan(self, cm) -> StepPlan | None:
        rows = runtime.batch_rows(cm.num_reqs)
        if rows is None:  # profiling / dummy run
            return None
        qsl = cm.query_start_loc_cpu.tolist()
        seq_lens = cm.seq_lens.cpu().tolist()
        sparse, dense = [], []
        for i, row in enumerate(rows):
            start, end = qsl[i], qsl[i + 1]
            num_computed = seq_lens[i] - (end - start)
            whole_prompt_now = num_computed == 0 and end - start >= row.num_prompt_tokens
            if whole_prompt_now and row.num_prompt_tokens >= self.sparsity.min_prompt_len:
                sparse.append(SparseRow(row.req_id, start, end, row.num_prompt_tokens,
                                        row.visual_ranges))
            else:
                dense.append(i)
        if not sparse:
            return None
        return StepPlan(sparse, *self._dense_metadata(cm, dense, qsl))

    def _dense_metadata(self, cm, dense: list[int], qsl: list[int]):
        """vLLM metadata for a subset of the rows (their tokens gathered contiguously)."""
        if not dense:
            return None, None
        lens = [qsl[i + 1] - qsl[i] for i in dense]
        tokens = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in dense])
        starts = torch.tensor([0] + lens).cumsum(0).to(cm.query_start_loc.dtype)
        idx = torch.tensor(dense)
        seq_lens = cm.seq_lens[idx]
        sub = cm.replace(
            query_start_loc=starts, query_start_loc_cpu=starts, seq_lens=seq_lens,
            num_reqs=len(dense), num_actual_tokens=int(tokens.numel()),
            max_query_len=max(lens), max_seq_len=int(seq_lens.max()),
            block_table_tensor=cm.block_table_tensor[idx],
            slot_mapping=cm.slot_mapping[tokens])
        return super().build(0, sub), tokens


class KVSparseCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        self.sparsity = SparsityConfig.from_additional_config(
            get_current_vllm_config().additional_config)
        self._sparse_prefill: SparsePrefill | None = None
        self._layer_checked = False

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        plan = getattr(attn_metadata, "kvsparse", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        sparse_prefill = self._sparse_prefill_for(layer)
        if sparse_prefill is None:  # exempt layer: dense for everyone
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        # Select first: a row whose selection keeps every token is plain dense attention, and
        # runs through vLLM's kernel so its output is bit-identical to stock vLLM.
        selections = [sparse_prefill.select(row.req_id, query[row.start:row.end],
                                            key[row.start:row.end], row.num_prompt,
                                            row.visual_ranges) for row in plan.sparse_rows]
        partial = [(row, sel) for row, sel in zip(plan.sparse_rows, selections)
                   if not sel.keeps_all]
        if len(partial) < len(plan.sparse_rows):   # vLLM's kernel for every row, then overwrite
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        elif plan.dense_md is not None:            # vLLM's kernel for the dense rows only
            tokens = plan.dense_tokens
            dense_out = torch.empty_like(output[tokens])
            super().forward(layer, query[tokens], key[tokens], value[tokens], kv_cache,
                            plan.dense_md, dense_out)
            output[tokens] = dense_out
        for row, sel in partial:
            s, e = row.start, row.end
            output[s:e] = sparse_prefill.attend(sel, query[s:e], key[s:e], value[s:e])
        return output

    def _sparse_prefill_for(self, layer) -> SparsePrefill | None:
        """This layer's sparse prefill, or None for an exempt layer (decided once)."""
        if not self._layer_checked:
            self._layer_checked = True
            match = _LAYER_INDEX.search(layer.layer_name)
            layer_idx = int(match.group(1)) if match else -1
            if self.sparsity.layer_is_sparse(layer_idx):
                self._sparse_prefill = SparsePrefill(self.sparsity, layer_idx, self.scale)
            logger.debug("vllm-kvsparse: %s sparse=%s", layer.layer_name,
                         self._sparse_prefill is not None)
        return self._sparse_prefill
