"""The sparse path's state in one worker process: one `WorkerRuntime`, owned by the worker.

No vLLM import. vLLM builds the attention backends itself and hands them no handle to the
worker, so the worker binds its runtime here (`bind`) and the backends reach it with
`current()`. Two lifetimes, each with explicit boundaries:

- per request (until the request leaves the batch: `take_evictions(live)` drops the rest):
  which blocks each layer compacted, whether a dense fallback was already counted, and, for a
  prompt prefilled in chunks, the query rows its method reads (PartialPrompt, until the step
  that completes the prompt, or until the prompt starts over after a preemption);
- per step (`begin_step` .. `end_step`, called by the worker around the model's forward): each
  request's policy state across the layers of the step, and the layers whose decision is
  deferred to the end of the step (methods whose layer budgets need every layer's scores).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vllm_kvsparse import metrics

logger = logging.getLogger("vllm.kvsparse")


@dataclass(frozen=True)
class RequestRow:
    """What the backend needs to know about one row of the step's batch."""

    req_id: str
    num_prompt_tokens: int
    visual_ranges: tuple[tuple[int, int], ...]  # [start, end) of image/video placeholders


def visual_mask(n: int, ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Bool [n]: True at image/video placeholder positions."""
    mask = torch.zeros(n, dtype=torch.bool)
    for start, end in ranges:
        mask[max(start, 0):min(end, n)] = True
    return mask


@dataclass
class DeferredLayer:
    """A layer whose kept sets are decided at the end of the step: `apply(decisions)` gets
    {req_id: Choice} for the rows it registered and compacts them."""

    layer_idx: int
    req_ids: list[str]
    apply: Callable[[dict[str, Any]], None]


class PartialPrompt:
    """A prompt prefilled over several steps (chunked prefill). Each sparse layer keeps, from
    the chunk that computes them, the query rows its method reads (`Policy.query_rows`): once
    a chunk ran, its queries are gone, and the step that completes the prompt needs them."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows.long().cpu()                    # ascending prompt positions
        self.queries: dict[int, torch.Tensor] = {}       # layer_idx -> [len(rows), H, D]
        self.computed = 0   # positions [0, computed) went through keep (every chunk seen)

    def keep(self, layer_idx: int, first: int, chunk_query: torch.Tensor) -> None:
        """chunk_query [c, H, D]: the queries of positions [first, first + c)."""
        if first == self.computed or first + chunk_query.shape[0] == self.computed:
            self.computed = first + chunk_query.shape[0]   # (the step's first layer advances)
        kept = self.queries.get(layer_idx)
        if kept is None:
            kept = self.queries[layer_idx] = chunk_query.new_zeros(
                (self.rows.numel(), *chunk_query.shape[1:]))
        inside = (self.rows >= first) & (self.rows < first + chunk_query.shape[0])
        if inside.any():
            where = torch.nonzero(inside).flatten()
            kept[where.to(kept.device)] = chunk_query[(self.rows[where] - first).to(kept.device)]

    def assemble(self, layer_idx: int, first: int, chunk_query: torch.Tensor) -> torch.Tensor:
        """The query [first + c, H, D] of positions [0, first + c): the kept rows before
        `first`, zeros at the rows no method reads, then the completing chunk."""
        full = chunk_query.new_zeros((first + chunk_query.shape[0], *chunk_query.shape[1:]))
        kept = self.queries.get(layer_idx)
        before = self.rows < first
        if kept is not None and before.any():
            full[self.rows[before].to(full.device)] = kept[before.to(kept.device)]
        full[first:] = chunk_query
        return full


@dataclass
class WorkerStep:
    """What lives from begin_step to end_step."""

    policy_states: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # req -> (policy, state)
    deferred: list[DeferredLayer] = field(default_factory=list)
    fresh_partials: set[str] = field(default_factory=set)     # first chunk computed this step
    completed_partials: set[str] = field(default_factory=set)  # last chunk computed this step


class WorkerRuntime:
    """runner: vLLM's model runner. head_shards: with tensor parallelism, how this rank's
    policies reduce their scores over the TP group (policies.HeadShards), else None.
    tp_rank: this worker's rank in its TP group; only rank 0 publishes metrics (every rank
    makes the same decisions, so the others would count them again)."""

    def __init__(self, runner=None, head_shards=None, tp_rank: int = 0):
        self.runner = runner
        self.head_shards = head_shards
        self.tp_rank = tp_rank
        # req_id -> {layer_idx: (front_blocks, prompt_blocks)} for compacted layers of live requests
        self._compacted: dict[str, dict[int, tuple[int, int]]] = {}
        # block ranges to report to the scheduler after this step: req_id -> {layer: (first, last)}
        self._pending: dict[str, dict[int, tuple[int, int]]] = {}
        self._fallback_counted: set[str] = set()
        self._partials: dict[str, PartialPrompt] = {}   # chunked prompts not yet complete
        self._unknown_rows_warned = False
        self.step = WorkerStep()

    # ---- the step's batch -------------------------------------------------------------------

    def batch_rows(self, num_reqs: int) -> list[RequestRow] | None:
        """Rows of the current step in metadata order, or None when unknown: dummy/profile runs
        (no live request), or a batch that does not match the runner's (counted, warned)."""
        runner = self.runner
        if runner is None or runner.input_batch.num_reqs == 0:
            return None
        batch = runner.input_batch
        if batch.num_reqs != num_reqs:
            return self._unknown_rows(f"metadata has {num_reqs} rows, the runner {batch.num_reqs}")
        rows = []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests.get(req_id)
            if state is None:
                return self._unknown_rows(f"request {req_id} is not in the runner")
            ranges = tuple(
                (f.mm_position.offset, f.mm_position.offset + f.mm_position.length)
                for f in (state.mm_features or []) if f.modality in ("image", "video"))
            rows.append(RequestRow(req_id, int(batch.num_prompt_tokens[i]), ranges))
        return rows

    def _unknown_rows(self, why: str) -> None:
        if not self._unknown_rows_warned:
            self._unknown_rows_warned = True
            logger.warning(
                "vllm-kvsparse: a step ran dense because its requests are unknown (%s)", why)
        metrics.sink().fallback("unsupported")
        return None

    # ---- step boundaries ----------------------------------------------------------------------

    def begin_step(self) -> None:
        self.step = WorkerStep()

    def policy_state(self, req_id: str, policy, make_prompt: Callable[[], Any]):
        """The request's policy state for this step (policy.begin on the first layer)."""
        entry = self.step.policy_states.get(req_id)
        if entry is None:
            entry = (policy, policy.begin(make_prompt()))
            self.step.policy_states[req_id] = entry
        return entry[1]

    def partial_prompt(self, req_id: str, fresh: bool,
                       make_rows: Callable[[], torch.Tensor] | None) -> PartialPrompt:
        """The request's chunked-prompt state; `fresh` (this step computes its first chunk)
        starts it anew once per step (a preempted request starts over)."""
        if fresh and req_id not in self.step.fresh_partials:
            self.step.fresh_partials.add(req_id)
            self._partials[req_id] = PartialPrompt(make_rows())
        return self._partials[req_id]

    def has_partial(self, req_id: str, num_computed: int) -> bool:
        """Whether every chunk before position num_computed kept its query rows."""
        partial = self._partials.get(req_id)
        return partial is not None and partial.computed == num_computed

    def forget_partial(self, req_id: str) -> None:
        """The request starts its prompt over (a preemption): drop its chunk state, unless
        this very step started it (several layers' builders ask)."""
        if req_id not in self.step.fresh_partials:
            self._partials.pop(req_id, None)

    def prompt_completed(self, req_id: str) -> None:
        """The request's prompt is complete in this step: drop its state at the step's end."""
        self.step.completed_partials.add(req_id)

    def defer(self, layer: DeferredLayer) -> None:
        self.step.deferred.append(layer)

    def end_step(self) -> None:
        """Decide the deferred layers (policy.finish once per request) and compact them."""
        step, self.step = self.step, WorkerStep()
        for req_id in step.completed_partials:
            self._partials.pop(req_id, None)
        if not step.deferred:
            return
        decisions: dict[str, dict[int, Any]] = {}
        for req_id in {r for layer in step.deferred for r in layer.req_ids}:
            policy, state = step.policy_states[req_id]
            decisions[req_id] = policy.finish(state)
        for layer in step.deferred:
            layer.apply({r: decisions[r][layer.layer_idx] for r in layer.req_ids})

    # ---- eviction bookkeeping ---------------------------------------------------------------

    def note_compaction(self, req_id: str, layer_idx: int, front_blocks: int,
                        prompt_blocks: int) -> None:
        """Layer `layer_idx` of `req_id` now holds its kept prompt tokens in blocks [0, F);
        blocks [F, prompt_blocks) are no longer read and are reported for freeing."""
        self._compacted.setdefault(req_id, {})[layer_idx] = (front_blocks, prompt_blocks)
        if front_blocks < prompt_blocks:
            self._pending.setdefault(req_id, {})[layer_idx] = (front_blocks, prompt_blocks)

    def compaction(self, req_id: str, layer_idx: int) -> tuple[int, int] | None:
        return self._compacted.get(req_id, {}).get(layer_idx)

    def take_evictions(self, live_req_ids) -> dict[str, dict[int, tuple[int, int]]]:
        """The step's block ranges to free; also drops the state of requests that are gone."""
        out, self._pending = self._pending, {}
        for req_id in [r for r in self._compacted if r not in live_req_ids]:
            del self._compacted[req_id]
        for req_id in [r for r in self._partials if r not in live_req_ids]:
            del self._partials[req_id]
        self._fallback_counted &= set(live_req_ids)
        return out

    def count_fallback_once(self, req_id: str, reason: str) -> None:
        """Every layer group's builder sees the request: count it once."""
        if req_id not in self._fallback_counted:
            self._fallback_counted.add(req_id)
            metrics.sink().fallback(reason)


_CURRENT = WorkerRuntime()


def bind(runtime: WorkerRuntime) -> WorkerRuntime:
    """Make `runtime` the process's runtime (the worker, at init_device; tests)."""
    global _CURRENT
    _CURRENT = runtime
    return runtime


def current() -> WorkerRuntime:
    return _CURRENT
