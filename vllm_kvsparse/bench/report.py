"""Statistics over the request records, results.json and results.md.

Percentiles use linear interpolation between closest ranks (numpy's default "linear" method):
the p-th percentile of sorted x[0..n-1] is at rank p/100 * (n-1).
Latencies in the summary are milliseconds, throughputs are per second of the endpoint's run
(first send to last response), KV usage is a fraction in [0, 1].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    rank = p / 100 * (len(xs) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def dist_ms(values_s: list[float]) -> dict:
    """{p50, p90, p99, mean} in milliseconds (None for no data)."""
    ms = [v * 1000 for v in values_s]
    out = {f"p{p}": percentile(ms, p) for p in PERCENTILES}
    out["mean"] = mean(ms)
    return out


def summarize(records: list[dict], duration_s: float | None) -> dict:
    """Client-side summary of one endpoint's request records (RequestResult dicts)."""
    ok = [r for r in records if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    prompt_tokens = [r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None]
    dur = duration_s if duration_s and duration_s > 0 else None
    errors: dict[str, int] = {}
    for r in records:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {
        "requests": len(records),
        "successes": len(ok),
        "failures": len(records) - len(ok),
        "duration_s": duration_s,
        "ttft_ms": dist_ms([r["ttft_s"] for r in ok]),
        "itl_ms": dist_ms([g for r in ok for g in r["itl_s"]]),
        "tpot_ms_mean": mean([r["tpot_s"] * 1000 for r in ok if r["tpot_s"] is not None]),
        "e2e_ms": dist_ms([r["e2e_s"] for r in ok]),
        "output_tokens": out_tokens,
        "prompt_tokens": sum(prompt_tokens) if prompt_tokens else None,
        "output_tokens_per_s": out_tokens / dur if dur else None,
        "requests_per_s": len(ok) / dur if dur else None,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
    }


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, allow_nan=False, default=_jsonable) + "\n")


def _jsonable(x):
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


# (label, getter over an endpoint entry, format, is ratio-comparable)
def _rows():
    def s(*keys):
        def get(ep):
            v = ep
            for k in keys:
                v = v.get(k) if isinstance(v, dict) else None
            return v
        return get

    def pct(key):
        def get(ep):
            v = (ep.get("server") or {}).get(key)
            return None if v is None else 100 * v
        return get

    rows = [("successes / requests", lambda ep: f"{ep['summary']['successes']} / "
             f"{ep['summary']['requests']}", None, False),
            ("failures", s("summary", "failures"), "{:d}", False)]
    for p in ("p50", "p90", "p99"):
        rows.append((f"TTFT {p} (ms)", s("summary", "ttft_ms", p), "{:.1f}", True))
    rows.append(("TTFT mean (ms)", s("summary", "ttft_ms", "mean"), "{:.1f}", True))
    for p in ("p50", "p90", "p99"):
        rows.append((f"ITL {p} (ms)", s("summary", "itl_ms", p), "{:.2f}", True))
    rows += [("TPOT mean per request (ms)", s("summary", "tpot_ms_mean"), "{:.2f}", True),
             ("E2E p50 (ms)", s("summary", "e2e_ms", "p50"), "{:.1f}", True),
             ("E2E p99 (ms)", s("summary", "e2e_ms", "p99"), "{:.1f}", True),
             ("output tokens/s", s("summary", "output_tokens_per_s"), "{:.2f}", True),
             ("requests/s", s("summary", "requests_per_s"), "{:.3f}", True),
             ("output tokens", s("summary", "output_tokens"), "{:d}", True),
             ("prompt tokens", s("summary", "prompt_tokens"), "{:d}", True),
             ("mean kept ratio", s("server", "kept_ratio_mean"), "{:.3f}", True),
             ("KV usage max (%)", pct("kv_usage_max"), "{:.2f}", True),
             ("KV usage mean (%)", pct("kv_usage_mean"), "{:.2f}", True),
             ("KV blocks freed", s("server", "kv_blocks_freed"), "{:.0f}", True)]
    return rows


def _fmt(v, fmt) -> str:
    if v is None:
        return "–"
    if fmt is None:
        return str(v)
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def markdown(results: dict) -> str:
    eps = results["endpoints"]
    names = list(eps)
    base = results["config"].get("baseline")
    others = [n for n in names if n != base] if base in eps and len(names) > 1 else []
    lines = ["# vllm-kvsparse bench", ""]
    cfg = results["config"]
    lines.append(f"`{cfg['command_line']}`")
    lines.append("")
    lines.append(f"Workload: {cfg['workload_description']}; concurrency {cfg['concurrency']}, "
                 f"request rate {cfg['request_rate']}/s, seed {cfg['seed']}, temperature 0.")
    lines.append("")
    header = ["metric"] + names + [f"{n}/{base}" for n in others]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    live = {n for n in names if eps[n]["summary"]["successes"]}
    for label, get, fmt, ratio_ok in _rows():
        cells = [label] + [_fmt(get(eps[n]), fmt) for n in names]
        for n in others:
            a, b = get(eps[n]), get(eps[base])
            ok = (ratio_ok and n in live and base in live and isinstance(a, (int, float))
                  and isinstance(b, (int, float)) and b)
            cells.append(f"{a / b:.3f}" if ok else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    per_layer = {n: (eps[n].get("server") or {}).get("kept_ratio_per_layer") for n in names}
    if any(per_layer.values()):
        layers = sorted({layer for v in per_layer.values() if v for layer in v},
                        key=lambda x: (not x.lstrip("-").isdigit(),
                                       int(x) if x.lstrip("-").isdigit() else 0, x))
        lines += ["## Mean kept ratio per layer", "",
                  "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for layer in layers:
            lines.append(f"| {layer} | " + " | ".join(
                _fmt((per_layer[n] or {}).get(layer), "{:.3f}") for n in names) + " |")
        lines.append("")
    else:
        lines += ["No kvsparse metrics on any endpoint (dense servers, or no plugin metrics).",
                  ""]
    notes = []
    for n in names:
        ep = eps[n]
        if ep.get("discovery_error"):
            notes.append(f"- **{n}** ({ep['url']}): model discovery failed: "
                         f"{ep['discovery_error']}")
        for err, count in list(ep["summary"]["errors"].items())[:5]:
            notes.append(f"- **{n}**: {count} × {err}")
        merr = (ep.get("server") or {}).get("metrics_error")
        if merr:
            notes.append(f"- **{n}**: server metrics unavailable: {merr}")
    if notes:
        lines += ["## Errors", ""] + notes + [""]
    lines += ["Endpoints: " + ", ".join(f"{n} = {eps[n]['url']} (model "
                                        f"`{eps[n].get('model') or 'unknown'}`)" for n in names), ""]
    return "\n".join(lines)
