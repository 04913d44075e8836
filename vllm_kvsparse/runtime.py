"""Process-local state of a worker process, shared by the worker and the attention backend.

No vLLM import: the worker binds its model runner here, the metadata builder reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_RUNNER = None


def bind_runner(runner) -> None:
    global _RUNNER
    _RUNNER = runner


@dataclass(frozen=True)
class RequestRow:
    """What the backend needs to know about one row of the step's batch."""

    req_id: str
    num_prompt_tokens: int
    visual_ranges: tuple[tuple[int, int], ...]  # [start, end) of image/video placeholders


def batch_rows(num_reqs: int) -> list[RequestRow] | None:
    """Rows of the current step in metadata order, or None when unknown (dummy/profile runs)."""
    runner = _RUNNER
    if runner is None or runner.input_batch.num_reqs != num_reqs:
        return None
    batch = runner.input_batch
    rows = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = runner.requests.get(req_id)
        if state is None:
            return None
        ranges = tuple(
            (f.mm_position.offset, f.mm_position.offset + f.mm_position.length)
            for f in (state.mm_features or []) if f.modality in ("image", "video"))
        rows.append(RequestRow(req_id, int(batch.num_prompt_tokens[i]), ranges))
    return rows


def visual_mask(n: int, ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Bool [n]: True at image/video placeholder positions."""
    mask = torch.zeros(n, dtype=torch.bool)
    for start, end in ranges:
        mask[max(start, 0):min(end, n)] = True
    return mask


# ---- eviction bookkeeping (worker process) --------------------------------------------------
# req_id -> {layer_idx: (front_blocks, prompt_blocks)} for compacted layers of live requests.
_COMPACTED: dict[str, dict[int, tuple[int, int]]] = {}
# Block ranges to report to the scheduler after this step: req_id -> {layer: (first, last)}.
_PENDING: dict[str, dict[int, tuple[int, int]]] = {}


def note_compaction(req_id: str, layer_idx: int, front_blocks: int, prompt_blocks: int) -> None:
    """Layer `layer_idx` of `req_id` now holds its kept prompt tokens in blocks [0, F); blocks
    [F, prompt_blocks) are no longer read and are reported for freeing."""
    _COMPACTED.setdefault(req_id, {})[layer_idx] = (front_blocks, prompt_blocks)
    if front_blocks < prompt_blocks:
        _PENDING.setdefault(req_id, {})[layer_idx] = (front_blocks, prompt_blocks)


def compaction(req_id: str, layer_idx: int) -> tuple[int, int] | None:
    return _COMPACTED.get(req_id, {}).get(layer_idx)


def take_evictions(live_req_ids) -> dict[str, dict[int, tuple[int, int]]]:
    """The step's block ranges to free; also drops bookkeeping of requests that are gone."""
    global _PENDING
    out, _PENDING = _PENDING, {}
    for req_id in [r for r in _COMPACTED if r not in live_req_ids]:
        del _COMPACTED[req_id]
    for req_id in [r for r in _FALLBACK_COUNTED if r not in live_req_ids]:
        _FALLBACK_COUNTED.discard(req_id)
    return out


# Requests already counted as a dense fallback (every layer group's builder sees them).
_FALLBACK_COUNTED: set[str] = set()


def count_fallback_once(req_id: str, reason: str) -> None:
    from vllm_kvsparse import metrics

    if req_id not in _FALLBACK_COUNTED:
        _FALLBACK_COUNTED.add(req_id)
        metrics.sink().fallback(reason)
