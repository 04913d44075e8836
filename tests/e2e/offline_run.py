"""Run a real offline vLLM engine on a JSON spec and write the results as JSON.

    python offline_run.py SPEC.json OUT.json

Run in a fresh process per engine (tests/helpers.run_offline) so that plugin state, threads and
memory never leak between runs. Spec keys: model, additional_config, engine (extra LLM kwargs),
prompts (list of {"image": {"size": [w, h], "seed": s}, "question": str} |
{"tokens": n, "seed": s} | {"text": str}), max_tokens, probe_workers (bool).
"""

import json
import os
import random
import sys


def build_prompts(spec):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from helpers import make_image

    prompts = []
    for p in spec["prompts"]:
        if "image" in p:
            images = p["image"] if isinstance(p["image"], list) else [p["image"]]
            pads = "<|vision_start|><|image_pad|><|vision_end|>" * len(images)
            text = (f"<|im_start|>user\n{pads}{p.get('question', 'What is this?')}"
                    "<|im_end|>\n<|im_start|>assistant\n")
            imgs = [make_image(tuple(i.get("size", (448, 448))), i.get("seed", 0))
                    for i in images]
            prompts.append({"prompt": text,
                            "multi_modal_data": {"image": imgs if len(imgs) > 1 else imgs[0]}})
        elif "tokens" in p:
            rng = random.Random(p.get("seed", 0))
            prompts.append({"prompt_token_ids": [rng.randrange(10, 500)
                                                 for _ in range(p["tokens"])]})
        else:
            prompts.append({"prompt": p["text"]})
    return prompts


def probe(worker):
    """Runs inside the worker: what each decoder attention layer's backend sees."""
    from vllm.model_executor.layers.attention import Attention

    out = {}
    for name, module in worker.model_runner.model.named_modules():
        if isinstance(module, Attention) and hasattr(module.impl, "sparsity"):
            out[name] = {"impl": type(module.impl).__name__, "pid": os.getpid(),
                         "config": module.impl.sparsity.to_additional_config()}
    return out


def main():
    spec = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams

    kw = dict(model=spec["model"], dtype="bfloat16", max_model_len=2048, max_num_seqs=4,
              enforce_eager=True, kv_cache_memory_bytes=64 << 20, seed=0,
              limit_mm_per_prompt={"image": 2, "video": 0})
    if spec.get("uni", True):
        kw["distributed_executor_backend"] = "uni"
    if spec.get("additional_config") is not None:
        kw["additional_config"] = spec["additional_config"]
    kw.update(spec.get("engine", {}))
    llm = LLM(**kw)
    params = SamplingParams(max_tokens=spec.get("max_tokens", 16), temperature=0.0,
                            ignore_eos=True)
    outs = llm.generate(build_prompts(spec), params, use_tqdm=False)
    sched = llm.llm_engine.vllm_config.scheduler_config
    result = {"outputs": [list(o.outputs[0].token_ids) for o in outs],
              "prompt_lens": [len(o.prompt_token_ids) for o in outs],
              "scheduler": {"enable_chunked_prefill": sched.enable_chunked_prefill,
                            "max_num_batched_tokens": sched.max_num_batched_tokens}}
    if spec.get("probe_workers"):
        result["workers"] = llm.collective_rpc(probe)
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
