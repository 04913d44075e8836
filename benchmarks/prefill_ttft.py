"""Prefill TTFT, dense vs ZipVL token-sparse prefill, on a real vLLM engine (issue #4).

    python benchmarks/prefill_ttft.py                                  # the published run
    python benchmarks/prefill_ttft.py --lengths 2048,8192 --repeats 2 --rounds 1   # shorter

What is measured: TTFT = wall time of `llm.generate(prompt, SamplingParams(max_tokens=1))` at
batch 1 (prompt processing, vision encoder, the language model's prefill, one sampled token),
in an offline in-process engine. Each prompt is 2 distinct 448x448 images (256 tokens each)
plus random-word text up to the target length, so the language model dominates. Every timed
request has its own images and text (no cache can serve it); prefix caching and chunked
prefill are off in both modes, so both prefill the whole prompt in one step.

Per round, each mode (dense, zipvl at each tau) runs in its own fresh process: one warm-up
request (first length, or --warmup-tokens), then `--repeats` timed requests per length, then `--repeats` requests with
the same kind of images and a minimal text ("vision-only" TTFT: the vision encoder plus a
~530-token prefill). The mode order alternates between rounds (ABBA). Reported: medians over
rounds x repeats. The zipvl rows also carry the kept ratio (mean over layers of
num_kept / num_tokens from the plugin's records) and a time breakdown of the decoder attention
layers measured inside the engine (selection = probe scoring + budget + top-p; attention =
sparse attention over the kept set, or vLLM's kernel for dense; compaction = eviction rewrite).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS = {"2K": (2048, 1.03), "8K": (8192, 0.60), "16K": (16384, 0.45)}   # issue 13, zipvl/dense TTFT at tau 0.975


# ============================================================================ worker

class Timers:
    """Wall time spent inside the decoder attention layers, by part (worker process)."""

    def __init__(self):
        self.t = {}

    def reset(self):
        self.t = {"attn_layer": 0.0, "select": 0.0, "sparse_attend": 0.0, "compact": 0.0}

    def wrap(self, cls, name, key):
        orig = getattr(cls, name)
        timers = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                timers.t[key] = timers.t.get(key, 0.0) + time.perf_counter() - t0
        setattr(cls, name, timed)


def worker(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    from vllm import LLM, SamplingParams

    from vllm_kvsparse.attention import cpu as kv_cpu
    from vllm_kvsparse.attention.layer_sparsity import LayerSparsity
    from vllm_kvsparse.records import read_records

    timers = Timers()
    timers.wrap(kv_cpu.KVSparseCPUAttentionImpl, "forward", "attn_layer")
    timers.wrap(LayerSparsity, "decide", "select")
    timers.wrap(LayerSparsity, "attend", "sparse_attend")
    timers.wrap(kv_cpu.KVSparseCPUAttentionImpl, "_compact_rows", "compact")

    t0 = time.perf_counter()
    llm = LLM(**spec["engine"], additional_config=spec["additional_config"])
    startup = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    record_dir = spec.get("record_dir")
    seen = 0

    def timed(prompt) -> dict:
        nonlocal seen
        timers.reset()
        t = time.perf_counter()
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        ttft = time.perf_counter() - t
        row = {"ttft_s": ttft, "prompt_tokens": len(out.prompt_token_ids),
               "timers": dict(timers.t)}
        if record_dir:
            recs = read_records(record_dir)
            row.update(common.kept_summary(recs[seen:]))
            seen = len(recs)
        return row

    n_img, base = spec["num_images"], spec["seed_base"]
    rows = []
    # one warm-up request at the first length (its own images and text; discarded)
    timed(common.build_prompt(tok, spec.get("warmup_tokens") or spec["lengths"][0], [base + 900_000 + j
                                                        for j in range(n_img)], base + 900_000))
    for li, length in enumerate(spec["lengths"]):
        for r in range(spec["repeats"]):
            seed = base + 1000 * li + 10 * r
            prompt = common.build_prompt(tok, length, [seed + j for j in range(n_img)], seed)
            rows.append({"kind": "full", "target_tokens": length, "repeat": r, **timed(prompt)})
    for r in range(spec["repeats"]):
        seed = base + 500_000 + 10 * r
        prompt = common.build_prompt(tok, 0, [seed + j for j in range(n_img)], seed)
        rows.append({"kind": "vision_only", "target_tokens": 0, "repeat": r, **timed(prompt)})
    import torch
    json.dump({"startup_s": startup, "rows": rows, "torch_threads": torch.get_num_threads()},
              open(out_path, "w"))


# ============================================================================ orchestrator

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="2048,8192,16384", help="prompt tokens, comma list")
    ap.add_argument("--head-dims", default="64", help="64 and/or 128 (8 heads), comma list")
    ap.add_argument("--taus", default="0.975", help="zipvl tau values, comma list")
    ap.add_argument("--qk-scale", type=float, default=6.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--num-kv-heads", type=int, default=4)
    ap.add_argument("--images", type=int, default=2, help="448x448 images per prompt")
    ap.add_argument("--what-if-kernel", choices=("vllm", "torch"), default=None,
                    help="also run zipvl with the CPU sparse-attention kernel forced to vLLM's "
                         "kernel or the fp32 torch SDPA reference (side by side in one run)")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="length of the one warm-up request per engine (default: first length)")
    ap.add_argument("--repeats", type=int, default=2, help="timed requests per length/engine")
    ap.add_argument("--rounds", type=int, default=2, help="fresh engines per mode (ABBA)")
    ap.add_argument("--models-dir", default="/tmp/kvsparse-bench/models")
    ap.add_argument("--work-dir", default="/tmp/kvsparse-bench/prefill_ttft")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    return ap.parse_args(argv)


def model_spec(args, head_dim: int) -> dict:
    return {"layers": args.layers, "hidden_size": args.hidden_size,
            "num_heads": args.hidden_size // head_dim, "num_kv_heads": args.num_kv_heads,
            "qk_scale": args.qk_scale, "max_position_embeddings": 32768}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    head_dims = [int(x) for x in args.head_dims.split(",")]
    taus = [float(x) for x in args.taus.split(",")]
    modes = [("dense", None)] + [("zipvl", t) for t in taus]
    if args.what_if_kernel:
        modes += [(f"zipvl-{args.what_if_kernel}", t) for t in taus]
    work = Path(args.work_dir)
    max_len = max(lengths) + 256
    report = {"meta": common.meta(["benchmarks/prefill_ttft.py", *argv]),
              "settings": {"lengths": lengths, "taus": taus, "images_per_prompt": args.images,
                           "image_size": [448, 448], "tokens_per_image": 256,
                           "repeats": args.repeats, "rounds": args.rounds,
                           "max_model_len": max_len, "block_size": 32,
                           "timing": "median of rounds x repeats, seconds"},
              "models": {}, "runs": [], "summary": []}
    t_start = time.perf_counter()
    for hd in head_dims:
        spec = model_spec(args, hd)
        mdir = Path(args.models_dir) / (f"qwen2vl-l{spec['layers']}-h{spec['hidden_size']}"
                                        f"-hd{hd}-kv{spec['num_kv_heads']}-qk{spec['qk_scale']}")
        built = common.ensure_model(mdir, spec)
        report["models"][str(hd)] = {"dir": str(mdir), "spec": built,
                                     "build_command": common.model_command(mdir, spec)}
        # KV bytes of one max-length request (bf16 K and V, all layers) x 2, rounded up.
        per_token = 2 * 2 * spec["layers"] * spec["num_kv_heads"] * hd
        kv_bytes = max(64 << 20, 2 * per_token * max_len)
        engine = common.engine_kwargs(str(mdir), max_len, kv_bytes, max_num_seqs=2)
        report["models"][str(hd)]["engine"] = engine
        for rnd in range(args.rounds):
            order = modes if rnd % 2 == 0 else modes[::-1]
            for mode, tau in order:
                name = "dense" if mode == "dense" else f"{mode}-tau{tau}"
                wdir = work / f"hd{hd}" / f"round{rnd}" / name
                rec = str(wdir / "records") if mode != "dense" else None
                wspec = {"engine": engine, "lengths": lengths, "repeats": args.repeats,
                         "warmup_tokens": args.warmup_tokens,
                         "num_images": args.images, "seed_base": 1_000_000 * (rnd + 1),
                         "additional_config": common.additional_config(
                             "dense" if mode == "dense" else "zipvl", tau, rec,
                             **({"cpu_sparse_kernel": mode.split("-", 1)[1]}
                                if "-" in mode else {})),
                         "record_dir": rec}
                print(f"[{time.perf_counter() - t_start:6.0f}s] head_dim {hd} round {rnd} "
                      f"{name} ...", flush=True)
                run = {"head_dim": hd, "mode": mode, "tau": tau, "round": rnd, "rows": []}
                try:
                    out = common.run_worker(__file__, wspec, wdir)
                except Exception as e:   # e.g. killed by the kernel's OOM killer (rc -9)
                    run["error"] = str(e).splitlines()[0]
                    print("  FAILED:", run["error"], flush=True)
                    report["runs"].append(run)
                    continue
                for row in out["rows"]:
                    row.update(head_dim=hd, mode=mode, tau=tau, round=rnd)
                run.update(startup_s=out["startup_s"], process_s=out["process_seconds"],
                           loadavg_before=out["loadavg_before"],
                           loadavg_after=out["loadavg_after"],
                           other_busy_processes=out["other_busy_processes"],
                           torch_threads=out.get("torch_threads"), rows=out["rows"])
                report["runs"].append(run)
    report["wall_seconds"] = time.perf_counter() - t_start
    summarize(report, head_dims, lengths, modes)
    print(common.cpu_line(report["meta"]["machine"]))
    print(render(report))
    if args.out:
        common.write_json(Path(args.out), report)
    return 0


def _rows(report, **match):
    return [r for run in report["runs"] for r in run["rows"]
            if all(r.get(k) == v for k, v in match.items())]


def summarize(report, head_dims, lengths, modes) -> None:
    for hd in head_dims:
        vis = {}
        for mode, tau in modes:
            vis[(mode, tau)] = common.median(
                [r["ttft_s"] for r in _rows(report, head_dim=hd, mode=mode, tau=tau,
                                            kind="vision_only")])
        for length in lengths:
            dense = _rows(report, head_dim=hd, mode="dense", kind="full", target_tokens=length)
            d_ttft = common.median([r["ttft_s"] for r in dense])
            d_attn = common.median([r["timers"]["attn_layer"] for r in dense])
            for mode, tau in modes:
                rows = _rows(report, head_dim=hd, mode=mode, tau=tau, kind="full",
                             target_tokens=length)
                ttft = common.median([r["ttft_s"] for r in rows])
                s = {"head_dim": hd, "target_tokens": length, "mode": mode, "tau": tau,
                     "n": len(rows), "errors": [run["error"] for run in report["runs"]
                                                if run["head_dim"] == hd and run["mode"] == mode
                                                and run["tau"] == tau and "error" in run],
                     "prompt_tokens": common.median(
                         [r["prompt_tokens"] for r in rows]),
                     "ttft_s_median": ttft, "ttft_s_all": [r["ttft_s"] for r in rows],
                     "vs_dense": ttft / d_ttft if ttft and d_ttft else None,
                     "vision_only_ttft_s": vis[(mode, tau)],
                     "vision_share": vis[("dense", None)] / d_ttft
                     if vis[("dense", None)] and d_ttft else None,
                     "attn_layers_s": common.median([r["timers"]["attn_layer"] for r in rows]),
                     "dense_attn_layers_s": d_attn}
                if mode != "dense" and rows:
                    s["kept_ratio_mean"] = common.median([r["kept_ratio_mean"] for r in rows])
                    layers = rows[0]["kept_ratio_per_layer"].keys() if rows else []
                    s["kept_ratio_per_layer"] = {
                        k: common.median([r["kept_ratio_per_layer"][k] for r in rows])
                        for k in layers}
                    for part in ("select", "sparse_attend", "compact"):
                        s[f"{part}_s"] = common.median([r["timers"][part] for r in rows])
                    s["probe_seconds_records"] = common.median(
                        [r["probe_seconds_total"] for r in rows])
                for key, (tl, limit) in TARGETS.items():
                    if length == tl and tau == 0.975 and mode == "zipvl":
                        s["target"] = {"max_ratio": limit,
                                       "met": bool(s["vs_dense"] is not None
                                                   and s["vs_dense"] <= limit)}
                report["summary"].append(s)


def render(report) -> str:
    headers = ["head_dim", "prompt tok", "mode", "TTFT s (median)", "vs dense", "kept ratio",
               "attn layers s", "select s", "sparse attn s", "compact s", "vision share",
               "target"]
    rows = []
    for s in report["summary"]:
        tgt = s.get("target")
        label = {"dense": "dense", "zipvl": f"zipvl tau={s['tau']}",
                 "zipvl-vllm": f"what-if: zipvl tau={s['tau']}, vLLM kernel",
                 "zipvl-torch": f"what-if: zipvl tau={s['tau']}, torch SDPA"}[s["mode"]]
        if s["errors"] and not s["n"]:
            label += " (FAILED: " + s["errors"][0][:40] + ")"
        rows.append([s["head_dim"], s["prompt_tokens"] or s["target_tokens"], label,
                     s["ttft_s_median"], s["vs_dense"], s.get("kept_ratio_mean"),
                     s["attn_layers_s"], s.get("select_s"), s.get("sparse_attend_s"),
                     s.get("compact_s"), s["vision_share"] if s["mode"] == "dense" else None,
                     None if not tgt else (f"<= {tgt['max_ratio']}: "
                                           + ("met" if tgt["met"] else "MISSED"))])
    return common.markdown_table(headers, rows)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
