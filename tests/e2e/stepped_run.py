"""Drive a real in-process vLLM engine step by step and report KV-cache accounting.

    python stepped_run.py SPEC.json OUT.json

Spec: model, additional_config, engine (extra LLM kwargs), requests: list of
{"id", "prompt": <offline_run prompt spec>, "max_tokens", "abort_at_step"?}, "add_at_step"?.
Output: per-request token ids and finish state, usage after every step, block counts at start
and end, the KV block size, preemptions seen, and the scheduler's eviction counter.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from offline_run import build_prompts  # noqa: E402


def main():
    spec = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams

    kw = dict(model=spec["model"], dtype="bfloat16", max_model_len=2048, max_num_seqs=4,
              enforce_eager=True, kv_cache_memory_bytes=16 << 20, seed=0,
              distributed_executor_backend="uni", limit_mm_per_prompt={"image": 2, "video": 0})
    if spec.get("additional_config") is not None:
        kw["additional_config"] = spec["additional_config"]
    kw.update(spec.get("engine", {}))
    llm = LLM(**kw)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    requests = spec["requests"]
    prompts = build_prompts({"prompts": [r["prompt"] for r in requests]})
    result = {"free_start": pool.get_num_free_blocks(), "num_blocks": pool.num_gpu_blocks,
              "num_groups": len(scheduler.kv_cache_config.kv_cache_groups),
              "block_size": scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size,
              "usage": [], "outputs": {}, "aborted": [], "preempted": set()}
    pending = list(zip(requests, prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        for req, prompt in [p for p in pending if p[0].get("add_at_step", 0) <= step]:
            engine.add_request(req["id"], prompt, SamplingParams(
                max_tokens=req.get("max_tokens", 16), temperature=0.0, ignore_eos=True))
            pending.remove((req, prompt))
        to_abort = [r["id"] for r in requests if r.get("abort_at_step") == step
                    and r["id"] not in result["outputs"]]
        if to_abort:
            engine.abort_request(to_abort)
            result["aborted"] += to_abort
        for out in engine.step():
            if out.finished:
                result["outputs"][out.request_id] = list(out.outputs[0].token_ids)
        for rid, r in scheduler.requests.items():
            if r.num_preemptions:
                result["preempted"].add(rid)
        result["usage"].append(pool.get_usage())
        step += 1
        if step > 20000:
            raise RuntimeError("engine did not finish")
    result["free_end"] = pool.get_num_free_blocks()
    result["preempted"] = sorted(result["preempted"])
    from vllm_kvsparse import metrics   # in-process engine: worker and scheduler share it
    result["blocks_freed"] = metrics.sink("engine").counters.get("kv_blocks_freed", 0)
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
