"""Per-request, per-layer records of what sparse prefill kept.

Written once, where the selection happens (the worker), and read by the debug log and the
tests (JSON lines under SparsityConfig.record_dir). No vLLM import.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from dataclasses import asdict, dataclass

logger = logging.getLogger("vllm.kvsparse")


@dataclass(frozen=True)
class LayerRecord:
    req_id: str
    layer: int
    method: str            # the --kv-sparsity method that chose
    num_tokens: int        # prompt tokens the layer selected from (n)
    num_important: int     # tokens chosen by score (ZipVL: p of Eq. 7)
    num_kept: int          # tokens kept: those plus always-kept ones and block top-ups
    probe_seconds: float   # time spent scoring probes and selecting
    kept: list[int] | None = None  # the kept positions, only when recording to a directory
    visual_ranges: list[list[int]] | None = None  # image/video placeholder [start, end)s, idem
    tp_rank: int = 0       # the tensor-parallel rank that chose (every rank chooses the same)

    @property
    def kept_ratio(self) -> float:
        return self.num_kept / max(self.num_tokens, 1)


class Recorder:
    """Process-local sink for LayerRecords."""

    def __init__(self, record_dir: str | None, keep_last: int = 4096):
        self.record_dir = record_dir
        self.recent: deque[LayerRecord] = deque(maxlen=keep_last)
        self._path = None
        if record_dir:
            os.makedirs(record_dir, exist_ok=True)
            self._path = os.path.join(record_dir, f"kept-{os.getpid()}.jsonl")

    @property
    def wants_indices(self) -> bool:
        return self._path is not None

    def add(self, record: LayerRecord) -> None:
        self.recent.append(record)
        logger.debug("vllm-kvsparse: %s req=%s layer=%d kept %d/%d (scored %d) in %.2f ms",
                     record.method, record.req_id, record.layer, record.num_kept, record.num_tokens,
                     record.num_important, 1e3 * record.probe_seconds)
        if self._path:
            with open(self._path, "a") as f:
                f.write(json.dumps(asdict(record)) + "\n")


_RECORDERS: dict[str | None, Recorder] = {}


def recorder(record_dir: str | None) -> Recorder:
    """The process's recorder for `record_dir` (one file per process and directory)."""
    if record_dir not in _RECORDERS:
        _RECORDERS[record_dir] = Recorder(record_dir)
    return _RECORDERS[record_dir]


def read_records(record_dir: str) -> list[dict]:
    """All records written under record_dir (every process), in file order."""
    out = []
    for name in sorted(os.listdir(record_dir)):
        if name.startswith("kept-") and name.endswith(".jsonl"):
            with open(os.path.join(record_dir, name)) as f:
                out.extend(json.loads(line) for line in f if line.strip())
    return out
