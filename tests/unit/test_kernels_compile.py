"""Compile every Triton kernel for an H100 (sm_90) without a GPU: the interpreter runs kernels
but never lowers them, so type or layout errors only the real compiler sees show up here.
Uses the ptxas shipped in the triton wheel; skipped when it is missing. The compile runs in a
subprocess because conftest.py turns the interpreter on for this process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = ["probe:bf16", "probe:fp32", "sparse:bf16", "sparse:fp16", "compaction:bf16"]


def ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not ptxas_available(), reason="no triton / ptxas to compile for CUDA")
def test_kernels_compile_for_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")     # no stale binaries
    out = subprocess.run([sys.executable, __file__, *CASES], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [f"{case}:ok" for case in CASES]


# ----------------------------------------------------------------------------- subprocess side

def _compile(fn, pointers, constexprs, **options):
    """Compile ``fn`` for sm_90: pointer params from ``pointers`` (default *i32), qk_scale fp32,
    other runtime params i32, the rest constexpr."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*i32")
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = ASTSource(fn, signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _compile_case(case):
    from vllm_kvsparse.kernels import kv_compaction, probe_scores, sparse_attention

    kind, dtype = case.split(":")
    ptr = f"*{dtype}"
    if kind == "probe":
        consts = dict(GROUP=7, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=64, PAGED=True,
                      UPCAST=dtype == "fp32")
        stats = dict(q_ptr=ptr, k_ptr=ptr, max_ptr="*fp32", sum_ptr="*fp32")
        _compile(probe_scores._probe_stats_kernel, stats, consts, num_warps=4)
        _compile(probe_scores._probe_columns_kernel,
                 dict(stats, acc_ptr="*fp32", norm_ptr="*fp32"), dict(consts, NUM_KV_HEADS=4),
                 num_warps=4)
    elif kind == "sparse":
        _compile(sparse_attention._sparse_attention_kernel,
                 dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, o_ptr=ptr),
                 dict(GROUP=7, HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_D=128, BLOCK_DV=128,
                      BLOCK_M=128, BLOCK_N=64, UPCAST=False), num_warps=8, num_stages=3)
    else:   # compaction moves bits: the launcher views any 2-byte cache as int16
        for fn in (kv_compaction._stage_kernel, kv_compaction._move_kernel):
            _compile(fn, dict(cache_ptr="*i16", temp_ptr="*i16"),
                     dict(HEAD_DIM=128, BLOCK_R=32, BLOCK_W=256), num_warps=4)
    print(f"{case}:ok", flush=True)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        _compile_case(arg)
