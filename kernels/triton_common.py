"""Pieces shared by the Triton kernels (probe_scores.py, sparse_attention.py)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU runtime without triton: the kernels' torch references still work
    triton = tl = None

LOG2E = 1.4426950408889634   # the kernels run softmax in the log2 domain (exp2)

if triton is None:
    dot = None
else:

    @triton.jit
    def dot(a, b, EXACT: tl.constexpr):
        """fp32 operands (CPU interpreter, fp32 inputs): exact IEEE products. 16-bit operands
        (GPU): tensor cores, exact products, fp32 accumulation."""
        if EXACT:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)
