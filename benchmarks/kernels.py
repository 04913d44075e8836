"""Kernel benchmark (not a test): each ZipVL kernel against its baseline, Qwen2-VL-7B shapes.

    python benchmarks/kernels.py                       # CUDA if present, else CPU torch paths
    python benchmarks/kernels.py --device cuda --seq-lens 4096,32768 --kept 50 --out x.json

Rows (times in ms; "dense" is causal SDPA over all n tokens, FlashAttention on GPU):
    probe_scores      fused Triton scorer (GPU) or torch reference; % of dense attention
    sparse_attention  Triton gather-on-the-fly kernel; "gather+sdpa" = index_select, dense
                      causal SDPA on the kept tokens, scatter (the alternative design); speedup
                      vs dense
    kv_compaction     Triton two-phase paged compaction (GPU) or torch reference; GB/s counted
                      as read + write of the moved K/V rows, next to a device-to-device copy of
                      the same bytes
Targets to check on an H100 (docs/kernels.md): probe <= 5 % of dense at 32K; sparse at 50 %
kept >= 3x faster than dense at 32K; compaction >= 50 % of copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout too
try:
    from vllm_kvsparse.kernels import kv_compaction, probe_scores, sparse_attention
except ImportError:   # not installed: kernels/ is a plain folder in the checkout
    import kernels.kv_compaction as kv_compaction       # type: ignore[no-redef]
    import kernels.probe_scores as probe_scores         # type: ignore[no-redef]
    import kernels.sparse_attention as sparse_attention  # type: ignore[no-redef]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--seq-lens", default=None,
                    help="comma list; default 4096,...,131072 on cuda, 1024,2048 on cpu")
    ap.add_argument("--kept", default="25,50,75", help="kept percentages, comma list")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES),
                    help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--num-probes", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16, help="KV cache page size")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.seq_lens = [int(x) for x in (args.seq_lens or (
        "4096,16384,32768,65536,131072" if on_cuda else "1024,2048")).split(",")]
    args.kept = [int(x) for x in args.kept.split(",")]
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    args.iters = args.iters if args.iters is not None else (20 if on_cuda else 3)
    return args


def timed(fn, device, warmup, iters) -> float:
    """Median milliseconds per call (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return sorted(samples)[len(samples) // 2]


def dense_causal(q, k, v):
    """[n, H, d] causal attention via SDPA with native GQA. On CUDA the FlashAttention backend
    is forced, so an unsupported case raises instead of silently timing a slower backend."""
    group = q.shape[1] // k.shape[1]
    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.FLASH_ATTENTION,
                                                                SDPBackend.MATH]
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], is_causal=True,
                                             enable_gqa=group > 1)
    return out[0].transpose(0, 1)


def gather_sdpa(q, k, v, idx):
    """The other design: gather kept rows, dense causal attention, scatter back."""
    out = torch.zeros_like(q)
    out[idx] = dense_causal(q[idx], k[idx], v[idx])
    return out


def kept_indices(n, percent, gen, device):
    t = max(1, n * percent // 100)
    return torch.sort(torch.randperm(n, generator=gen)[:t]).values.to(device)


def bench_length(args, n, device, dtype, use_triton, results):
    gen = torch.Generator().manual_seed(n)
    H, Hkv, d = args.heads, args.kv_heads, args.head_dim
    q = torch.randn(n, H, d, generator=gen).to(device, dtype)
    k = torch.randn(n, Hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(n, Hkv, d, generator=gen).to(device, dtype)
    t = lambda fn: timed(fn, device, args.warmup, args.iters)   # noqa: E731
    row = lambda **kw: results.append(dict(n=n, **kw)) or results[-1]   # noqa: E731

    dense_ms = t(lambda: dense_causal(q, k, v))
    row(kernel="dense_attention", impl="sdpa", ms=dense_ms)

    m = min(args.num_probes, n)
    pos = torch.cat([torch.sort(torch.randperm(n - m // 2, generator=gen)[:m - m // 2]).values,
                     torch.arange(n - m // 2, n)]).to(device)
    impl = probe_scores.probe_scores_triton if use_triton else probe_scores.probe_scores_reference
    ms = t(lambda: impl(q[pos], pos, k))
    row(kernel="probe_scores", impl="triton" if use_triton else "torch", ms=ms,
        pct_of_dense=100 * ms / dense_ms, probes=m)

    cu_seq = torch.tensor([0, n], device=device)
    for percent in args.kept:
        idx = kept_indices(n, percent, gen, device)
        cu_idx = torch.tensor([0, idx.numel()], device=device)
        if use_triton:
            ms = t(lambda: sparse_attention.sparse_attention_triton(
                q, k, v, idx, cu_seq, cu_idx, max_kept=idx.numel()))
            row(kernel="sparse_attention", impl="triton", kept_pct=percent, ms=ms,
                speedup_vs_dense=dense_ms / ms)
        else:
            ms = t(lambda: sparse_attention.sparse_attention_reference(q, k, v, idx, cu_seq,
                                                                       cu_idx))
            row(kernel="sparse_attention", impl="torch", kept_pct=percent, ms=ms,
                speedup_vs_dense=dense_ms / ms)
        ms = t(lambda: gather_sdpa(q, k, v, idx))
        row(kernel="sparse_attention", impl="gather+sdpa", kept_pct=percent, ms=ms,
            speedup_vs_dense=dense_ms / ms)
        bench_compaction(args, n, idx, device, dtype, use_triton, t, row)


def bench_compaction(args, n, idx, device, dtype, use_triton, t, row):
    bs, Hkv, d = args.block_size, args.kv_heads, args.head_dim
    num_blocks = math.ceil(n / bs)
    gen = torch.Generator().manual_seed(7)
    key_cache = torch.randn(num_blocks, bs, Hkv, d, generator=gen).to(device, dtype)
    value_cache = torch.randn(num_blocks, bs, Hkv, d, generator=gen).to(device, dtype)
    table = torch.randperm(num_blocks, generator=gen).to(device, torch.int32)[None]
    cu = torch.tensor([0, idx.numel()], device=device)
    moved = int((idx != torch.arange(idx.numel(), device=device)).sum())
    moved_bytes = 2 * moved * Hkv * d * key_cache.element_size()          # K and V rows
    impl = kv_compaction.compact_kv_triton if use_triton else kv_compaction.compact_kv_reference
    ms = t(lambda: impl(key_cache, value_cache, table, idx, cu))
    src = torch.empty(max(1, moved_bytes), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = t(lambda: dst.copy_(src))
    extra = {}
    if device.type == "cuda":
        extra["host_ms_behind_queue"] = host_return_behind_queue(
            lambda: impl(key_cache, value_cache, table, idx, cu), device)
    row(kernel="kv_compaction", impl="triton" if use_triton else "torch",
        kept_pct=round(100 * idx.numel() / n), ms=ms, moved_rows=moved,
        gbps=2 * moved_bytes / ms / 1e6, copy_ms=copy_ms, copy_gbps=2 * moved_bytes / copy_ms / 1e6,
        **extra)


def host_return_behind_queue(fn, device, reps=5) -> float:
    """Median host milliseconds for fn() to return while ~10 large matmuls are still queued
    ahead of it: launch cost if fn never syncs, the whole queue if it does. In a served
    prefill the queue is the layer's attention and the next layers' work."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        for _ in range(10):
            a @ a
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(samples)[reps // 2]


def markdown(results):
    lines = ["| n | kernel | impl | kept % | ms | note |", "|---|---|---|---|---|---|"]
    for r in results:
        note = ""
        if "pct_of_dense" in r:
            note = f"{r['pct_of_dense']:.1f} % of dense"
        elif "speedup_vs_dense" in r:
            note = f"{r['speedup_vs_dense']:.2f}x vs dense"
        elif "gbps" in r:
            note = (f"{r['gbps']:.1f} GB/s vs copy {r['copy_gbps']:.1f} GB/s "
                    f"({100 * r['gbps'] / r['copy_gbps']:.0f} %)")
            if "host_ms_behind_queue" in r:
                note += f"; returns in {r['host_ms_behind_queue']:.3f} ms behind a busy queue"
        lines.append(f"| {r['n']} | {r['kernel']} | {r['impl']} | {r.get('kept_pct', '')} | "
                     f"{r['ms']:.3f} | {note} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    use_triton = device.type == "cuda"
    results = []
    for n in args.seq_lens:
        bench_length(args, n, device, dtype, use_triton, results)
        print(f"done n={n}", file=sys.stderr)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(
        label=("GPU: Triton kernels" if use_triton else
               "CPU: torch reference paths only (no Triton on CPU outside the interpreter); "
               "not representative of GPU performance"),
        device=torch.cuda.get_device_name(device) if use_triton else platform.processor() or
        platform.machine(),
        cpu_threads=torch.get_num_threads(), torch=torch.__version__, triton=triton_version,
        python=platform.python_version(), dtype=args.dtype,
        shape=dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                   probes=args.num_probes, block_size=args.block_size),
        warmup=args.warmup, iters=args.iters, timing="median ms",
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    table = markdown(results)
    print(f"{meta['label']} — {meta['device']}, {args.dtype}\n\n{table}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")


if __name__ == "__main__":
    main()
