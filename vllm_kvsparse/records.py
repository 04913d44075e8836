"""Per-request, per-layer records of what sparse prefill kept.

Written once, where the selection happens (the worker), and read by every consumer: the debug
log, the tests (JSON lines under SparsityConfig.record_dir) and, later, the metrics.
No vLLM import.
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
    num_tokens: int        # prompt tokens the layer selected from (n)
    num_important: int     # p from ZipVL Eq. 7
    num_kept: int          # |T|: p plus protected / non-candidate tokens
    probe_seconds: float   # time spent scoring probes and selecting
    kept: list[int] | None = None  # the kept positions, only when recording to a directory
    visual_ranges: list[list[int]] | None = None  # image/video placeholder [start, end)s, idem

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
        logger.debug("vllm-kvsparse: req=%s layer=%d kept %d/%d (p=%d) probe %.2f ms",
                     record.req_id, record.layer, record.num_kept, record.num_tokens,
                     record.num_important, 1e3 * record.probe_seconds)
        if self._path:
            with open(self._path, "a") as f:
                f.write(json.dumps(asdict(record)) + "\n")


def read_records(record_dir: str) -> list[dict]:
    """All records written under record_dir (every process), in file order."""
    out = []
    for name in sorted(os.listdir(record_dir)):
        if name.startswith("kept-") and name.endswith(".jsonl"):
            with open(os.path.join(record_dir, name)) as f:
                out.extend(json.loads(line) for line in f if line.strip())
    return out
