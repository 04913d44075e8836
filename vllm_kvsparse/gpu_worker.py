"""The plugin's worker on vLLM's CUDA platform (see worker.py for what it adds).

Imports nothing CPU-only (tests/unit/test_gpu_imports.py checks that importing it leaves
torch's CUDA functions untouched).
"""

from vllm.v1.worker.gpu_worker import Worker

from vllm_kvsparse.worker import KVSparseWorkerMixin


class KVSparseGPUWorker(KVSparseWorkerMixin, Worker):
    pass
