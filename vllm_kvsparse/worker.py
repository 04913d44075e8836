"""The plugin's CPU worker: vLLM's CPUWorker that shares its model runner with the backend.

vLLM 0.32's V1 attention metadata carries no request ids, prompt lengths or image positions
(vllm-0.32-internals.md §4.3); the V1 runner's input batch has them, in metadata row order.
The platform sets this class as `worker_cls` when sparsity is on.
"""

from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvsparse import runtime


class KVSparseCPUWorker(CPUWorker):
    def init_device(self):
        super().init_device()
        runtime.bind_runner(self.model_runner)
