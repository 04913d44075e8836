"""The plugin's workers on vLLM's CPU platform (see worker.py for what the sparse one adds).

Both carry chunked_seed.ChunkedSeedFixMixin, the workaround for vLLM 0.32's CPU crash on seeded
requests with chunked prefill: `KVSparseCPUWorker` when a sparsity method is on,
`ChunkedSeedCPUWorker` (vLLM's CPUWorker plus that workaround alone) with `--kv-sparsity none`
(platform_cpu.py).

Importing vLLM's `cpu_worker` patches torch's CUDA functions process-wide (vllm 0.32:
`vllm.v1.worker.cpu.shm`): only a CPU process may import this module.
"""

from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvsparse.chunked_seed import ChunkedSeedFixMixin
from vllm_kvsparse.worker import KVSparseWorkerMixin


class KVSparseCPUWorker(KVSparseWorkerMixin, ChunkedSeedFixMixin, CPUWorker):
    pass


class ChunkedSeedCPUWorker(ChunkedSeedFixMixin, CPUWorker):
    """vLLM's CPU worker plus only the seeded-chunked-prefill workaround (`--kv-sparsity none`)."""
