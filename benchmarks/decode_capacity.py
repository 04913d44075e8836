"""Decode capacity at fixed KV-cache memory, dense vs ZipVL with KV eviction (issue #5).

    python benchmarks/decode_capacity.py                                   # the published run
    python benchmarks/decode_capacity.py --num-requests 4 --prompt-tokens 2048 --max-tokens 16

Workload: `--num-requests` long image requests (2 distinct 448x448 images = 512 tokens, plus
random-word text up to `--prompt-tokens`), all submitted at once, greedy, `--max-tokens` output
tokens each (ignore_eos). The KV cache is fixed at `--kv-requests` x the KV bytes of one
request (prompt + output, all layers, bf16), so dense stock vLLM can hold about that many
requests; zipvl gives the blocks of dropped tokens back after each prefill and can admit more.
Both modes get the identical requests and engine settings (block size 32, chunked prefill and
prefix caching off, max_num_batched_tokens = max_model_len, so at most one prompt is prefilled
per step); each mode runs in its own fresh process, driven step by step (engine.step()) with
the scheduler and block pool read in-process.

Numbers (per mode):
  peak running        max over steps of len(scheduler.running) (right after scheduling)
  mean decode batch   mean len(running) over the pure-decode steps
  decode tok/s        output tokens produced by pure-decode steps / wall time of those steps;
                      a pure-decode step is one in which every scheduled request got exactly 1
                      token (no prompt, no recomputation after preemption)
  e2e output tok/s    all output tokens / wall time from the first step to the last finish
                      (prefills included; input processing in add_request excluded)
  KV usage max/mean   block_pool.get_usage() after each step (fraction of the pool's blocks in
                      use; mean over steps)
  preemptions         sum over requests of num_preemptions (recompute preemptions)
  kept ratio          zipvl: mean over requests and layers of num_kept / num_tokens (records)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS = {"peak_running": 2.0, "decode_tok_s": 1.8, "max_kept_ratio": 0.40}


# ============================================================================ worker

def worker(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**spec["engine"], additional_config=spec["additional_config"])
    startup = time.perf_counter() - t0
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    scheduler = core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    tok = llm.get_tokenizer()

    captured = {}
    orig_schedule = scheduler.schedule

    def schedule(*args, **kwargs):
        out = orig_schedule(*args, **kwargs)
        captured["out"] = out
        captured["running"] = len(scheduler.running)
        captured["waiting"] = len(scheduler.waiting)
        return out
    scheduler.schedule = schedule

    n_img = spec["num_images"]
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    t_in = time.perf_counter()
    prompt_lens = {}
    for i in range(spec["num_requests"]):
        seed = 10_000 * (i + 1)
        prompt = common.build_prompt(tok, spec["prompt_tokens"],
                                     [seed + j for j in range(n_img)], seed)
        engine.add_request(f"req{i}", prompt, params)
    input_s = time.perf_counter() - t_in

    steps, produced, preempt = [], {}, {}
    t_first = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        sched = captured.pop("out", None)
        new_tokens = 0
        for o in outs:
            n = len(o.outputs[0].token_ids)
            new_tokens += n - produced.get(o.request_id, 0)
            produced[o.request_id] = n
            prompt_lens[o.request_id] = len(o.prompt_token_ids or [])
        for rid, r in scheduler.requests.items():
            preempt[rid] = max(preempt.get(rid, 0), r.num_preemptions)
        per_req = list(sched.num_scheduled_tokens.values()) if sched else []
        steps.append({"dt": dt, "running": captured.get("running", 0),
                      "waiting": captured.get("waiting", 0),
                      "scheduled_reqs": len(per_req),
                      "scheduled_tokens": sum(per_req),
                      "decode_only": bool(per_req) and max(per_req) == 1,
                      "new_tokens": new_tokens, "usage": pool.get_usage()})
        if len(steps) > 100_000:
            raise RuntimeError("engine did not finish")
    wall = time.perf_counter() - t_first

    result = {"startup_s": startup, "input_processing_s": input_s, "wall_s": wall,
              "steps": steps, "output_tokens": produced, "prompt_tokens": prompt_lens,
              "preemptions": preempt, "num_blocks": pool.num_gpu_blocks,
              "num_kv_groups": len(scheduler.kv_cache_config.kv_cache_groups)}
    if spec.get("record_dir"):
        from vllm_kvsparse import metrics   # in-process engine: worker and scheduler share it
        from vllm_kvsparse.records import read_records
        recs = read_records(spec["record_dir"])
        result["kept"] = common.kept_summary(recs)
        result["blocks_freed"] = metrics.sink("engine").counters.get("kv_blocks_freed", 0)
    json.dump(result, open(out_path, "w"))


def metrics_of(out: dict) -> dict:
    steps = out["steps"]
    dec = [s for s in steps if s["decode_only"]]
    dec_time = sum(s["dt"] for s in dec)
    total_out = sum(out["output_tokens"].values())
    m = {"peak_running": max(s["running"] for s in steps),
         "mean_decode_batch": statistics.fmean(s["running"] for s in dec) if dec else None,
         "decode_tokens": sum(s["new_tokens"] for s in dec),
         "decode_seconds": dec_time,
         "decode_tok_s": sum(s["new_tokens"] for s in dec) / dec_time if dec_time else None,
         "output_tokens": total_out, "wall_s": out["wall_s"],
         "e2e_output_tok_s": total_out / out["wall_s"],
         "num_steps": len(steps), "decode_steps": len(dec),
         "prefill_steps_seconds": sum(s["dt"] for s in steps if not s["decode_only"]),
         "kv_usage_max": max(s["usage"] for s in steps),
         "kv_usage_mean": statistics.fmean(s["usage"] for s in steps),
         "preemptions": sum(out["preemptions"].values()),
         "preempted_requests": sum(1 for v in out["preemptions"].values() if v),
         "num_blocks": out["num_blocks"], "num_kv_groups": out["num_kv_groups"],
         "startup_s": out["startup_s"], "input_processing_s": out["input_processing_s"],
         "prompt_tokens_median": statistics.median(out["prompt_tokens"].values())}
    if "kept" in out:
        m["kept_ratio_mean"] = out["kept"]["kept_ratio_mean"]
        m["kept_ratio_per_layer"] = out["kept"]["kept_ratio_per_layer"]
        m["blocks_freed"] = out.get("blocks_freed")
    return m


# ============================================================================ orchestrator

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-requests", type=float, default=3.3,
                    help="KV cache size in units of one request's KV bytes")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--qk-scale", type=float, default=100.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--num-heads", type=int, default=16)
    ap.add_argument("--num-kv-heads", type=int, default=4)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="fresh engines per mode (ABBA)")
    ap.add_argument("--models-dir", default="/tmp/kvsparse-bench/models")
    ap.add_argument("--work-dir", default="/tmp/kvsparse-bench/decode_capacity")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    spec = {"layers": args.layers, "hidden_size": args.hidden_size,
            "num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads,
            "qk_scale": args.qk_scale, "max_position_embeddings": 32768}
    hd = args.hidden_size // args.num_heads
    mdir = Path(args.models_dir) / (f"qwen2vl-l{args.layers}-h{args.hidden_size}-hd{hd}"
                                    f"-kv{args.num_kv_heads}-qk{args.qk_scale}")
    built = common.ensure_model(mdir, spec)
    block = 32
    per_req_tokens = args.prompt_tokens + args.max_tokens
    per_token = 2 * 2 * args.layers * args.num_kv_heads * hd     # K and V, bf16, all layers
    per_req_bytes = -(-per_req_tokens // block) * block * per_token
    kv_bytes = int(args.kv_requests * per_req_bytes)
    max_len = per_req_tokens + 64
    engine = common.engine_kwargs(str(mdir), max_len, kv_bytes, args.max_num_seqs, block)
    modes = [("dense", None), ("zipvl", args.tau)]
    report = {"meta": common.meta(["benchmarks/decode_capacity.py", *argv]),
              "model": {"dir": str(mdir), "spec": built,
                        "build_command": common.model_command(mdir, spec)},
              "settings": {"num_requests": args.num_requests,
                           "prompt_tokens": args.prompt_tokens, "images_per_prompt": args.images,
                           "image_size": [448, 448], "tokens_per_image": 256,
                           "max_tokens": args.max_tokens, "tau": args.tau,
                           "kv_cache_memory_bytes": kv_bytes,
                           "kv_bytes_per_request": per_req_bytes,
                           "kv_requests": args.kv_requests, "rounds": args.rounds,
                           "engine": engine},
              "runs": [], "summary": {}}
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        for mode, tau in (modes if rnd % 2 == 0 else modes[::-1]):
            name = "dense" if mode == "dense" else f"zipvl-tau{tau}"
            wdir = Path(args.work_dir) / f"round{rnd}" / name
            rec = str(wdir / "records") if mode == "zipvl" else None
            wspec = {"engine": engine, "num_requests": args.num_requests,
                     "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                     "num_images": args.images, "record_dir": rec,
                     "additional_config": common.additional_config(mode, tau, rec)}
            print(f"[{time.perf_counter() - t_start:6.0f}s] round {rnd} {name} ...", flush=True)
            out = common.run_worker(__file__, wspec, wdir)
            m = metrics_of(out)
            report["runs"].append({"mode": mode, "tau": tau, "round": rnd, "metrics": m,
                                   "process_s": out["process_seconds"],
                                   "loadavg_before": out["loadavg_before"],
                                   "loadavg_after": out["loadavg_after"],
                                   "other_busy_processes": out["other_busy_processes"],
                                   "steps": out["steps"]})
    report["wall_seconds"] = time.perf_counter() - t_start
    summarize(report, modes)
    print(render(report))
    if args.out:
        common.write_json(Path(args.out), report)
    return 0


def summarize(report, modes) -> None:
    keys = ["peak_running", "mean_decode_batch", "decode_tok_s", "e2e_output_tok_s", "wall_s",
            "kv_usage_max", "kv_usage_mean", "preemptions", "preempted_requests",
            "kept_ratio_mean", "blocks_freed", "num_blocks", "prompt_tokens_median",
            "decode_steps", "decode_seconds", "prefill_steps_seconds"]
    for mode, tau in modes:
        runs = [r["metrics"] for r in report["runs"] if r["mode"] == mode]
        s = {k: common.median([r.get(k) for r in runs]) for k in keys}
        if mode == "zipvl":
            layers = runs[0]["kept_ratio_per_layer"].keys()
            s["kept_ratio_per_layer"] = {k: common.median([r["kept_ratio_per_layer"][k]
                                                           for r in runs]) for k in layers}
        report["summary"][mode] = s
    d, z = report["summary"]["dense"], report["summary"]["zipvl"]
    ratio = lambda k: z[k] / d[k] if z.get(k) and d.get(k) else None  # noqa: E731
    report["summary"]["ratios"] = {k: ratio(k) for k in
                                   ("peak_running", "mean_decode_batch", "decode_tok_s",
                                    "e2e_output_tok_s")}
    kept = z.get("kept_ratio_mean")
    report["summary"]["targets"] = {
        "kept_ratio_le_0.40": {"value": kept, "met": kept is not None and kept <= 0.40},
        "peak_running_ge_2x": {"value": ratio("peak_running"),
                               "met": (ratio("peak_running") or 0) >= TARGETS["peak_running"]},
        "decode_tok_s_ge_1.8x": {"value": ratio("decode_tok_s"),
                                 "met": (ratio("decode_tok_s") or 0) >= TARGETS["decode_tok_s"]}}


def render(report) -> str:
    s = report["summary"]
    rows = []
    labels = [("peak running requests", "peak_running"),
              ("mean decode batch", "mean_decode_batch"),
              ("decode tok/s (pure-decode steps)", "decode_tok_s"),
              ("e2e output tok/s", "e2e_output_tok_s"), ("wall s (all steps)", "wall_s"),
              ("KV usage max", "kv_usage_max"), ("KV usage mean", "kv_usage_mean"),
              ("preemptions", "preemptions"), ("kept ratio (mean over layers)", "kept_ratio_mean"),
              ("KV blocks freed by eviction", "blocks_freed"),
              ("prompt tokens (median)", "prompt_tokens_median")]
    for label, k in labels:
        rows.append([label, s["dense"].get(k), s["zipvl"].get(k), s["ratios"].get(k)])
    table = common.markdown_table(["", "dense", f"zipvl tau={report['settings']['tau']}",
                                   "zipvl / dense"], rows)
    t = s["targets"]
    lines = [table, "", "targets: " + "; ".join(
        f"{k} = {v['value']:.3g} -> {'met' if v['met'] else 'MISSED'}"
        if v["value"] is not None else f"{k}: n/a" for k, v in t.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
