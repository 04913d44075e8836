"""`vllm-kvsparse eval`: accuracy of one model served by several endpoints (dense, zipvl, ...),
and EffiVLM-Bench's OP / OG / OL / OE with the first endpoint as the reference. docs/eval.md.

    vllm-kvsparse eval --endpoint dense=http://127.0.0.1:8000 --endpoint zipvl=http://...:8001 \
        --dataset synthetic:short --limit 50 --out eval-out

Endpoints run one after another (so their timings do not disturb each other); within one, the
tasks run one after another with --concurrency requests in flight, and /metrics is scraped
around each task: the kept ratio and KV blocks freed are counter deltas over exactly that
task's requests. A request that fails on a connection error is retried (--retries); every
sample that still fails is counted under "failures" with its error, scored wrong, and listed.
An endpoint that cannot be reached at all is reported as such; the others' results stand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from vllm_kvsparse.evaluation import dataset as ds
from vllm_kvsparse.evaluation import metrics as mt
from vllm_kvsparse.evaluation import synthetic


def add_parser(sub) -> argparse.ArgumentParser:
    from vllm_kvsparse.bench.cli import _endpoint, _int_at_least, _positive_float

    p = sub.add_parser("eval", help="accuracy and EffiVLM-Bench metrics of endpoints on a "
                       "visual-QA dataset; docs/eval.md", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", dest="endpoints", type=_endpoint, action="append",
                   required=True, metavar="NAME=URL",
                   help="an OpenAI-compatible server (repeat); the first is the reference")
    p.add_argument("--dataset", required=True,
                   help="synthetic:TASKS[@SEED] (TASKS: comma list of "
                        f"{','.join(synthetic.TASKS)} or all/short/long) or a JSONL file "
                        "(docs/eval.md)")
    p.add_argument("--limit", type=_int_at_least(1), default=None,
                   help="samples per task for synthetic (default 50); first N lines of a JSONL")
    p.add_argument("--model", help="model name to request (default: first from /v1/models)")
    p.add_argument("--concurrency", type=_int_at_least(1), default=4)
    p.add_argument("--max-tokens", type=_int_at_least(1), default=16)
    p.add_argument("--retries", type=_int_at_least(0), default=3,
                   help="retries of a request that fails on a connection error (default 3)")
    p.add_argument("--timeout", type=_positive_float, default=300.0)
    p.add_argument("--score", choices=["relaxed", "exact"], default="relaxed",
                   help="the match OP/OG use (both are reported; default relaxed)")
    p.add_argument("--out", default="eval-out")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p


async def _request(http, v1: str, model: str, sample, args) -> dict:
    from vllm_kvsparse.bench import client as cl

    body = {"model": model, "messages": ds.messages(sample), "max_tokens": args.max_tokens,
            "temperature": 0, "seed": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    attempts = 0
    while True:
        attempts += 1
        res = cl.RequestResult(0)
        start = time.perf_counter()
        try:
            await asyncio.wait_for(cl._stream(http, v1, body, res, start), args.timeout)
            err = None
        except Exception as e:  # noqa: BLE001 - recorded, never raised
            err = cl.error_text(e)
            if _is_connection_error(e) and attempts <= args.retries:
                await asyncio.sleep(min(0.5 * 2 ** (attempts - 1), 4.0))
                continue
        return {"ok": err is None, "error": err, "attempts": attempts, "text": res.text,
                "ttft_s": res.ttft_s, "e2e_s": time.perf_counter() - start,
                "prompt_tokens": res.prompt_tokens, "output_tokens": res.output_tokens}


def _is_connection_error(e: BaseException) -> bool:
    import httpx
    return isinstance(e, (httpx.TransportError,)) and not isinstance(e, httpx.TimeoutException)


async def _run_endpoint(name: str, url: str, samples, args) -> dict:
    from vllm_kvsparse.bench import client as cl
    from vllm_kvsparse.bench import metrics_scrape as msc
    from vllm_kvsparse.bench.cli import _progress

    root, v1 = cl.api_base(url)
    entry: dict = {"url": url, "model": args.model, "error": None, "tasks": {}, "samples": []}
    tasks = list(dict.fromkeys(s.task for s in samples))
    async with cl.make_client(args.timeout, args.concurrency) as http, \
            cl.make_client(30.0, 2) as http_metrics:
        model, err = await cl.discover_model(http, root)
        if args.model is None:
            entry["model"] = model
        if entry["model"] is None:
            entry["error"] = f"endpoint {name} ({url}) unreachable: {err}"
        sem = asyncio.Semaphore(args.concurrency)
        bar = _progress(name, len(samples), args.no_progress)

        async def one(s):
            async with sem:
                if entry["model"] is None:
                    r = {"ok": False, "error": entry["error"], "attempts": 0, "text": None,
                         "ttft_s": None, "e2e_s": None}
                else:
                    r = await _request(http, v1, entry["model"], s, args)
            bar.update(1)
            if not r["ok"]:
                bar.set_postfix_str(f"failed: {r['error'][:60]}", refresh=False)
            return r

        for task in tasks:
            chunk = [s for s in samples if s.task == task]
            before = await msc.scrape(http_metrics, root)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(s) for s in chunk))
            wall = time.perf_counter() - t0
            if any(r["ok"] for r in results):
                await asyncio.sleep(1.0)  # the server's stat loggers record the last requests
            after = await msc.scrape(http_metrics, root)
            server = msc.server_summary(before, after, [])
            for s, r in zip(chunk, results):
                pred = r["text"] if r["ok"] else None
                entry["samples"].append({
                    "id": s.id, "task": task, "question": s.question, "answers": s.answers,
                    "prediction": pred, "exact": bool(pred is not None
                                                      and mt.exact_match(pred, s.answers)),
                    "relaxed": bool(pred is not None and mt.relaxed_match(pred, s.answers)),
                    **{k: r[k] for k in ("ok", "error", "attempts", "ttft_s", "e2e_s")},
                    "prompt_tokens": r.get("prompt_tokens")})
            entry["tasks"][task] = _task_summary(entry["samples"][-len(chunk):], wall, server)
        bar.close()
    return entry


def _task_summary(rows: list[dict], wall: float, server: dict) -> dict:
    ok = [r for r in rows if r["ok"]]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    n = len(rows)
    prompt = [r["prompt_tokens"] for r in ok if r.get("prompt_tokens")]
    return {
        "samples": n, "answered": len(ok), "failures": n - len(ok),
        "accuracy_relaxed": sum(r["relaxed"] for r in rows) / n if ok else None,
        "accuracy_exact": sum(r["exact"] for r in rows) / n if ok else None,
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
        "request_time_mean_s": sum(r["e2e_s"] for r in ok) / len(ok) if ok else None,
        "wall_s": wall,
        "prompt_tokens_mean": sum(prompt) / len(prompt) if prompt else None,
        "kept_ratio_mean": server["kept_ratio_mean"],
        "prompt_tokens_seen": server["prompt_tokens_seen"],
        "prompt_tokens_kept": server["prompt_tokens_kept"],
        "kv_blocks_freed": server["kv_blocks_freed"],
        "metrics_error": server["metrics_error"],
    }


def _sum(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) if xs else None


def summarize(endpoints: dict, score: str = "relaxed") -> dict:
    """Per-endpoint totals and OP/OG/OL/OE against the first endpoint (in place; returned)."""
    names = list(endpoints)
    ref = names[0]
    key = "accuracy_" + score
    acc = {n: {t: v[key] for t, v in ep["tasks"].items()} for n, ep in endpoints.items()}
    ov = mt.overall(acc, ref)
    ref_ep = endpoints[ref]
    ref_pred = [r["prediction"] for r in ref_ep["samples"]]
    ref_time = {t: v["request_time_mean_s"] for t, v in ref_ep["tasks"].items()}
    ref_ttft = {t: v["ttft_mean_s"] for t, v in ref_ep["tasks"].items()}
    for n, ep in endpoints.items():
        rows, tasks = ep["samples"], ep["tasks"]
        seen = _sum(v["prompt_tokens_seen"] for v in tasks.values())
        kept = _sum(v["prompt_tokens_kept"] for v in tasks.values())
        answered = [r for r in rows if r["ok"]]
        ttft = [r["ttft_s"] for r in answered if r["ttft_s"] is not None]
        ep["overall"] = {
            "samples": len(rows), "answered": len(answered), "failures": len(rows) - len(answered),
            "accuracy_relaxed": (sum(r["relaxed"] for r in rows) / len(rows)
                                 if answered else None),
            "accuracy_exact": sum(r["exact"] for r in rows) / len(rows) if answered else None,
            "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
            "kept_ratio_mean": kept / seen if kept is not None and seen else None,
            "kv_blocks_freed": _sum(v["kv_blocks_freed"] for v in tasks.values()),
            "OP": ov[n]["OP"], "OG": ov[n]["OG"], "skipped_tasks": ov[n]["skipped_tasks"],
            "OL": (mt.loyalty([r["prediction"] for r in rows], ref_pred)
                   if ep["error"] is None
                   and ref_ep["error"] is None else None),
            "OE": mt.efficiency({t: v["request_time_mean_s"] for t, v in tasks.items()}, ref_time),
            "ttft_ratio": mt.efficiency({t: v["ttft_mean_s"] for t, v in tasks.items()},
                                        ref_ttft),
        }
    return {"reference": ref, "score": score}


def _fmt(v, spec="{:.3f}") -> str:
    return "–" if v is None else spec.format(v)


def markdown(results: dict) -> str:
    eps = results["endpoints"]
    tasks = list(dict.fromkeys(t for ep in eps.values() for t in ep["tasks"]))
    score = results["score"]
    lines = [f"# vllm-kvsparse eval: {results['dataset']}",
             "", f"Reference: **{results['reference']}**; accuracy = {score} match "
             f"(exact in brackets); OP/OG/OL/OE as EffiVLM-Bench (docs/eval.md).", ""]
    head = ["endpoint", *tasks, "all", "failures", "OP", "OG", "OL", "OE", "TTFT ms",
            "TTFT ratio", "kept ratio", "blocks freed"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ep in eps.items():
        o = ep["overall"]
        cells = [name]
        for t in tasks:
            v = ep["tasks"].get(t, {})
            cells.append(f"{_fmt(v.get('accuracy_' + score), '{:.2f}')} "
                         f"({_fmt(v.get('accuracy_exact'), '{:.2f}')})")
        cells += [_fmt(o["accuracy_" + score], "{:.3f}"), str(o["failures"]),
                  _fmt(o["OP"]), _fmt(o["OG"]), _fmt(o["OL"]), _fmt(o["OE"]),
                  _fmt(o["ttft_mean_s"] and o["ttft_mean_s"] * 1000, "{:.1f}"),
                  _fmt(o["ttft_ratio"], "{:.2f}"), _fmt(o["kept_ratio_mean"]),
                  _fmt(o["kv_blocks_freed"], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [(n, ep["error"]) for n, ep in eps.items() if ep["error"]]
    failed = [(n, r) for n, ep in eps.items() for r in ep["samples"]
              if not r["ok"] and not ep["error"]]
    if errors or failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {n}: {e}" for n, e in errors]
        lines += [f"- {n} / {r['id']}: {r['error']}" for n, r in failed[:50]]
        if len(failed) > 50:
            lines.append(f"- ... and {len(failed) - 50} more (eval.json)")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Accuracy against mean kept ratio: one point per endpoint and task, plus 'all'."""
    from vllm_kvsparse.bench.plots import _note, _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_data = False
    score = "accuracy_" + results["score"]
    for i, (name, ep) in enumerate(results["endpoints"].items()):
        color = f"C{i % 10}"
        pts = [(v["kept_ratio_mean"], v[score]) for v in ep["tasks"].values()
               if v["kept_ratio_mean"] is not None and v[score] is not None]
        o = ep["overall"]
        if o["kept_ratio_mean"] is None and o[score] is not None:
            pts, o_kept = [], 1.0  # a dense server keeps everything
        else:
            o_kept = o["kept_ratio_mean"]
        if pts:
            ax.scatter(*zip(*pts), color=color, alpha=0.4, s=20)
        if o_kept is not None and o[score] is not None:
            ax.scatter([o_kept], [o[score]], color=color, s=70, label=name, edgecolor="k")
            any_data = True
    if any_data:
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    else:
        _note(ax, "no endpoint answered")
    ax.set_xlabel("mean kept ratio (server /metrics; dense = 1)")
    ax.set_ylabel(f"accuracy ({results['score']})")
    ax.set_title("accuracy vs kept ratio (large: all tasks, small: per task)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    names = [n for n, _ in args.endpoints]
    if len(set(names)) != len(names):
        print("vllm-kvsparse eval: error: endpoint names must be distinct", file=sys.stderr)
        return 2
    try:
        samples = ds.load(args.dataset, args.limit)
    except (ds.DatasetError, ValueError) as e:
        print(f"vllm-kvsparse eval: error: {e}", file=sys.stderr)
        return 2
    endpoints = {}
    for name, url in args.endpoints:
        endpoints[name] = asyncio.run(_run_endpoint(name, url, samples, args))
        if endpoints[name]["error"]:
            print(f"vllm-kvsparse eval: {endpoints[name]['error']}", file=sys.stderr)
    results = {"dataset": args.dataset, "limit": args.limit, "max_tokens": args.max_tokens,
               "concurrency": args.concurrency, **summarize(endpoints, args.score),
               "endpoints": endpoints}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (out / "eval.md").write_text(md)
    if not args.no_plots:
        plot(results, out / "accuracy_vs_kept_ratio.png")
    print(md)
    failures = sum(ep["overall"]["failures"] for ep in endpoints.values())
    if failures:
        print(f"vllm-kvsparse eval: {failures} request(s) failed (listed in {out}/eval.md)",
              file=sys.stderr)
    return 1 if any(ep["error"] for ep in endpoints.values()) else 0
