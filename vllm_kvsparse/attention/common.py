"""The device-independent part of the plugin's attention backends (CPU and CUDA).

Two mixins, each placed before a vLLM class in the backend's MRO, so `super()` is vLLM's own
builder or impl (cpu.py: vLLM's CPU attention; cuda.py: vLLM's FlashAttention):

  KVSparseBuilderMixin.build   splits the step's batch into rows whose prompt is complete
                               after this step ("sparse rows", long enough), earlier chunks of
                               long prompts ("partial rows", dense now) and the rest ("dense
                               rows": decode, short prompts), and builds vLLM's metadata for
                               the dense rows alone. With eviction, decode rows of compacted
                               requests get a virtual block table that skips the freed blocks.
  KVSparseImplMixin.forward    dense rows: vLLM's kernel, as stock. Sparse rows: the method's
                               policy decides the kept set T (layer_sparsity.py); methods with a
                               sparse prefill (zipvl, fastv) attend T over T only, zeros for the
                               other rows (ZipVL §3.3), the others attend dense; one record per
                               (request, layer); with eviction, then `_compact_rows` (the one
                               device-specific step) moves the kept K/V to the front of the
                               layer's blocks. Methods that decide after every layer (vlcache,
                               aircache) register the layer with the worker's runtime and
                               compact at the end of the step. The device-specific steps:
                               `_compact_rows` and `_read_cached_kv` (cache layouts differ).

vLLM writes the step's K/V into the paged cache before `forward` (`do_kv_cache_update`, on both
backends), so the cache holds every prompt token computed so far when forward starts.

Chunked prefill: a prompt split over steps runs dense (vLLM's kernel) until the step that
completes it ("partial rows" before, a sparse row with `num_computed > 0` then). Each sparse
layer keeps, from the chunk that computes them, the query rows its method reads
(`Policy.query_rows`, runtime.PartialPrompt); at the completing step it reads the earlier
chunks' K/V back from the paged cache (`_read_cached_kv`, device-specific), so the method sees
the same probe queries and keys as in a one-step prefill and the rest is unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from vllm_kvsparse import eviction, metrics, runtime
from vllm_kvsparse.attention.layer_sparsity import LayerSparsity, RowSelection
from vllm_kvsparse.config import SparsityConfig

logger = logging.getLogger("vllm.kvsparse")


@dataclass
class SparseRow:
    """A request whose prompt (plus, after a preemption, its recomputed output tokens) is
    prefilled up to position num_computed + end - start in this step: batch tokens
    [start, end) are positions [num_computed, ...); prompt = the first num_prompt."""

    row: int
    req_id: str
    start: int
    end: int
    num_prompt: int
    visual_ranges: tuple[tuple[int, int], ...]
    num_computed: int = 0   # positions [0, num_computed) were computed in earlier steps (chunks)

    @property
    def completes_prompt(self) -> bool:
        return self.num_computed + self.end - self.start >= self.num_prompt


@dataclass
class StepPlan:
    sparse_rows: list[SparseRow]        # rows whose prompt is complete after this step
    dense_md: Any | None                # vLLM metadata of the dense rows alone
    dense_rows: torch.Tensor | None     # their row indices in the batch
    dense_tokens: torch.Tensor | None   # their token indices in the batch
    block_size: int | None              # set when this layer evicts
    partial_rows: list[SparseRow] = dataclasses.field(default_factory=list)
    # ^ chunks of long prompts that later steps complete: dense now, probe query rows kept


@dataclass
class RowInputs:
    """One sparse row's sequence so far, positions [0, t): the whole prompt (plus output
    tokens recomputed after a preemption). Slices of the step's tensors when the prompt is
    prefilled in one step; assembled from the cache and the kept query rows otherwise."""

    query: torch.Tensor   # [t, H, D]; with chunking only the method's query rows are real
    key: torch.Tensor     # [t, Hkv, D]
    value: torch.Tensor


@dataclass
class KVSparseMetadataFields:
    """The plugin's per-step fields on vLLM's attention metadata. Each backend declares its
    metadata type as `class KVSparseXMetadata(KVSparseMetadataFields, <vLLM's XMetadata>)`
    (this base first, so these defaulted fields come after vLLM's)."""

    kvsparse: StepPlan | None = None    # sparse rows of a prefill step (None: stock step)
    # decode rows of requests this layer compacted: (req_id, token start, end, position)
    kvsparse_decode: list[tuple[str, int, int, int]] | None = None

    @classmethod
    def extend(cls, md, plan: StepPlan | None, decode_rows):
        """vLLM's metadata `md` as this type, with the plugin's fields set."""
        new = object.__new__(cls)
        new.__dict__.update(vars(md))
        new.kvsparse, new.kvsparse_decode = plan, decode_rows
        return new


def sparsity_from(vllm_config) -> SparsityConfig:
    sparsity = SparsityConfig.from_additional_config(vllm_config.additional_config)
    if sparsity.enabled and sparsity.num_layers is None:
        # Sparsity was asked for, but the platform hooks that prepare vLLM for it never ran.
        raise RuntimeError(
            f"kv-sparsity={sparsity.method} was requested but the vllm-kvsparse platform is "
            "not active (is VLLM_TARGET_DEVICE exported, or another platform plugin "
            "installed? unset / remove it)")
    return sparsity


class KVSparseBuilderMixin:
    """Metadata builder half. Needs `self.block_size` and `build` from the vLLM builder, and
    `metadata_cls` (the backend's KVSparseMetadataFields subclass of vLLM's metadata)."""

    metadata_cls: type[KVSparseMetadataFields]

    def _init_sparsity(self, kv_cache_spec, vllm_config) -> None:
        self.sparsity = sparsity_from(vllm_config)
        # With eviction each group is one layer (KVSparseAttentionSpec.layer_idx).
        layer_idx = getattr(kv_cache_spec, "layer_idx", None)
        self.evict_layer = layer_idx if self.sparsity.evicts and layer_idx is not None else None
        if self.evict_layer is not None:
            # vLLM reuses one group's metadata for another group of an equal spec through
            # update_block_table; an evicting group's metadata (virtual block tables, its own
            # layer's compaction) must never be reused. (KVSparseAttentionSpecs of different
            # layers are never equal, so this only states what already holds.)
            self.supports_update_block_table = False

    def update_block_table(self, metadata, blk_table, slot_mapping):
        """vLLM's reuse of this metadata for another KV-cache group with an equal spec (eviction
        off, models with several groups): the dense rows' sub-metadata gets that group's block
        table and slots too, not only the full batch's."""
        new = super().update_block_table(metadata, blk_table, slot_mapping)
        plan = metadata.kvsparse
        if plan is not None and plan.dense_md is not None:
            rows = plan.dense_rows.to(blk_table.device)
            dense_md = super().update_block_table(
                plan.dense_md, blk_table[rows], slot_mapping[plan.dense_tokens])
            new.kvsparse = dataclasses.replace(plan, dense_md=dense_md)
        return new

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        if not self.sparsity.enabled:
            md = super().build(common_prefix_len, common_attn_metadata, fast_build)
            return self.metadata_cls.extend(md, None, None)
        rows = runtime.current().batch_rows(common_attn_metadata.num_reqs)
        cm, decode_rows = common_attn_metadata, None
        if rows is not None and self.evict_layer is not None:
            cm, decode_rows = self._virtual_view(common_attn_metadata, rows)
        md = super().build(common_prefix_len, cm, fast_build)
        plan = None
        if rows is not None:   # rows are classified by their true lengths, not the virtual ones
            plan = self._plan(cm, rows, _host_seq_lens(common_attn_metadata))
        return self.metadata_cls.extend(md, plan, decode_rows)

    def _virtual_view(self, cm, rows):
        """Decode rows of requests whose prompt this layer compacted read blocks [0, F) and the
        tail only. New tensors: the runner's buffers are shared by all groups. The decisions
        use host-side lengths; the device tensors are only written, never read back."""
        qsl = cm.query_start_loc_cpu.tolist()
        seq_lens_host = _host_seq_lens(cm)
        seq_lens, table = cm.seq_lens, cm.block_table_tensor
        decode_rows = []
        for i, row in enumerate(rows):
            layout = runtime.current().compaction(row.req_id, self.evict_layer)
            num_computed = seq_lens_host[i] - (qsl[i + 1] - qsl[i])
            if layout is None or num_computed < row.num_prompt_tokens:
                continue
            if table is cm.block_table_tensor:
                table, seq_lens = table.clone(), seq_lens.clone()
            table[i], skipped = eviction.virtual_block_row(
                cm.block_table_tensor[i], *layout, self.block_size)
            seq_lens[i] -= skipped
            seq_lens_host[i] -= skipped
            decode_rows.append((row.req_id, qsl[i], qsl[i + 1], num_computed))
        if not decode_rows:
            return cm, None
        host = torch.tensor(seq_lens_host, dtype=seq_lens.dtype)
        return cm.replace(seq_lens=seq_lens, block_table_tensor=table,
                          seq_lens_cpu_upper_bound=host,
                          max_seq_len=max(seq_lens_host[:cm.num_reqs])), decode_rows

    def _plan(self, cm, rows, true_seq_lens: list[int] | None = None) -> StepPlan | None:
        """Classify the step's rows. `cm` may be the virtual view (compacted decode rows'
        lengths shortened by the evicted blocks): `true_seq_lens` are the rows' real lengths,
        which alone say how much of a prompt was computed before this step."""
        qsl = cm.query_start_loc_cpu.tolist()
        seq_lens = _host_seq_lens(cm)
        true_seq_lens = seq_lens if true_seq_lens is None else true_seq_lens
        rt = runtime.current()
        sparse, partial, dense = [], [], []
        for i, row in enumerate(rows):
            start, end = qsl[i], qsl[i + 1]
            num_computed = true_seq_lens[i] - (end - start)
            n = row.num_prompt_tokens
            if num_computed >= n:              # decode, or recomputed outputs after the prompt
                dense.append(i)
                continue
            srow = SparseRow(i, row.req_id, start, end, n, row.visual_ranges, num_computed)
            selects = self.sparsity.selects(n)
            if num_computed == 0:
                rt.forget_partial(row.req_id)  # a new start (preemption): no stale chunk state
            if not selects or (num_computed > 0
                               and not rt.has_partial(row.req_id, num_computed)):
                dense.append(i)
                if srow.completes_prompt:
                    # a long prompt whose earlier chunks did not all keep their query rows
                    # (with the plugin's scheduler such prompts never read the prefix cache;
                    # a step that bypassed the attention backend would) is counted
                    rt.count_fallback_once(row.req_id,
                                           "unsupported" if selects else "short_prompt")
            elif srow.completes_prompt:
                sparse.append(srow)
            else:                              # an earlier chunk: dense now, query rows kept
                partial.append(srow)
                dense.append(i)
        if not sparse and not partial:
            return None
        block_size = self.block_size if self.evict_layer is not None else None
        if not sparse:   # nothing to attend sparsely: vLLM's kernel runs every row
            return StepPlan([], None, None, None, block_size, partial)
        return StepPlan(sparse, *self._dense_metadata(cm, dense, qsl, seq_lens), block_size,
                        partial)

    def _dense_metadata(self, cm, dense: list[int], qsl: list[int], seq_lens_host: list[int]):
        """vLLM metadata for a subset of the rows (their tokens gathered contiguously)."""
        if not dense:
            return None, None, None
        device = cm.query_start_loc.device
        lens = [qsl[i + 1] - qsl[i] for i in dense]
        tokens = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in dense]).to(device)
        starts_cpu = torch.tensor([0] + lens).cumsum(0).to(cm.query_start_loc.dtype)
        idx = torch.tensor(dense, device=device)
        seq_lens = cm.seq_lens[idx]
        host = torch.tensor([seq_lens_host[i] for i in dense], dtype=seq_lens.dtype)
        sub = cm.replace(
            query_start_loc=starts_cpu.to(device), query_start_loc_cpu=starts_cpu,
            seq_lens=seq_lens, seq_lens_cpu_upper_bound=host,
            num_reqs=len(dense), num_actual_tokens=int(tokens.numel()),
            max_query_len=max(lens), max_seq_len=int(host.max()),
            block_table_tensor=cm.block_table_tensor[idx],
            slot_mapping=cm.slot_mapping[tokens])
        # fast_build: no ahead-of-time FlashAttention-3 schedule for the sub-batch. With full
        # CUDA graphs allowed, FA3's builder stores that schedule in one shared buffer and returns
        # a view of it, so a second build in the step would overwrite the full batch's schedule
        # (used by exempt layers and keep-all rows). The sub-batch schedules itself at run time.
        return super().build(0, sub, fast_build=True), idx, tokens


def _own(key, value, are_views: bool):
    """key and value, copied if they are views of the step's tensors (reused next step)."""
    return (key.clone(), value.clone()) if are_views else (key, value)


def _host_seq_lens(cm) -> list[int]:
    """Per-row sequence lengths on the host. vLLM's host copy is exact for prefill rows and
    for decode rows without async scheduling (the plugin turns async scheduling off), and
    reading it avoids a device sync per layer on a GPU."""
    host = cm.seq_lens_cpu_upper_bound
    return (host if host is not None else cm.seq_lens.cpu())[:cm.num_reqs].tolist()


class KVSparseImplMixin:
    """Attention impl half. Device-specific: `_compact_rows` (cache layouts differ) and
    `compaction_reads_step_kv` (whether it re-writes kept tokens from the step's K/V)."""

    compaction_reads_step_kv: bool = True

    def _init_sparsity(self) -> None:
        from vllm.config import get_current_vllm_config

        self.sparsity = SparsityConfig.from_additional_config(
            get_current_vllm_config().additional_config)
        self._layer_sparsity: LayerSparsity | None = None
        self._layer_checked = False
        self._decode_log: dict[str, list] = {}

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        plan = attn_metadata.kvsparse if attn_metadata is not None else None
        if plan is None or self.attn_type != AttentionType.DECODER:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
            if attn_metadata is not None and attn_metadata.kvsparse_decode \
                    and self.sparsity.record_tensors:
                self._record_decode(layer, query, key, value, output, attn_metadata)
            return output
        sparsity = self._layer_sparsity_for(layer)
        if sparsity is None:  # exempt layer: dense for everyone
            metrics.sink().fallback("exempt_layer", len(plan.sparse_rows))
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        rt = runtime.current()
        block_table = attn_metadata.block_table
        for row in plan.partial_rows:
            self._keep_query_rows(rt, sparsity, row, query, key.shape[1])
        inputs = [self._row_inputs(rt, layer, row, query, key, value, kv_cache, block_table)
                  for row in plan.sparse_rows]
        # Decide first: rows the method attends sparsely get the sparse kernel; every other row
        # (decode, short prompts, earlier chunks, dense-prefill methods, keep-all selections)
        # runs through vLLM's kernel, so its output is bit-identical to stock vLLM.
        selections = [sparsity.decide(rt, row, inp.query, inp.key, plan.block_size)
                      for row, inp in zip(plan.sparse_rows, inputs)]
        sparse = [(row, sel, inp) for row, sel, inp in zip(plan.sparse_rows, selections, inputs)
                  if sel is not None and sel.sparse_attention]
        if not sparse or len(sparse) < len(plan.sparse_rows):
            # vLLM's kernel for every row (sparse rows' outputs are overwritten below)
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        elif plan.dense_md is not None:            # vLLM's kernel for the dense rows only
            tokens = plan.dense_tokens
            dense_out = torch.empty_like(output[tokens])
            super().forward(layer, query[tokens], key[tokens], value[tokens], kv_cache,
                            plan.dense_md, dense_out)
            output[tokens] = dense_out
        if self.sparsity.record_tensors:   # debug: dense prefills' K/V
            for row, sel, inp in zip(plan.sparse_rows, selections, inputs):
                if sel is None or not sel.sparse_attention:
                    sparsity.save_prefill_kv(row.req_id, inp.key, inp.value)
        kernel = self._sparse_kernel(layer, kv_cache) if sparse else None
        for row, sel, inp in sparse:
            out = sparsity.attend(sel, inp.query, inp.key, inp.value, kernel=kernel,
                                  first_row=row.num_computed)
            output[row.start:row.end] = out[row.num_computed:]
        if plan.block_size is None:
            return output
        for row, sel, inp in zip(plan.sparse_rows, selections, inputs):
            t = row.num_computed + row.end - row.start
            if sel is not None and t > sel.num_prompt and not sel.sparse_attention:
                # A recomputed request (preempted): its output tokens decoded over the kept set.
                # (Deferred methods decide only after every layer: their recomputed output
                # tokens attend over the whole prompt in this one step.)
                tail = sparsity.attend_outputs_after_prompt(sel, inp.query, inp.key, inp.value)
                output[row.end - tail.shape[0]:row.end] = tail
        # After every read of this layer's cache in this step: compact, then report.
        decided = [(row, sel, inp) for row, sel, inp in zip(plan.sparse_rows, selections, inputs)
                   if sel is not None]
        self._compact_and_note(rt, layer, decided, kv_cache, block_table, plan.block_size)
        waiting = [(row, inp) for row, sel, inp in zip(plan.sparse_rows, selections, inputs)
                   if sel is None]
        if waiting:
            self._defer(rt, layer, waiting, kv_cache, block_table, plan.block_size,
                        query.shape[1])
        return output

    def _keep_query_rows(self, rt, sparsity: LayerSparsity, row: SparseRow,
                         query: torch.Tensor, num_kv_heads: int) -> None:
        """An earlier chunk of a long prompt: keep the query rows the method will read."""
        partial = rt.partial_prompt(
            row.req_id, fresh=row.num_computed == 0,
            make_rows=lambda: sparsity.policy.query_rows(
                sparsity.prompt_info(row, query.shape[1], num_kv_heads)))
        partial.keep(sparsity.layer_idx, row.num_computed, query[row.start:row.end])

    def _row_inputs(self, rt, layer, row: SparseRow, query, key, value, kv_cache,
                    block_table) -> RowInputs:
        s, e = row.start, row.end
        if row.num_computed == 0:
            return RowInputs(query[s:e], key[s:e], value[s:e])
        # The completing chunk of a chunked prompt: earlier positions' K/V from the cache,
        # their query rows from what the earlier chunks kept.
        c = row.num_computed
        cached_key, cached_value = self._read_cached_kv(layer, kv_cache, block_table[row.row], c)
        partial = rt.partial_prompt(row.req_id, fresh=False, make_rows=None)
        full_query = partial.assemble(self._layer_sparsity.layer_idx, c, query[s:e])
        rt.prompt_completed(row.req_id)
        return RowInputs(full_query, torch.cat([cached_key.to(key.dtype), key[s:e]]),
                         torch.cat([cached_value.to(value.dtype), value[s:e]]))

    def _compact_and_note(self, rt, layer, rows, kv_cache, block_table, block_size) -> None:
        if not rows:
            return
        self._compact_rows(layer, rows, kv_cache, block_table, block_size)
        for row, sel, _ in rows:
            rt.note_compaction(row.req_id, self._layer_sparsity.layer_idx, sel.front_blocks,
                               sel.prompt_blocks)

    def _defer(self, rt, layer, rows, kv_cache, block_table, block_size, num_heads) -> None:
        """The method decides these rows only after every layer (VL-Cache, AirCache): keep
        this layer's K/V whole until the end of the step, then compact. CPU re-writes kept
        tokens from the rows' plain K/V, so those are copied (the prompt's K/V of every such
        layer lives until the step ends: the methods' documented dense peak); CUDA moves them
        inside the cache, which outlives the step."""
        head_dim = rows[0][1].key.shape[-1]
        # Keep only what compaction reads: nothing on CUDA (not even the step's query, which
        # would live, per layer, until the step ends); on CPU the K/V, copied where they are
        # views of the step's tensors (a chunked prompt's were assembled for this row).
        rows = [(row, RowInputs(None, *_own(inp.key, inp.value, row.num_computed == 0))
                 if self.compaction_reads_step_kv else RowInputs(None, None, None))
                for row, inp in rows]
        block_table = block_table.clone()
        sparsity = self._layer_sparsity

        def apply(choices) -> None:
            decided = [(row, sparsity.selection(row, choices[row.req_id], block_size, 0.0,
                                                num_heads, head_dim, rt.tp_rank), inp)
                       for row, inp in rows]
            self._compact_and_note(rt, layer, decided, kv_cache, block_table, block_size)

        rt.defer(runtime.DeferredLayer(sparsity.layer_idx, [row.req_id for row, _ in rows],
                                       apply))

    def _sparse_kernel(self, layer, kv_cache):
        """The backend's token-sparse attention
        ``(query, key, value, indices, scale, first_row=0) -> out``
        (contract of zipvl.sparse_prefill_attention_reference), or None for the default
        (layer_sparsity._sparse_attention: Triton on CUDA)."""
        return None

    def _compact_rows(self, layer, rows: list[tuple[SparseRow, RowSelection, RowInputs]],
                      kv_cache, block_table, block_size) -> None:
        """Make blocks [0, F) of each row's request hold its kept prompt tokens before
        M = prompt_blocks * block_size, in order (sel.indices[:F * block_size])."""
        raise NotImplementedError

    def _read_cached_kv(self, layer, kv_cache, block_row, num_tokens: int):
        """Plain (key, value) [num_tokens, Hkv, D] of positions [0, num_tokens) of one request
        from this layer's paged cache (block_row: its block-table row)."""
        raise NotImplementedError

    def _record_decode(self, layer, query, key, value, output, attn_metadata) -> None:
        """Debug (record_tensors): each decode token's q, k, v and output, per request, so a
        test can recompute decode attention over the recorded kept set."""
        for req_id, start, end, position in attn_metadata.kvsparse_decode:
            store = self._decode_log.setdefault(req_id, [])
            store.append({"position": position, "query": query[start:end].clone(),
                          "key": key[start:end].clone(), "value": value[start:end].clone(),
                          "output": output[start:end].clone()})
            torch.save(store, os.path.join(self.sparsity.record_dir,
                                           f"decode-{req_id}-{layer.layer_name}.pt"))

    def _layer_sparsity_for(self, layer) -> LayerSparsity | None:
        """This layer's side of the method, or None for an exempt layer (decided once). The
        layer index comes from vLLM's own parser of layer names, as the KV-cache specs'."""
        if not self._layer_checked:
            self._layer_checked = True
            layer_idx = extract_layer_index(layer.layer_name)
            if self.sparsity.layer_is_sparse(layer_idx):
                self._layer_sparsity = LayerSparsity(self.sparsity, layer_idx, self.scale)
            logger.debug("vllm-kvsparse: %s sparse=%s", layer.layer_name,
                         self._layer_sparsity is not None)
        return self._layer_sparsity
