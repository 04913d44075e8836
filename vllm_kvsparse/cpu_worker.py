"""The plugin's worker on vLLM's CPU platform (see worker.py for what it adds).

Importing vLLM's `cpu_worker` patches torch's CUDA functions process-wide (vllm 0.32:
`vllm.v1.worker.cpu.shm`): only a CPU process may import this module.
"""

from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvsparse.worker import KVSparseWorkerMixin


class KVSparseCPUWorker(KVSparseWorkerMixin, CPUWorker):
    pass
