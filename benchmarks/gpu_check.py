"""GPU evidence in one command (issue 16): the CUDA path's kernels, one decoder layer and a whole
model prefill, measured on whatever CUDA GPU is at hand, without vLLM and without network.

    bash scripts/gpu_check.sh OUT_DIR              # a CUDA GPU, torch, triton, transformers
    bash scripts/gpu_check.sh OUT_DIR --dry-run    # CPU rehearsal: tiny sizes, Triton interpreter

Steps, in order; each runs in a forked child with its own time budget (BUDGET_S), so a slow or
hung step is killed and recorded as timed out while the rest still run; inside a step, an item
whose estimated time exceeds what is left of the budget is recorded as skipped, with the reason:

  correctness   every Triton kernel, compiled for the GPU, against its torch reference in bf16
                and fp16 (dry run: fp32 and fp16 under the interpreter): probe scores on dense
                and paged keys, sparse attention (varlen), KV compaction in a FlashAttention
                cache laid out [2, num_blocks, block_size, Hkv, d] and in vLLM 0.32's
                FlashAttention views; Qwen2-VL-7B shapes (28 / 4 heads, head_dim 128) and odd ones.
  kernel_bench  benchmarks/kernels.py's `bench_length` at 8K, 32K, 128K: probe scoring as % of
                dense FlashAttention (SDPA flash backend), sparse attention at 25/50/75 % kept vs
                dense, compaction bandwidth vs a device-to-device copy.
  layer         what the CUDA backend runs for one sparse prefill row of one decoder layer
                (attention/common.py `KVSparseImplMixin.forward`): the method's selection
                (`LayerSparsity.decide`, the policies), sparse attention (`LayerSparsity.attend`)
                or dense attention, compaction into the FlashAttention paged cache
                (`compact_in_cache`), for every method in the registry, timed against dense
                attention of the same layer.
  model         a Qwen2 decoder with Qwen2-VL-7B's language-model shapes (28 layers, hidden 3584,
                28 / 4 heads, bf16, random weights made on the GPU by transformers) prefilling
                8K, 32K, 128K tokens; dense vs ZipVL plugged in through transformers'
                AttentionInterface, calling the glue's functions. TTFT at the kept ratio tau
                gives (random weights: near-uniform attention, so tau keeps most tokens) and at
                fixed kept ratios 30 % and 50 % (the paper's regime); Table-4-like (TTFT per
                length) and Table-E-like (probe overhead, cumulative) tables.

Output: OUT_DIR/gpu_check.json (everything), OUT_DIR/summary.md (the printed tables),
OUT_DIR/step-<name>.json (each step's record, written as it goes). Exit status: 0 all steps ran
and every correctness check passed; 1 a check failed or a step crashed or timed out; 2 no GPU
visible (without --dry-run) or bad arguments.

Never imports vLLM (the GPU machine has none): vllm_kvsparse's attention/layer_sparsity.py,
attention/flash_cache.py, policies, zipvl and kernels are vLLM-free. Only torch, triton,
transformers, numpy and the standard library.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("correctness", "kernel_bench", "layer", "model")
# Seconds per step (the whole command stays under 8 minutes: 455 s of steps plus start-up).
BUDGET_S = {"correctness": 80, "kernel_bench": 100, "layer": 90, "model": 185}
DEVICE_PROBE_S = 60
GPU_LENGTHS = (8192, 32768, 131072)
DRY_LENGTHS = (192, 320)
FIXED_RATIOS = (0.3, 0.5)
VISUAL_START, TEXT_TAIL = 16, 48    # prompt layout: 16 text, visual tokens, 48 text at the end


# ============================================================================ set-up

def bind_checkout_kernels():
    """Import this checkout's top-level kernels/ as `vllm_kvsparse.kernels` (what the wheel's
    package-dir mapping does): on the GPU machine nothing is installed, and here an editable
    install of another checkout would otherwise win."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import vllm_kvsparse

    name, path = "vllm_kvsparse.kernels", ROOT / "kernels"
    mod = sys.modules.get(name)
    if mod is None or Path(mod.__file__).resolve().parent != path:
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        vllm_kvsparse.kernels = mod
    return mod


def load_kernel_bench():
    """benchmarks/kernels.py as a module (its name would clash with the kernels/ package)."""
    name = "gpu_check_kernel_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "kernels.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for mod in ("triton", "transformers", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            out[mod] = f"unavailable ({type(e).__name__}: {e})"
    return out


# ============================================================================ step records

class Record:
    """A step's record, rewritten (atomically) after every change so that a killed step leaves
    what it measured."""

    def __init__(self, path: Path, step: str, budget: float):
        self.path, self.t0, self.budget = path, time.monotonic(), budget
        self.data = {"step": step, "status": "running", "budget_s": budget, "results": [],
                     "skipped": [], "notes": []}
        self.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def add(self, **row) -> dict:
        self.data["results"].append(row)
        self.flush()
        return row

    def skip(self, reason: str, **what) -> None:
        self.data["skipped"].append({**what, "reason": reason})
        self.flush()

    def note(self, text: str) -> None:
        if text not in self.data["notes"]:
            self.data["notes"].append(text)
            self.flush()

    def set(self, **kv) -> None:
        self.data.update(kv)
        self.flush()

    def fits(self, estimate_s: float, **what) -> bool:
        """Whether `estimate_s` more seconds fit in the budget (keeping 10 % in hand); records a
        skip when not."""
        if estimate_s <= self.left() - 0.1 * self.budget:
            return True
        self.skip(f"step budget: {self.left():.0f} s left of {self.budget:.0f} s, "
                  f"estimated {estimate_s:.0f} s", **what)
        return False

    def flush(self) -> None:
        self.data["seconds"] = round(self.elapsed(), 2)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def run_forked(name: str, fn, ctx, out_dir: Path, budget: float) -> dict:
    """Run `fn(ctx, record)` in a forked child (the parent never initialises CUDA, so every child
    starts clean), kill it at `budget` seconds; return its record with the final status."""
    path = out_dir / f"step-{name}.json"
    path.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:   # child
        code = 0
        rec = Record(path, name, budget)
        try:
            fn(ctx, rec)
            failed = any(r.get("ok") is False or "error" in r for r in rec.data["results"])
            rec.set(status="failed" if failed else "ok")
        except BaseException as e:  # noqa: BLE001 - the record says what went wrong
            rec.set(status="error", error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc()[-4000:])
            code = 1
        finally:
            for note in sorted(DENSE_NOTES):
                rec.note(note)
            rec.set(vllm_imported="vllm" in sys.modules)   # must stay False (no vLLM there)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    timed_out = False
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > budget:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            timed_out = True
            break
        time.sleep(0.1)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"step": name, "status": "running", "budget_s": budget, "results": [],
                "skipped": [], "notes": []}
    if timed_out:
        data["status"] = "timed_out"
        done_n = {r.get("n") for r in data.get("results", [])}
        missing = [n for n in getattr(ctx, "lengths", ()) if n not in done_n]
        data.setdefault("skipped", []).append(
            {"reason": f"step killed at its {budget:.0f} s budget",
             **({"lengths_without_results": missing} if name != "correctness" else {})})
    elif data.get("status") == "running":   # died without writing its status
        data["status"] = "error"
        data.setdefault("error", "the step's process died (killed by a signal or os._exit)")
    data["seconds"] = round(time.monotonic() - t0, 2)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return data


# ============================================================================ device helpers

class Clock:
    """Named marks on the device timeline (CUDA events) or the host clock (CPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def spans_ms(self) -> dict[str, float]:
        """Milliseconds from each mark to the next, keyed by the later mark's name."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


DENSE_NOTES: set[str] = set()


def dense_attention(q, k, v, scale=None):
    """Dense causal attention [n, H, d] -> [n, H, d]: SDPA with the FlashAttention backend on
    CUDA (benchmarks/kernels.py's `dense_causal`, native GQA), the stand-in for vLLM's
    FlashAttention on dense rows."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if scale is None or abs(scale - q.shape[-1] ** -0.5) < 1e-12:
        try:
            return load_kernel_bench().dense_causal(q, k, v)
        except RuntimeError as e:
            if not q.is_cuda or q.shape[1] == k.shape[1]:
                raise
            # FlashAttention without native GQA in this torch: repeat the KV heads
            DENSE_NOTES.add(f"SDPA flash with enable_gqa failed ({str(e)[:200]}); dense "
                            "attention repeats the KV heads instead")
            group = q.shape[1] // k.shape[1]
            return load_kernel_bench().dense_causal(q, k.repeat_interleave(group, 1),
                                                   v.repeat_interleave(group, 1))
    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.FLASH_ATTENTION,
                                                                SDPBackend.MATH]
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def within(got, ref, rtol: float, atol_rel: float) -> dict:
    """|got - ref| <= atol + rtol |ref| elementwise, atol = atol_rel * RMS(ref) (the typical
    magnitude: a bound relative to the largest value would hide errors in the small ones)."""
    import torch

    got, ref = got.float(), ref.float()
    rms = float(ref.square().mean().sqrt()) if ref.numel() else 0.0
    atol = atol_rel * max(rms, 1e-30)
    diff = (got - ref).abs()
    bound = atol + rtol * ref.abs()
    bad = diff > bound
    worst = []
    if bad.any():   # where the worst ones are, so a failure on a lent GPU can be read later
        excess = torch.where(bad, diff / bound, torch.zeros_like(diff)).flatten()
        for i in excess.topk(min(5, int(bad.sum()))).indices.tolist():
            index = [int(x) for x in torch.unravel_index(torch.tensor(i), ref.shape)]
            worst.append({"index": index, "ref": float(ref.flatten()[i]),
                          "got": float(got.flatten()[i])})
    return {"max_abs_err": float(diff.max()) if diff.numel() else 0.0,
            "mean_abs_err": float(diff.mean()) if diff.numel() else 0.0,
            "ref_rms": rms, "ref_max": float(ref.abs().max()) if ref.numel() else 0.0,
            "rtol": rtol, "atol": atol,
            "mismatches": int(bad.sum()), "worst": worst,
            "ok": not bool(bad.any()) and bool(torch.isfinite(got).all())}


# ============================================================================ a. correctness

# (rtol, atol relative to the reference's RMS) per input dtype; compaction is bit-exact. Probe
# scores are fp32 from exact 16-bit products (only the summation order differs); sparse
# attention rounds P to the input dtype for PV and its output to the input dtype (bf16: 2^-8
# relative per rounding).
PROBE_TOL = {"fp32": (1e-4, 1e-4), "fp16": (2e-3, 2e-3), "bf16": (2e-3, 2e-3)}
ATTN_TOL = {"fp32": (1e-4, 1e-4), "fp16": (5e-3, 5e-3), "bf16": (2e-2, 2e-2)}


def attention_check(got, ref, ref_rounded, dname: str) -> dict:
    """Sparse attention's verdict on its kept rows. `ref` is the fp32 reference, `ref_rounded`
    the same torch computation with P rounded to the input dtype (what the kernel does for
    P @ V). Pass: within ATTN_TOL of `ref` elementwise, or (16-bit inputs) max and mean error
    against `ref` at most twice those of `ref_rounded`: FlashAttention's own test rule. The
    second clause exists because rounding P costs absolute, not relative, error: where a few
    large P·V terms cancel to a small output, a correct kernel misses rtol·|ref|. The first
    H200 run (2026-12-04) failed the elementwise test on 30 of 12.7 M bf16 outputs (then over
    all rows, zeros included); the rounded torch computation on CPU, same inputs, misses on
    exactly 30 too, all in the first 28 kept rows of a sequence (few keys, |ref| < 0.04,
    error <= 0.003)."""
    res = within(got, ref, *ATTN_TOL[dname])
    res["criterion"] = "elementwise"
    if dname != "fp32":
        yard = within(ref_rounded, ref, *ATTN_TOL[dname])
        res["rounded_p_max_abs_err"] = yard["max_abs_err"]
        res["rounded_p_mean_abs_err"] = yard["mean_abs_err"]
        res["rounded_p_mismatches"] = yard["mismatches"]
        twice = (res["max_abs_err"] <= 2 * yard["max_abs_err"] + 1e-6
                 and res["mean_abs_err"] <= 2 * yard["mean_abs_err"] + 1e-8)
        if not res["ok"] and twice:    # NaN errors compare False
            res["ok"], res["criterion"] = True, "at most 2x the rounded-P torch error"
    return res


def correctness_cases(dry: bool) -> list[dict]:
    """Shapes: Qwen2-VL-7B's attention (28 / 4 heads, head_dim 128) and odd sizes (head_dim 80,
    lengths not multiples of any tile, 1 and 0 kept tokens, block size 32)."""
    if dry:
        # Qwen2-VL-7B's GQA group (7 query heads per KV head) and head_dim with fewer heads:
        # the interpreter runs every program in Python.
        return [dict(case="qwen2vl-7b-group", heads=7, kv_heads=1, d=128, n=80, m=10, block=16,
                     seqs=(80, 33), kept=(0.5, 0.25), comp=(50, 37, 17, 9)),
                dict(case="odd", heads=6, kv_heads=2, d=80, n=45, m=7, block=32,
                     seqs=(45, 1, 20), kept=(0.6, 1.0, 0.0), comp=(45, 20, 33, 5))]
    return [dict(case="qwen2vl-7b", heads=28, kv_heads=4, d=128, n=8192, m=128, block=16,
                 seqs=(6001, 2191), kept=(0.5, 0.25), comp=(8192, 3001, 777, 64)),
            dict(case="odd", heads=12, kv_heads=2, d=80, n=1037, m=37, block=32,
                 seqs=(1037, 1, 300, 5), kept=(0.6, 1.0, 0.0, 1.0), comp=(1037, 64, 333, 20))]


def step_correctness(ctx, rec: Record) -> None:
    import torch

    kernels = bind_checkout_kernels()
    from vllm_kvsparse.attention.flash_cache import flash_attn_kv_views
    from vllm_kvsparse.kernels import kv_compaction, probe_scores, sparse_attention
    from vllm_kvsparse.zipvl import default_probe_indices

    dev = ctx.device
    rec.note("Triton kernels through the vllm_kvsparse.kernels dispatchers with backend='triton' "
             + ("(CPU: TRITON_INTERPRET=1, fp32/fp16; the interpreter computes bf16 wrongly)"
                if ctx.dry else "(compiled for this GPU)") + "; references in fp32 torch.")

    def check(kernel, case, dtype, fn):
        if rec.left() < 0.1 * rec.budget:
            rec.skip("step budget exhausted", kernel=kernel, case=case["case"], dtype=dtype)
            return
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - a compile failure is a result too
            rec.add(kernel=kernel, case=case["case"], dtype=dtype, ok=False,
                    error=f"{type(e).__name__}: {e}"[:2000])
            return
        sync(dev)
        rec.add(kernel=kernel, case=case["case"], dtype=dtype,
                shape=f"H={case['heads']} Hkv={case['kv_heads']} d={case['d']}",
                seconds=round(time.perf_counter() - t0, 3), **res)

    for case in correctness_cases(ctx.dry):
        H, Hkv, d, n, m, bs = (case[k] for k in ("heads", "kv_heads", "d", "n", "m", "block"))
        for dname in ctx.check_dtypes:
            dtype = ctx.dtypes[dname]
            gen = torch.Generator().manual_seed(n + H)
            q = torch.randn(n, H, d, generator=gen).to(dev, dtype)
            k = torch.randn(n, Hkv, d, generator=gen).to(dev, dtype)
            pos = default_probe_indices(n, m // 2, m - m // 2, seed=1)
            pos = pos[torch.randperm(pos.numel(), generator=gen)].to(dev)   # any order
            rtol, atol = PROBE_TOL[dname]

            def probe_dense():
                got = kernels.compute_probe_scores(q[pos], pos, k, backend="triton")
                ref = probe_scores.probe_scores_reference(q[pos], pos, k)
                a, b = within(got[0], ref[0], rtol, atol), within(got[1], ref[1], rtol, atol)
                return {**a, "ok": a["ok"] and b["ok"], "normalized_max_abs_err":
                        b["max_abs_err"], "n": n, "probes": m}

            def probe_paged():
                num_blocks = math.ceil(n / bs) + 3
                cache = torch.randn(num_blocks, bs, Hkv, d, generator=gen).to(dev, dtype)
                table = torch.randperm(num_blocks, generator=gen).to(dev, torch.int32)
                idx = table.long()[torch.arange(n, device=dev) // bs]
                cache[idx, torch.arange(n, device=dev) % bs] = k
                got = kernels.compute_probe_scores(q[pos], pos, key_cache=cache,
                                                   block_table=table, seq_len=n,
                                                   backend="triton")
                ref = probe_scores.probe_scores_reference(q[pos], pos, k)
                a, b = within(got[0], ref[0], rtol, atol), within(got[1], ref[1], rtol, atol)
                return {**a, "ok": a["ok"] and b["ok"], "normalized_max_abs_err":
                        b["max_abs_err"], "n": n, "probes": m, "block_size": bs}

            check("probe_scores.dense", case, dname, probe_dense)
            check("probe_scores.paged", case, dname, probe_paged)

            def sparse():
                lens = case["seqs"]
                total = sum(lens)
                qq = torch.randn(total, H, d, generator=gen).to(dev, dtype)
                kk = torch.randn(total, Hkv, d, generator=gen).to(dev, dtype)
                vv = torch.randn(total, Hkv, d, generator=gen).to(dev, dtype)
                idx, counts = [], []
                for L, ratio in zip(lens, case["kept"]):
                    t = min(L, round(L * ratio))
                    idx.append(torch.sort(torch.randperm(L, generator=gen)[:t]).values)
                    counts.append(t)
                indices = torch.cat(idx).to(dev)
                cu_seq = torch.tensor([0, *lens], device=dev).cumsum(0)
                cu_idx = torch.tensor([0, *counts], device=dev).cumsum(0)
                got = kernels.sparse_prefill_attention(qq, kk, vv, indices, cu_seq, cu_idx,
                                                       max_kept=max(counts), backend="triton")
                ref, ref_rounded = (sparse_attention.sparse_attention_reference(
                    qq, kk, vv, indices, cu_seq, cu_idx, round_probabilities=rounded)
                    for rounded in (False, True))
                kept_rows = torch.zeros(total, dtype=torch.bool, device=dev)
                kept_rows[(indices + torch.repeat_interleave(
                    cu_seq[:-1], torch.tensor(counts, device=dev))).long()] = True
                # errors on the kept rows only: the zero rows would shrink the RMS-relative atol
                res = attention_check(got[kept_rows], ref[kept_rows], ref_rounded[kept_rows],
                                      dname)
                zeros_ok = bool((got[~kept_rows] == 0).all())
                return {**res, "ok": res["ok"] and zeros_ok, "dropped_rows_zero": zeros_ok,
                        "seqs": list(lens), "kept": counts}

            check("sparse_attention", case, dname, sparse)

            def compaction(layout):
                lens = case["comp"]
                blocks = [math.ceil(L / bs) for L in lens]
                num_blocks = sum(blocks) + 5
                width = max(blocks)
                perm = torch.randperm(num_blocks, generator=gen)
                tables = torch.zeros(len(lens), width, dtype=torch.int32)
                start = 0
                for r, b in enumerate(blocks):
                    tables[r, :b] = perm[start:start + b].to(torch.int32)
                    start += b
                kept, counts = [], []
                patterns = ("random", "drop-first", "sinks+tail", "all")
                for r, L in enumerate(lens):
                    kind = patterns[r % len(patterns)]
                    if kind == "random":
                        sel = torch.sort(torch.randperm(L, generator=gen)[:max(1, L // 3)]).values
                    elif kind == "sinks+tail":
                        sel = torch.cat([torch.arange(min(4, L)), torch.arange(max(4, L - 5), L)])
                    elif kind == "all":
                        sel = torch.arange(L)
                    else:
                        sel = torch.arange(1, L)
                    kept.append(sel)
                    counts.append(sel.numel())
                kept_t = torch.cat(kept).to(dev)
                cu = torch.tensor([0, *counts]).cumsum(0).to(dev)
                if layout == "fa[2,blocks,slot,head,d]":
                    cache = torch.randn(2, num_blocks, bs, Hkv, d, generator=gen).to(dev, dtype)
                    views = lambda c: (c[0], c[1])                      # noqa: E731
                else:   # vLLM 0.32 FlashAttention: [blocks, heads, slot, 2d], strided K/V views
                    cache = torch.randn(num_blocks, Hkv, bs, 2 * d, generator=gen).to(dev, dtype)
                    views = lambda c: flash_attn_kv_views(c, d)          # noqa: E731
                ref = cache.clone()
                kernels.compact_kv(*views(cache), tables.to(dev), kept_t, cu, backend="triton")
                kv_compaction.compact_kv_reference(*views(ref), tables.to(dev), kept_t, cu)
                same = bool(torch.equal(cache.view(torch.int16) if dtype != torch.float32
                                        else cache.view(torch.int32),
                                        ref.view(torch.int16) if dtype != torch.float32
                                        else ref.view(torch.int32)))
                return {"ok": same, "bit_exact": same, "layout": layout,
                        "requests": list(lens), "kept": counts, "block_size": bs}

            check("kv_compaction.fa_layout", case, dname,
                  lambda: compaction("fa[2,blocks,slot,head,d]"))
            check("kv_compaction.vllm032_views", case, dname,
                  lambda: compaction("vllm0.32[blocks,head,slot,2d]"))


# ============================================================================ b. kernel bench

def estimate(prev: tuple[int, float, float], n: int) -> float:
    """Seconds a length-n round will take, from the previous length's (length, wall seconds,
    seconds inside the measured kernels): the kernels' part scaled as attention (quadratic in
    n), the rest (set-up, compiles, copies) linearly."""
    prev_n, prev_wall_s, prev_quadratic_s = prev
    r = n / prev_n
    return max(prev_wall_s - prev_quadratic_s, 0.0) * r + prev_quadratic_s * r * r


def fit_time(points: dict[int, float], n: int) -> float:
    """Seconds at length n from measured {length: seconds}, fitted as a*n + b*n^2 through the
    two largest lengths (quadratic from the largest one alone when that is all there is or the
    fit is not increasing)."""
    (n1, t1), *rest = sorted(points.items(), reverse=True)
    if rest:
        n0, t0 = rest[0]
        b = (t1 / n1 - t0 / n0) / (n1 - n0)
        a = t1 / n1 - b * n1
        if b > 0 and a >= 0:
            return a * n + b * n * n
    return t1 * (n / n1) ** 2


def step_kernel_bench(ctx, rec: Record) -> None:
    import torch

    bind_checkout_kernels()
    kb = load_kernel_bench()
    dev, dname = ctx.device, ctx.bench_dtype
    warmup, iters = (0, 1) if ctx.dry else (3, 10)
    args = kb.parse_args(["--device", str(dev), "--seq-lens", ",".join(map(str, ctx.lengths)),
                          "--kept", "25,50,75", "--dtype", dname, "--warmup", str(warmup),
                          "--iters", str(iters)])
    use_triton = dev.type == "cuda"
    rec.set(label="Triton kernels" if use_triton else
            "CPU dry run: torch reference paths (no Triton on CPU outside the interpreter)",
            dtype=dname, warmup=warmup, iters=iters, timing="median ms",
            shape=dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                       probes=args.num_probes, block_size=args.block_size))

    class Rows(list):     # bench_length appends its rows here: each is recorded at once
        def append(self, row):
            super().append(row)
            rec.add(**row)

    prev = None
    for n in ctx.lengths:
        if prev and not rec.fits(estimate(prev, n), n=n):
            continue
        t0 = time.monotonic()
        results = Rows()
        try:
            kb.bench_length(args, n, dev, kb.DTYPES[dname], use_triton, results)
        except torch.cuda.OutOfMemoryError as e:
            rec.skip(f"out of memory: {e}"[:300], n=n)
        except Exception as e:  # noqa: BLE001
            rec.add(n=n, error=f"{type(e).__name__}: {e}"[:2000])
        kernel_s = sum(r.get("ms", 0) + r.get("copy_ms", 0)
                       for r in results) * (warmup + iters) / 1e3
        prev = (n, time.monotonic() - t0, kernel_s)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# ============================================================================ c. layer

LAYER_IDX = 14        # a middle layer of 28 (pyramidkv's capacity depends on it)
NUM_LAYERS = 28
BLOCK_SIZE = 16       # vLLM's FlashAttention default


def prompt_row(n: int, req_id: str = "r0"):
    """One sparse row as the glue sees it (common.py SparseRow: the fields the layer reads)."""
    return SimpleNamespace(row=0, req_id=req_id, start=0, end=n, num_prompt=n,
                           visual_ranges=((VISUAL_START, max(VISUAL_START, n - TEXT_TAIL)),))


def layer_forward(sparsity, rt, row, q, k, v, kv_cache, block_table, clock=None):
    """One sparse prefill row of one layer, as `KVSparseImplMixin.forward` (attention/common.py)
    runs it on CUDA, minus vLLM's metadata: decide (the policy), attend over the kept set
    (methods with a sparse prefill) or dense attention (vLLM's kernel in the glue; SDPA flash
    here), then compact the kept K/V inside the FlashAttention cache
    (`KVSparseFlashAttentionImpl._compact_rows` = `compact_in_cache`). Deferred methods
    (vlcache, aircache) decide at the end of the step (`_defer` + `WorkerRuntime.end_step`).
    Returns (output, selection)."""
    from vllm_kvsparse import runtime
    from vllm_kvsparse.attention.flash_cache import compact_in_cache, flash_attn_kv_views

    mark = clock.mark if clock else (lambda name: None)
    d = q.shape[-1]
    key_cache, value_cache = flash_attn_kv_views(kv_cache, d)
    mark("start")
    sel = sparsity.decide(rt, row, q, k, BLOCK_SIZE)
    mark("select")
    if sel is not None and sel.sparse_attention:
        out = sparsity.attend(sel, q, k, v)
    else:
        out = dense_attention(q, k, v, sparsity.scale)
    mark("attention")
    decided = []

    def compact(selection):
        compact_in_cache(key_cache, value_cache, block_table, [(row, selection)], BLOCK_SIZE)
        rt.note_compaction(row.req_id, sparsity.layer_idx, selection.front_blocks,
                           selection.prompt_blocks)
        decided.append(selection)

    if sel is not None:
        compact(sel)
    else:
        def apply(choices):
            compact(sparsity.selection(row, choices[row.req_id], BLOCK_SIZE, 0.0,
                                       q.shape[1], d))
        rt.defer(runtime.DeferredLayer(sparsity.layer_idx, [row.req_id], apply))
        rt.end_step()
    mark("compaction")
    return out, decided[0] if decided else None


def fill_cache(kv_cache, block_table, k, v):
    """What vLLM's do_kv_cache_update writes before forward: token j of the prompt into slot
    j % block_size of block block_table[0, j // block_size]."""
    import torch

    from vllm_kvsparse.attention.flash_cache import flash_attn_kv_views

    n, d = k.shape[0], k.shape[-1]
    key_cache, value_cache = flash_attn_kv_views(kv_cache, d)
    pos = torch.arange(n, device=k.device)
    blocks = block_table[0].long()[pos // BLOCK_SIZE]
    key_cache[blocks, pos % BLOCK_SIZE] = k
    value_cache[blocks, pos % BLOCK_SIZE] = v


def layer_targets(policy):
    """(label, prelude layers run untimed in the same step, the timed layer)."""
    scoring = getattr(policy, "scoring_layer", None)
    if scoring is not None:    # fastv: layer k-1 scores (dense), layers >= k attend sparsely
        return [(f"layer {scoring} (scoring)", [], scoring),
                (f"layer {scoring + 1} (pruned)", [scoring], scoring + 1)]
    return [(f"layer {LAYER_IDX}", [], LAYER_IDX)]


def step_layer(ctx, rec: Record) -> None:
    import torch

    bind_checkout_kernels()
    from vllm_kvsparse import runtime
    from vllm_kvsparse.attention.layer_sparsity import LayerSparsity
    from vllm_kvsparse.config import SparsityConfig
    from vllm_kvsparse.policies import METHOD_NAMES

    dev, dtype = ctx.device, ctx.dtypes[ctx.bench_dtype]
    H, Hkv, d = 28, 4, 128
    scale = d ** -0.5
    warmup, iters = (0, 1) if ctx.dry else (1, 3)
    rec.set(methods=list(METHOD_NAMES), dtype=ctx.bench_dtype, heads=H, kv_heads=Hkv,
            head_dim=d, block_size=BLOCK_SIZE, num_layers=NUM_LAYERS, warmup=warmup,
            iters=iters, timing="median ms of the whole layer; phases from the same runs",
            prompt=f"{VISUAL_START} text + visual + {TEXT_TAIL} text tokens; random q/k/v")
    rec.note("dense = causal SDPA (FlashAttention backend) over all n tokens: the stand-in for "
             "vLLM's FlashAttention on a dense row; every method runs its defaults (config "
             "SparsityConfig.from_options(method)), eviction on (block size 16).")
    prev = None
    for n in ctx.lengths:
        if prev and not rec.fits(estimate(prev, n), n=n):
            continue
        t_len = time.monotonic()
        gen = torch.Generator(device=dev).manual_seed(n)       # made on the device: fast
        q, k, v = (torch.randn(n, h, d, generator=gen, device=dev, dtype=dtype)
                   for h in (H, Hkv, Hkv))
        num_blocks = math.ceil(n / BLOCK_SIZE) + 8
        kv_cache = torch.empty(num_blocks, Hkv, BLOCK_SIZE, 2 * d, device=dev, dtype=dtype)
        table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(n))
        table = table[:math.ceil(n / BLOCK_SIZE)].to(dev, torch.int32)[None]
        dense = []
        for i in range(warmup + iters):
            clock = Clock(dev)
            clock.mark("start")
            dense_attention(q, k, v, scale)
            clock.mark("dense")
            if i >= warmup:
                dense.append(clock.spans_ms()["dense"])
        dense_ms = median(dense)
        rec.add(n=n, method="dense", label="dense attention", ms=dense_ms)
        for method in METHOD_NAMES:
            cfg = SparsityConfig.from_options(method).for_model(NUM_LAYERS)
            for label, prelude, target in layer_targets(cfg.policy):
                if rec.left() < 0.1 * rec.budget:
                    rec.skip("step budget exhausted", n=n, method=method, layer=label)
                    continue
                try:
                    rt = runtime.WorkerRuntime()
                    row = prompt_row(n)
                    layers = {i: LayerSparsity(cfg, i, scale) for i in (*prelude, target)}
                    spans, sel = [], None
                    for i in range(warmup + iters):
                        rt.begin_step()
                        for p in prelude:
                            fill_cache(kv_cache, table, k, v)
                            layer_forward(layers[p], rt, row, q, k, v, kv_cache, table)
                        fill_cache(kv_cache, table, k, v)
                        sync(dev)
                        clock = Clock(dev)
                        _, sel = layer_forward(layers[target], rt, row, q, k, v, kv_cache,
                                               table, clock)
                        if i >= warmup:
                            spans.append(clock.spans_ms())
                    total = [sum(s.values()) for s in spans]
                    kept = sel.indices.numel() if sel is not None else n
                    rec.add(n=n, method=method, label=label, kept=kept,
                            kept_pct=round(100 * kept / n, 2),
                            sparse_attention=bool(sel is not None and sel.sparse_attention),
                            ms=median(total),
                            select_ms=median([s["select"] for s in spans]),
                            attention_ms=median([s["attention"] for s in spans]),
                            compaction_ms=median([s["compaction"] for s in spans]),
                            dense_ms=dense_ms, vs_dense=median(total) / dense_ms,
                            options=cfg.method_parameters())
                except torch.cuda.OutOfMemoryError as e:
                    rec.skip(f"out of memory: {e}"[:300], n=n, method=method, layer=label)
                except Exception as e:  # noqa: BLE001
                    rec.add(n=n, method=method, label=label,
                            error=f"{type(e).__name__}: {e}"[:2000],
                            traceback=traceback.format_exc()[-2000:])
                finally:
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
        del q, k, v, kv_cache
        kernel_s = sum(r["ms"] for r in rec.data["results"]
                       if r.get("n") == n and "ms" in r) * (warmup + iters) / 1e3
        prev = (n, time.monotonic() - t_len, kernel_s)


# ============================================================================ d. model

def model_config(dry: bool):
    """Qwen2-VL-7B's language model (Qwen2 decoder), or a tiny one for the dry run."""
    from transformers import Qwen2Config

    if dry:
        shape = dict(vocab_size=512, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    else:
        shape = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
    return Qwen2Config(**shape, max_position_embeddings=131072 + 1024, rms_norm_eps=1e-6,
                       use_sliding_window=False, tie_word_embeddings=False)


@functools.lru_cache(maxsize=None)
def make_fixed_ratio_policy(ratio: float):
    """ZipVL with p = ratio * n instead of Eq. 7 (probe scores, Eq. 8 normalisation, Eq. 9 top-p,
    the project's keep_first / keep_last): the paper's 30-50 % regime, which random weights
    (near-uniform attention) never reach through tau."""
    import torch

    from vllm_kvsparse import zipvl
    from vllm_kvsparse.policies import Choice, ZipVL

    @dataclasses.dataclass(frozen=True)
    class ZipVLFixedRatio(ZipVL):
        ratio: float = 0.5

        def layer(self, state, inp):
            self._check_input(state.prompt, inp)
            n = state.prompt.num_tokens
            probe = zipvl.default_probe_indices(n, self.num_recent_probes,
                                                self.num_random_probes, self.seed)
            probe = probe.to(inp.query.device)
            _, normalized = (inp.scores_fn or zipvl.probe_attention_scores)(
                inp.query, inp.key, probe, inp.scale)
            p = max(1, int(self.ratio * n))
            keep = torch.zeros(n, dtype=torch.bool, device=normalized.device)
            keep[zipvl.top_p_by_normalized(normalized, p)] = True
            keep[:self.keep_first] = True
            if self.keep_last:
                keep[max(0, n - self.keep_last):] = True
            return Choice(torch.nonzero(keep).flatten().cpu(), normalized.float().cpu(), p)

    return ZipVLFixedRatio(ratio=ratio)


class ModelAttention:
    """The attention function registered with transformers' AttentionInterface. `mode` picks
    what each decoder layer runs (the Table-E rows are cumulative):
        dense      SDPA flash over all tokens (vLLM's dense path's stand-in)
        probe      dense + the fused probe scores (Eq. 6 / Eq. 8; the glue's scores_fn)
        budget     probe + Eq. 7 (sort & cumsum: zipvl.budget_from_accumulated)
        select     dense + the whole selection as the glue runs it (LayerSparsity.decide)
        zipvl      decide + sparse attention (LayerSparsity.attend): the CUDA glue's prefill
        fixed30/50 the same with ZipVL's scores and a fixed kept ratio"""

    def __init__(self, num_layers: int):
        from vllm_kvsparse import runtime
        from vllm_kvsparse.config import SparsityConfig

        self.cfg = SparsityConfig.from_options("zipvl", {"evict": False}).for_model(num_layers)
        self.rt = runtime.WorkerRuntime()
        self.mode = "dense"
        self.kept: list[float] = []
        self._layers: dict[tuple[str, int], object] = {}

    def layer(self, mode: str, idx: int, scale: float):
        from vllm_kvsparse.attention.layer_sparsity import LayerSparsity

        key = (mode, idx)
        if key not in self._layers:
            ls = LayerSparsity(self.cfg, idx, scale)
            if mode.startswith("fixed"):
                ls.policy = make_fixed_ratio_policy(int(mode[5:]) / 100)
            self._layers[key] = ls
        return self._layers[key]

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 **kwargs):
        from vllm_kvsparse import zipvl
        from vllm_kvsparse.attention.layer_sparsity import _fused_probe_scores

        if query.shape[0] != 1 or attention_mask is not None:
            raise ValueError("gpu_check's attention takes batch size 1 and no mask")
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))    # [n, heads, d]
        n = q.shape[0]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        mode = self.mode
        if mode in ("probe", "budget"):
            policy = self.cfg.policy
            probe = zipvl.default_probe_indices(n, policy.num_recent_probes,
                                                policy.num_random_probes, policy.seed)
            acc, _ = _fused_probe_scores(q, k, probe.to(q.device), scale)
            if mode == "budget":
                zipvl.budget_from_accumulated(acc, policy.tau, total_mass=probe.numel())
            out = dense_attention(q, k, v, scale)
        elif mode == "dense":
            out = dense_attention(q, k, v, scale)
        else:
            ls = self.layer("zipvl" if mode == "select" else mode, module.layer_idx, scale)
            row = prompt_row(n)
            sel = ls.decide(self.rt, row, q, k, None)
            self.kept.append(sel.indices.numel() / n)
            if mode != "select" and sel.sparse_attention:
                out = ls.attend(sel, q, k, v)
            else:
                out = dense_attention(q, k, v, scale)
        return out.unsqueeze(0), None


def step_model(ctx, rec: Record) -> None:
    import torch
    from transformers import AttentionInterface, Qwen2ForCausalLM
    from transformers.masking_utils import AttentionMaskInterface

    bind_checkout_kernels()
    dev = ctx.device
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    config = model_config(ctx.dry)
    L, H = config.num_hidden_layers, config.num_attention_heads
    d = config.hidden_size // H
    attn = ModelAttention(L)
    AttentionInterface.register("kvsparse_gpu_check", attn)
    # No mask for it: causal is implied, and a materialised [n, n] mask is 16 GiB at 128K.
    # (transformers >= 5.x skips the mask for unknown implementations anyway; this makes sure.)
    AttentionMaskInterface.register("kvsparse_gpu_check", lambda *args, **kwargs: None)
    t0 = time.monotonic()
    with torch.device(dev):
        model = Qwen2ForCausalLM._from_config(config, attn_implementation="kvsparse_gpu_check",
                                              dtype=dtype)
    model.eval().requires_grad_(False)
    sync(dev)
    params = sum(p.numel() for p in model.parameters())
    rec.set(model=dict(layers=L, hidden=config.hidden_size, heads=H,
                       kv_heads=config.num_key_value_heads, head_dim=d,
                       intermediate=config.intermediate_size, vocab=config.vocab_size,
                       params_b=round(params / 1e9, 3), dtype=str(dtype).split(".")[-1],
                       weights="random (transformers init), built on the device"),
            build_s=round(time.monotonic() - t0, 2), tau=attn.cfg.policy.tau,
            probes=attn.cfg.policy.num_recent_probes + attn.cfg.policy.num_random_probes,
            timing="TTFT = one forward of the prompt (use_cache=False, logits of the last "
                   "token), device-synchronised wall clock, median of the repeats")
    rec.note("ZipVL(tau) keeps what tau=0.975 gives on random weights, whose attention is near "
             "uniform, so it keeps most tokens: not the paper's regime. fixed30/fixed50 "
             "use ZipVL's probe scores with p = 30 % / 50 % of n (the paper's kept ratios).")

    def forward(n, mode):
        ids = torch.randint(config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        ids = ids.to(dev)
        attn.mode, attn.kept = mode, []
        attn.rt.begin_step()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        t = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1)
        sync(dev)
        s = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
        return s, peak, list(attn.kept)

    main_modes = ["dense", "zipvl", *[f"fixed{round(100 * r)}" for r in FIXED_RATIOS]]
    breakdown_at = 32768 if 32768 in ctx.lengths else ctx.lengths[-1]
    # warm-up: Triton compiles and cuBLAS/SDPA heuristics, at the smallest length
    if not ctx.dry:
        for mode in ("dense", "zipvl", "fixed30", "probe", "budget"):
            forward(ctx.lengths[0], mode)
    reps = {n: (1 if ctx.dry or n >= 131072 else 2 if n >= 32768 else 3) for n in ctx.lengths}
    dense_s: dict[int, float] = {}
    for n in ctx.lengths:
        modes = main_modes + (["probe", "budget", "select"] if n == breakdown_at else [])
        for mode in modes:
            est = 1.2 * fit_time(dense_s, n) * reps[n] if dense_s else 0.0
            if not rec.fits(est, n=n, mode=mode):
                continue
            try:
                runs = [forward(n, mode) for _ in range(reps[n])]
            except torch.cuda.OutOfMemoryError as e:
                rec.skip(f"out of memory: {e}"[:300], n=n, mode=mode)
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # noqa: BLE001
                rec.add(n=n, mode=mode, error=f"{type(e).__name__}: {e}"[:2000],
                        traceback=traceback.format_exc()[-2000:])
                continue
            ttft = median([r[0] for r in runs])
            kept = runs[-1][2]
            kept_mean = sum(kept) / len(kept) if kept else 1.0
            if mode == "dense":
                dense_s[n] = ttft
            flops = attention_tflops(n, L, H, d, kept if kept else [1.0] * L,
                                     probes=attn.cfg.policy.num_recent_probes
                                     + attn.cfg.policy.num_random_probes
                                     if mode not in ("dense",) else 0)
            rec.add(n=n, mode=mode, ttft_s=ttft, runs_s=[r[0] for r in runs],
                    kept_pct=round(100 * kept_mean, 2),
                    kept_pct_min=round(100 * min(kept), 2) if kept else 100.0,
                    peak_mb=runs[-1][1], attention_tflops=flops,
                    speedup_vs_dense=(dense_s[n] / ttft) if n in dense_s else None)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def attention_tflops(n, layers, heads, d, kept_ratios, probes=0) -> float:
    """Analytic attention FLOPs of a prefill (causal QK^T and PV: 2 * H * d * t^2 per layer,
    t = kept tokens), plus the fused probe scoring (logits twice: 4 * H * m * n * d)."""
    total = sum(2.0 * heads * d * (r * n) ** 2 for r in kept_ratios)
    if len(kept_ratios) < layers:
        total += (layers - len(kept_ratios)) * 2.0 * heads * d * n ** 2
    total += layers * 4.0 * heads * probes * n * d
    return total / 1e12


# ============================================================================ summary

def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summarize(report: dict) -> str:
    steps = report["steps"]
    meta = report["meta"]
    out = [f"# gpu_check {'(DRY RUN, CPU) ' if meta['dry_run'] else ''}— {meta['device']}",
           "", f"torch {meta['versions'].get('torch')}, triton {meta['versions'].get('triton')}, "
           f"transformers {meta['versions'].get('transformers')}; {meta['date']}", ""]
    rows = []
    for name in STEPS:
        s = steps.get(name)
        if s is None:
            continue
        res = s.get("results", [])
        bad = [r for r in res if r.get("ok") is False or "error" in r]
        rows.append([name, s["status"], f"{s.get('seconds', 0):.0f} / {s['budget_s']:.0f}",
                     len(res), len(bad), len(s.get("skipped", [])),
                     (s.get("error") or "")[:80]])
    out += ["## Steps", "", table(["step", "status", "s / budget", "results", "failed",
                                   "skipped", "error"], rows), ""]

    s = steps.get("correctness")
    if s:
        rows = [[r["kernel"], r["case"], r["dtype"], r.get("max_abs_err"),
                 "PASS" if r.get("ok") else "FAIL", (r.get("error") or "")[:60]]
                for r in s["results"]]
        out += ["## a. Correctness (Triton vs torch reference)", "",
                table(["kernel", "case", "dtype", "max abs err", "result", "error"], rows), ""]
    s = steps.get("kernel_bench")
    if s and s["results"]:
        kb = load_kernel_bench()
        ok = [r for r in s["results"] if "error" not in r]
        out += [f"## b. Kernel benchmark ({s.get('label', '')}, {s.get('dtype')})", "",
                kb.markdown(ok), ""]
    s = steps.get("layer")
    if s and s["results"]:
        rows = [[r["n"], r["method"], r.get("label"), r.get("kept_pct"), r.get("select_ms"),
                 r.get("attention_ms"), r.get("compaction_ms"), r.get("ms"),
                 r.get("vs_dense"), (r.get("error") or "")[:50]] for r in s["results"]]
        out += ["## c. One decoder layer (ms; dense = SDPA flash over all tokens)", "",
                table(["n", "method", "layer", "kept %", "select", "attention", "compaction",
                       "total", "total/dense", "error"], rows), ""]
    s = steps.get("model")
    if s and s["results"]:
        res = [r for r in s["results"] if "error" not in r]
        by = {(r["n"], r["mode"]): r for r in res}
        lengths = sorted({r["n"] for r in res})
        rows = []
        for n in lengths:
            dense = by.get((n, "dense"))
            for mode, label in (("dense", "dense (SDPA flash)"), ("zipvl", "ZipVL, tau"),
                                ("fixed30", "ZipVL, fixed 30 % kept"),
                                ("fixed50", "ZipVL, fixed 50 % kept")):
                r = by.get((n, mode))
                if r:
                    rows.append([n, label, r["ttft_s"], r["kept_pct"],
                                 dense["ttft_s"] / r["ttft_s"] if dense else None])
        m = s.get("model", {})
        out += [f"## d. Model prefill, Table-4-like ({m.get('layers')} layers, hidden "
                f"{m.get('hidden')}, {m.get('dtype')}, random weights, tau={s.get('tau')})", "",
                table(["n", "attention", "TTFT s", "kept % (mean over layers)",
                       "speedup vs dense"], rows), ""]
        ns = sorted({r["n"] for r in res if r["mode"] in ("probe", "budget", "select")})
        if ns:
            n = ns[0]
            rows = []
            for mode, label in (("dense", "Original (dense)"),
                                ("probe", "+ approximate attention (Eq. 6)"),
                                ("budget", "+ sort & cumsum (Eq. 7)"),
                                ("select", "+ normalize & top-k (Eqs. 8-9)"),
                                ("zipvl", "+ sparse attention")):
                r = by.get((n, mode))
                if r:
                    rows.append([label, r["ttft_s"], r.get("peak_mb"),
                                 r.get("attention_tflops"), r["kept_pct"]])
            out += [f"## d. Probe overhead, Table-E-like (n = {n}, cumulative rows)", "",
                    table(["row", "TTFT s", "peak MB", "attention TFLOPs (analytic)",
                           "kept %"], rows), ""]
    for name in STEPS:
        s = steps.get(name)
        if s and s.get("skipped"):
            out += [f"skipped in {name}: " + "; ".join(
                f"{ {k: v for k, v in x.items() if k != 'reason'} }: {x['reason']}"
                for x in s["skipped"])]
    return "\n".join(out) + "\n"


# ============================================================================ main

def device_probe(ctx, rec: Record) -> None:
    import torch

    info = {"cuda_available": bool(torch.cuda.is_available()), "versions": versions()}
    if info["cuda_available"] and not ctx.dry:
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
    rec.add(**info)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", help="directory for gpu_check.json, summary.md, step-*.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny sizes, Triton interpreter (the test suite's rehearsal)")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma list of steps to run (default all: {','.join(STEPS)})")
    ap.add_argument("--lengths", default=None,
                    help="comma list of prompt lengths for kernel_bench, layer and model "
                         "(default 8192,32768,131072; dry run 192,320)")
    args = ap.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in args.steps if s not in STEPS]
    if bad:
        ap.error(f"unknown step {bad[0]!r}; valid steps are {', '.join(STEPS)}")
    try:
        args.lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else None
    except ValueError:
        ap.error(f"--lengths {args.lengths!r} is not a comma list of integers")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"      # before anything imports triton
    # torch.cuda.is_available() through NVML: no CUDA driver initialisation in this process,
    # whose forked children use CUDA.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    os.environ.pop("VLLM_KVSPARSE_STATS_DIR", None)   # no metrics files from this process
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    import torch

    ctx = SimpleNamespace(dry=args.dry_run, device=torch.device("cpu"))
    probe = run_forked("device", device_probe, ctx, out_dir, DEVICE_PROBE_S)
    info = (probe.get("results") or [{}])[0]
    (out_dir / "step-device.json").unlink(missing_ok=True)
    if not args.dry_run and not info.get("cuda_available"):
        why = probe.get("error") or "torch.cuda.is_available() is False"
        print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}: {why}); run it on a "
              f"GPU machine, or pass --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2

    # Imports shared by the steps happen once here, before the forks (the children inherit
    # them); none of them touches CUDA. transformers is imported by the model step only (its
    # import checks the GPU).
    bind_checkout_kernels()
    from vllm_kvsparse.attention import flash_cache, layer_sparsity  # noqa: F401
    load_kernel_bench()
    assert "vllm" not in sys.modules, "gpu_check imported vLLM"

    dry = args.dry_run
    ctx = SimpleNamespace(
        dry=dry, device=torch.device("cpu" if dry else "cuda"),
        dtypes={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32},
        check_dtypes=("fp32", "fp16") if dry else ("bf16", "fp16"),
        bench_dtype="fp32" if dry else "bf16",
        lengths=args.lengths or (DRY_LENGTHS if dry else GPU_LENGTHS))
    device = "CPU (dry run)" if dry else f"{info.get('name')} (sm_{info.get('capability', '')}"\
        .replace(".", "") + f", {info.get('memory_gib')} GiB)"
    report = {"meta": {
        "device": device, "device_info": info, "dry_run": dry,
        "versions": info.pop("versions", {}),
        "cpu_threads": torch.get_num_threads(), "host": platform.node(),
        "checkout": str(ROOT), "vllm_kvsparse": sys.modules["vllm_kvsparse"].__file__,
        "command": " ".join(["scripts/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lengths": list(ctx.lengths), "budgets_s": BUDGET_S}, "steps": {}}
    fns = {"correctness": step_correctness, "kernel_bench": step_kernel_bench,
           "layer": step_layer, "model": step_model}
    for name in STEPS:
        if name not in args.steps:
            continue
        print(f"gpu_check: {name} (budget {BUDGET_S[name]} s) ...", file=sys.stderr, flush=True)
        report["steps"][name] = run_forked(name, fns[name], ctx, out_dir, BUDGET_S[name])
        print(f"gpu_check: {name}: {report['steps'][name]['status']} in "
              f"{report['steps'][name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    report["meta"]["total_s"] = round(time.monotonic() - t_start, 1)
    report["ok"] = all(s["status"] == "ok" for s in report["steps"].values())
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = summarize(report)
    (out_dir / "summary.md").write_text(text)
    print(text)
    print(f"gpu_check: {'ok' if report['ok'] else 'NOT ok'} in {report['meta']['total_s']} s; "
          f"JSON in {out_dir / 'gpu_check.json'}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
