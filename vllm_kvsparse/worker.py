"""The plugin's workers: vLLM's CPU and GPU workers plus five duties of the sparse path.

- own the process's WorkerRuntime (runtime.py) and share the model runner with the attention
  backend through it: vLLM 0.32's V1 attention metadata carries no request ids, prompt lengths
  or image positions (the runner's input batch does);
- mark each step's boundaries (begin_step / end_step around the forward), where the methods
  that decide after every layer compact;
- with eviction on, declare one KV-cache group per decoder layer (KVSparseAttentionSpec);
- attach the step's evicted block ranges to the ModelRunnerOutput for the scheduler;
- with tensor parallelism, hand the policies vLLM's TP all-reduce (`_tensor_parallel_heads`)
  so that every rank keeps the same tokens, and publish metrics from TP rank 0 only.
The platform sets `cpu_worker.KVSparseCPUWorker` or `gpu_worker.KVSparseGPUWorker` as
`worker_cls` when sparsity is on; both are this mixin over vLLM's worker (vLLM's CPUWorker
subclasses its GPU Worker, so both have the hooks used here).

This module must import no vLLM worker: vLLM's `cpu_worker` module imports
`vllm.v1.worker.cpu.shm`, which replaces torch's CUDA functions (`torch.cuda.Event`,
`set_stream`, `torch.accelerator.get_memory_info`, ...) for the whole process. Each concrete
worker lives in its own module so a GPU process never imports the CPU one
(tests/unit/test_gpu_imports.py).
"""

from vllm.distributed import (get_tensor_model_parallel_rank,
                              get_tensor_model_parallel_world_size, get_tp_group)
from vllm.v1.outputs import ModelRunnerOutput

from vllm_kvsparse import metrics, runtime
from vllm_kvsparse.config import SparsityConfig
from vllm_kvsparse.kv import KVSparseAttentionSpec, KVSparseModelRunnerOutput
from vllm_kvsparse.policies import HeadShards


class KVSparseWorkerMixin:
    def init_device(self):
        super().init_device()   # joins vLLM's process groups (tensor parallelism)
        self.sparsity = SparsityConfig.from_additional_config(self.vllm_config.additional_config)
        self.kvsparse = runtime.bind(runtime.WorkerRuntime(
            self.model_runner, head_shards=_tensor_parallel_heads(),
            tp_rank=get_tensor_model_parallel_rank()))
        metrics.sink(engine=metrics.engine_index(self.vllm_config))

    def get_kv_cache_spec(self):
        specs = super().get_kv_cache_spec()
        if not self.sparsity.evicts:
            return specs
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        out = {}
        for name, spec in specs.items():
            if type(spec) is FullAttentionSpec:
                spec = KVSparseAttentionSpec(
                    **{f: getattr(spec, f) for f in spec.__dataclass_fields__},
                    layer_idx=extract_layer_index(name))
            out[name] = spec
        return out

    def execute_model(self, scheduler_output):
        # The step's forward runs inside; methods that decide after every layer compact at
        # its end (end_step), before the step's evictions are reported.
        self.kvsparse.begin_step()
        try:
            output = super().execute_model(scheduler_output)
        finally:
            self.kvsparse.end_step()
        return self._attach_evictions(output)

    def sample_tokens(self, grammar_output):
        return self._attach_evictions(super().sample_tokens(grammar_output))

    def _attach_evictions(self, output):
        if isinstance(output, ModelRunnerOutput):
            evictions = self.kvsparse.take_evictions(self.model_runner.requests)
            if evictions:
                output = KVSparseModelRunnerOutput.extend(output, evictions)
            if self.kvsparse.tp_rank == 0:
                metrics.sink().flush()
        return output


def _tensor_parallel_heads() -> HeadShards | None:
    """With tensor parallelism each rank holds H/TP query heads of every layer; the policies
    all-reduce their head-mean scores over the TP group (one [n] fp32 vector per scored layer)
    so every rank keeps the set one device holding all heads would keep, and the ranks' caches
    and the scheduler's one block table agree. vLLM's own TP all-reduce (shared memory on CPU,
    NCCL/custom all-reduce on CUDA) returns identical sums on every rank."""
    size = get_tensor_model_parallel_world_size()
    if size == 1:
        return None

    def all_reduce_sum(x):
        return get_tp_group().all_reduce(x.clone())   # vLLM's CPU all-reduce works in place

    return HeadShards(size, all_reduce_sum)
