"""Block arithmetic of KV eviction (pure torch, no vLLM).

After a layer's prefill keeps the token set T, its K/V are compacted to the front of the
request's blocks and the blocks no longer needed go back to vLLM's pool. Two constraints of a
paged cache shape T (both documented deviations from the paper, each < block_size tokens):

- The prompt's last, partial block [M, n) (M = floor(n / bs) * bs) is kept whole: decode tokens
  are written into it at their original positions.
- The kept tokens before M are topped up, by normalized score, to whole blocks, so that the
  compacted front plus the tail reads as one contiguous paged sequence at decode time.
"""

from __future__ import annotations

import torch


def full_prompt_blocks(num_prompt: int, block_size: int) -> int:
    """Number of blocks entirely inside the prompt (the eviction candidates)."""
    return num_prompt // block_size


def kept_set_for_eviction(kept: torch.Tensor, scores: torch.Tensor, num_prompt: int,
                          block_size: int) -> tuple[torch.Tensor, int]:
    """(kept positions ascending, number of front blocks F) for a paged cache.

    kept: ascending positions chosen by the selection; scores: [n] normalized scores used to
    pick the extra tokens (highest first, ties to the lower index).
    """
    n, bs = num_prompt, block_size
    m = full_prompt_blocks(n, bs) * bs
    keep = torch.zeros(n, dtype=torch.bool)
    keep[kept.cpu()] = True
    keep[m:] = True
    front = int(keep[:m].sum())
    need = (-front) % bs
    if need:
        candidates = scores[:m].float().cpu().masked_fill(keep[:m], float("-inf"))
        order = torch.sort(candidates, descending=True, stable=True).indices
        keep[order[:need]] = True
    return torch.nonzero(keep).flatten(), (front + need) // bs


def virtual_block_row(block_row: torch.Tensor, front_blocks: int, prompt_blocks: int,
                      block_size: int) -> tuple[torch.Tensor, int]:
    """A decode row's view of a compacted layer: blocks [0, F) then the tail from the prompt's
    last full block on; the evicted blocks [F, prompt_blocks) are skipped (their ids are stale).
    Returns (block row of the same width, padded with block 0; the number of token positions
    skipped, to subtract from the row's seq_len). Device ops only: no host sync on a GPU."""
    gap = prompt_blocks - front_blocks
    row = torch.zeros_like(block_row)
    row[:front_blocks] = block_row[:front_blocks]
    row[front_blocks:block_row.numel() - gap] = block_row[prompt_blocks:]
    return row, gap * block_size
