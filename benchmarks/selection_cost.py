"""ZipVL's per-layer CPU costs next to dense attention, side by side in one process (issue 13).

    python benchmarks/selection_cost.py --lengths 8192,16384 --repeats 3 --out JSON

For each prompt length n, one layer of the benchmark model's shapes (16 query heads, 4 KV
heads, head_dim 64, bf16 inputs; 64 recent + 64 random probes), timed in alternation within
each repeat (medians reported):

  dense attn       vLLM's own CPU attention kernel, causal over all n rows (what dense prefill
                   runs per layer; attention/cpu_kernel.causal_attention)
  select           zipvl.select_important_tokens as shipped (chunked probe sums, partial
                   selection for Eq. 7 / Eq. 9)
  select (before)  the previous implementation: per-group [g, m, n] softmax matrices and full
                   sorts (kept here as the baseline)
  sparse (vLLM)    token-sparse attention over t = kept_ratio * n kept rows through vLLM's kernel
                   (attention/cpu_kernel.sparse_prefill_attention, the shipped CPU path)
  sparse (torch)   the same through the fp32 torch reference (the CPU path before)

Ratios: select / dense attn (targets: <= 10 % at 8K, <= 5 % at 16K) and sparse / (kept-FLOP
fraction x dense attn), kept-FLOP fraction = (t / n)^2 for causal attention (target <= 1.3).
The kept ratio per length defaults to the peaked benchmark model's measured mean at tau 0.975
(0.55 at 2K, 0.31 at 8K, 0.21 at 16K; benchmarks/results), override with --kept-ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vllm_kvsparse import zipvl  # noqa: E402

KEPT = {2048: 0.55, 8192: 0.31, 16384: 0.21}


def select_before(query, key, tau=0.975, num_recent=64, num_random=64, keep_first=4,
                  keep_last=1, scale=None, seed=0):
    """The selection before issue 13: per-group softmax matrices, full sorts."""
    n = query.shape[0]
    probe_idx = zipvl.default_probe_indices(n, num_recent, num_random, seed)
    acc = zipvl.probe_attention_matrix(query, key, probe_idx, scale).sum(0)
    norm = zipvl.normalize_by_visibility(acc, probe_idx)
    scores = acc.double()
    nonzero = int((scores > 0).sum())
    running = torch.cumsum(torch.sort(scores, descending=True).values, 0)
    reached = torch.nonzero(running >= tau * probe_idx.numel())
    p = nonzero if reached.numel() == 0 else min(int(reached[0]) + 1, nonzero)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.sort(norm, descending=True, stable=True).indices[:p]] = True
    keep[:keep_first] = True
    keep[n - keep_last:] = True
    return torch.nonzero(keep).flatten()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(lengths, kept_ratios, repeats, heads=16, kv_heads=4, head_dim=64, seed=0):
    from vllm_kvsparse.attention import cpu_kernel

    spec = cpu_kernel.default_spec(torch.bfloat16, head_dim)
    scale = head_dim ** -0.5
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(seed + n)
        q = (torch.randn(n, heads, head_dim, generator=g) * 3).bfloat16()
        k = torch.randn(n, kv_heads, head_dim, generator=g).bfloat16()
        v = torch.randn(n, kv_heads, head_dim, generator=g).bfloat16()
        ratio = kept_ratios.get(n, KEPT.get(n, 0.3))
        t = max(1, round(ratio * n))
        kept = torch.sort(torch.randperm(n, generator=g)[:t]).values
        # same selection either way (the fast paths are exact)
        same = torch.equal(zipvl.select_important_tokens(q, k, scale=scale).indices,
                           select_before(q, k, scale=scale))
        parts = {
            "dense_attn": lambda: cpu_kernel.causal_attention(q, k, v, scale, spec),
            "select": lambda: zipvl.select_important_tokens(q, k, scale=scale),
            "select_before": lambda: select_before(q, k, scale=scale),
            "sparse_vllm": lambda: cpu_kernel.sparse_prefill_attention(q, k, v, kept, scale,
                                                                       spec),
            "sparse_torch": lambda: zipvl.sparse_prefill_attention_reference(q, k, v, kept,
                                                                             scale),
        }
        times = {name: [] for name in parts}
        parts["dense_attn"]()   # warm-up
        for r in range(repeats):
            order = list(parts) if r % 2 == 0 else list(parts)[::-1]
            for name in order:
                times[name].append(timed(parts[name]))
        med = {name: statistics.median(v) for name, v in times.items()}
        flop = (t / n) ** 2
        rows.append({"n": n, "kept_ratio": t / n, "kept_flop_fraction": flop,
                     "same_selection_as_before": same, "isa": spec.isa,
                     "seconds_median": med, "seconds_all": times,
                     "select_vs_dense": med["select"] / med["dense_attn"],
                     "select_before_vs_dense": med["select_before"] / med["dense_attn"],
                     "sparse_vllm_vs_flop_share": med["sparse_vllm"] / (flop * med["dense_attn"]),
                     "sparse_torch_vs_flop_share":
                         med["sparse_torch"] / (flop * med["dense_attn"])})
    return rows


def render(rows) -> str:
    headers = ["n", "kept", "dense attn s", "select s", "select/dense", "select before s",
               "before/dense", "sparse vLLM s", "vLLM/(flop x dense)", "sparse torch s",
               "torch/(flop x dense)", "same set"]
    table = [[r["n"], r["kept_ratio"], r["seconds_median"]["dense_attn"],
              r["seconds_median"]["select"], r["select_vs_dense"],
              r["seconds_median"]["select_before"], r["select_before_vs_dense"],
              r["seconds_median"]["sparse_vllm"], r["sparse_vllm_vs_flop_share"],
              r["seconds_median"]["sparse_torch"], r["sparse_torch_vs_flop_share"],
              r["same_selection_as_before"]] for r in rows]
    return common.markdown_table(headers, table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--kept-ratios", default="", help="n:ratio,... (default: measured means)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    kept = {int(a): float(b) for a, b in (x.split(":") for x in args.kept_ratios.split(",")
                                          if x)}
    meta = common.meta(["benchmarks/selection_cost.py", *(argv or sys.argv[1:])])
    meta["torch_threads"] = torch.get_num_threads()
    import os
    meta["loadavg_before"] = os.getloadavg()
    meta["other_busy_processes"] = common.other_busy_processes()
    rows = run(lengths, kept, args.repeats)
    meta["loadavg_after"] = os.getloadavg()
    print(common.cpu_line(meta["machine"]), f"| torch threads {meta['torch_threads']} | load "
          f"{meta['loadavg_before'][0]:.1f} -> {meta['loadavg_after'][0]:.1f}")
    print(render(rows))
    if args.out:
        common.write_json(Path(args.out), {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
