"""`vllm-kvsparse bench`: argparse and the run loop."""

from __future__ import annotations

DESCRIPTION = """Drive one or more OpenAI-compatible endpoints with a multimodal streaming workload
and compare them (TTFT, inter-token latency, throughput, kvsparse_ server metrics).

    vllm-kvsparse bench --endpoint dense=http://127.0.0.1:8000 \\
                        --endpoint zipvl=http://127.0.0.1:8001 \\
                        --num-requests 100 --concurrency 8 --image-size 448x448 --out bench-out

Endpoints run one after another with the identical workload and arrival schedule. See
docs/bench.md for what each number means.
"""

import argparse
import asyncio
import math
import shlex
import sys
import time
from pathlib import Path

INF = float("inf")


# ---- argparse value types: one-line errors naming the value and the valid range ----

def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(
                f"{text!r} is invalid; valid range is integers >= {lo}")
        return v
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not v > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; valid range is numbers > 0")
    return v


def _rate(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity"):
        return INF
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not v > 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid; valid range is numbers > 0 (requests/s) or 'inf'")
    return v


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else map(int, parts)
    except ValueError:
        w = h = 0
    if len(parts) > 2 or not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid; valid values are WIDTHxHEIGHT (or one side) with each side "
            "in 16..8192, e.g. 448x448")
    return w, h


def _endpoint(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    name, url = name.strip(), url.strip()
    if not sep or not name or not url or "/" in name:
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid; valid values are NAME=URL, e.g. zipvl=http://127.0.0.1:8000")
    return name, url


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", dest="endpoints", type=_endpoint, action="append",
                   required=True, metavar="NAME=URL",
                   help="an OpenAI-compatible server (http://host:port, /v1 optional); repeat "
                        "to compare (e.g. dense=... and zipvl=...)")
    p.add_argument("--model", help="model name to request (default: the first one listed by "
                                   "each endpoint's /v1/models)")
    p.add_argument("--baseline", metavar="NAME",
                   help="endpoint the ratio columns divide by (default: 'dense' if present, "
                        "else the first endpoint)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", metavar="JSONL",
                   help='file of {"prompt": ..., "images": [path-or-url, ...], "max_tokens": N} '
                        "lines (default: synthetic images)")
    w.add_argument("--num-requests", type=_int_at_least(1), default=None,
                   help="requests per endpoint (default: 32; with --workload: the file's lines)")
    w.add_argument("--images-per-prompt", type=_int_at_least(0), default=1)
    w.add_argument("--image-size", type=_image_size, default=(448, 448), metavar="WxH",
                   help="synthetic image resolution (default 448x448)")
    w.add_argument("--prompt", default=None,
                   help="text after the images of each synthetic request")
    w.add_argument("--max-tokens", type=_int_at_least(1), default=64,
                   help="output tokens per request (JSONL lines may override)")
    w.add_argument("--ignore-eos", action="store_true",
                   help="ask vLLM to generate exactly max_tokens (equal output lengths)")
    w.add_argument("--seed", type=int, default=0,
                   help="seeds the images, the arrival times and the sampling seed")
    r = p.add_argument_group("load")
    r.add_argument("--concurrency", type=_int_at_least(1), default=8,
                   help="most requests in flight at once (default 8)")
    r.add_argument("--request-rate", type=_rate, default=INF,
                   help="Poisson arrival rate in requests/s (default inf: all at once, bounded "
                        "by --concurrency)")
    r.add_argument("--warmup", type=_int_at_least(0), default=0,
                   help="requests sent one by one before measuring (not in the results)")
    r.add_argument("--timeout", type=_positive_float, default=300.0,
                   help="seconds per request, whole stream (default 300)")
    r.add_argument("--metrics-interval", type=_positive_float, default=0.25,
                   help="seconds between /metrics samples of KV usage during the run")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    o.add_argument("--fail-on-error", action="store_true",
                   help="exit 1 when any request failed")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `bench` on the `vllm-kvsparse` subparsers."""
    p = sub.add_parser("bench", help="compare OpenAI-compatible endpoints (dense vs zipvl) on "
                                     "a multimodal streaming workload",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main, _bench_parser=p)
    return p


# ---- the run ----

async def _run_endpoint(name: str, url: str, args, requests, offsets) -> dict:
    from vllm_kvsparse.bench import client as cl
    from vllm_kvsparse.bench import metrics_scrape as ms

    root, v1 = cl.api_base(url)
    max_conn = args.concurrency if args.concurrency else None
    entry: dict = {"url": url, "model": args.model, "discovery_error": None}
    # A client of its own for /metrics: the request client's pool is full during the run.
    async with cl.make_client(args.timeout, max_conn) as http, \
            cl.make_client(30.0, 2) as http_metrics:
        model, err = await cl.discover_model(http, root)
        entry["discovery_error"] = err
        if args.model is None:
            entry["model"] = model
        for i in range(args.warmup if entry["model"] else 0):
            await cl.send(http, v1, entry["model"], requests[i % len(requests)], seed=args.seed,
                          timeout=args.timeout, ignore_eos=args.ignore_eos, t0=time.perf_counter())
        before = await ms.scrape(http_metrics, root)
        sampler = ms.UsageSampler(http_metrics, root, args.metrics_interval)
        sampler.start()
        sem = asyncio.Semaphore(args.concurrency)
        bar = _progress(name, len(requests), args.no_progress)
        t0 = time.perf_counter()

        async def one(req, offset):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                if entry["model"] is None:
                    res = cl.RequestResult(req.index, error="model discovery failed: " + err,
                                           start_s=time.perf_counter() - t0, e2e_s=0.0)
                else:
                    res = await cl.send(http, v1, entry["model"], req, seed=args.seed,
                                        timeout=args.timeout, ignore_eos=args.ignore_eos, t0=t0)
            res.scheduled_s = offset
            bar.update(1)
            if not res.ok:
                bar.set_postfix_str(f"failed: {res.error[:60]}", refresh=False)
            return res

        results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
        duration = time.perf_counter() - t0
        bar.close()
        await sampler.stop()
        if any(r.ok for r in results):
            await asyncio.sleep(1.0)  # let the server's stat loggers record the last requests
        after = await ms.scrape(http_metrics, root)
    from vllm_kvsparse.bench import report

    records = [r.to_dict() for r in results]
    entry["summary"] = report.summarize(records, duration if any(r.ok for r in results)
                                        else None)
    entry["server"] = ms.server_summary(before, after, sampler.samples)
    entry["kv_usage_series"] = [[round(t, 3), u] for t, u in sampler.samples]
    entry["requests"] = records
    return entry


def _progress(name: str, total: int, disabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=name, unit="req", file=sys.stderr, disable=disabled,
                dynamic_ncols=True)


def _describe(args, requests) -> str:
    if args.workload:
        return f"{len(requests)} requests from {args.workload}"
    w, h = args.image_size
    return (f"{len(requests)} synthetic requests × {args.images_per_prompt} image(s) {w}x{h}, "
            f"max_tokens {args.max_tokens}")


def main(args: argparse.Namespace) -> int:
    from vllm_kvsparse.bench import report, workload

    parser = args._bench_parser
    names = [n for n, _ in args.endpoints]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        parser.error(f"argument --endpoint: name {sorted(dup)[0]!r} is given twice; "
                     "valid values are distinct names")
    if args.baseline is not None and args.baseline not in names:
        parser.error(f"argument --baseline: {args.baseline!r} is invalid; valid values are "
                     + ", ".join(names))
    baseline = args.baseline or ("dense" if "dense" in names else names[0])
    try:
        if args.workload:
            requests = workload.from_jsonl(args.workload, args.max_tokens, args.num_requests)
        else:
            w, h = args.image_size
            requests = workload.synthetic(args.num_requests or 32, args.images_per_prompt, w, h,
                                          args.max_tokens, args.seed,
                                          args.prompt or workload.DEFAULT_PROMPT)
    except (workload.WorkloadError, OSError) as e:
        parser.error(f"argument --workload: {e}")
    offsets = workload.arrival_offsets(len(requests), args.request_rate, args.seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "command_line": shlex.join(["vllm-kvsparse", *sys.argv[1:]])
        if Path(sys.argv[0]).name.startswith("vllm-kvsparse") else shlex.join(sys.argv),
        "endpoints": dict(args.endpoints), "baseline": baseline, "model": args.model,
        "workload": args.workload, "workload_description": _describe(args, requests),
        "num_requests": len(requests), "images_per_prompt": None if args.workload
        else args.images_per_prompt, "image_size": None if args.workload
        else list(args.image_size), "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
        "seed": args.seed, "temperature": 0, "concurrency": args.concurrency,
        "request_rate": "inf" if args.request_rate == INF else args.request_rate,
        "warmup": args.warmup, "timeout_s": args.timeout,
        "metrics_interval_s": args.metrics_interval,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    endpoints = {}
    for name, url in args.endpoints:
        endpoints[name] = asyncio.run(_run_endpoint(name, url, args, requests, offsets))
    results = {"config": config, "endpoints": endpoints}

    report.write_json(results, out / "results.json")
    md = report.markdown(results)
    (out / "results.md").write_text(md)
    if not args.no_plots:
        from vllm_kvsparse.bench import plots
        plots.write_all(endpoints, out)
    print(md)
    print(f"results written to {out}/ (results.json, results.md"
          + ("" if args.no_plots else ", ttft.png, throughput.png, kept_ratio_per_layer.png")
          + ")")
    failures = sum(ep["summary"]["failures"] for ep in endpoints.values())
    return 1 if args.fail_on_error and failures else 0
