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
