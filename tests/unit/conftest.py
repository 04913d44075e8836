"""Unit tests run Triton kernels on CPU through the interpreter. The variable must be set
before triton is first imported, so it is set here, at collection time."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
