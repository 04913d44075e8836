"""A GPU process must not import anything that patches torch for CPU (vLLM 0.32's
`vllm.v1.worker.cpu.shm`, pulled in by `vllm.v1.worker.cpu_worker`, replaces torch.cuda.Event,
Stream, set_stream, torch.accelerator.get_memory_info, Tensor.pin_memory ... process-wide: on a
GPU, memory profiling would read host RAM and CUDA graphs would capture on a placeholder stream).

Each check runs in a fresh interpreter with vLLM's CUDA platform module importable (its compiled
extension stubbed: only imported, never used here) and imports what a GPU process of the plugin
imports: every vllm_kvsparse module except the CPU-only ones, and the classes vLLM resolves by
name (the GPU worker, the FlashAttention backend subclass, the scheduler, the CUDA platform).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# Modules only a CPU process may import (they import vLLM's CPU worker or CPU attention).
CPU_ONLY = ["vllm_kvsparse.cpu_worker", "vllm_kvsparse.platform_cpu",
            "vllm_kvsparse.attention.cpu"]

CHECK = textwrap.dedent("""
    import importlib, json, pkgutil, sys, types
    import torch
    sys.modules["vllm._C_stable_libtorch"] = types.ModuleType("vllm._C_stable_libtorch")
    watched = {
        "torch.cuda.Event": (torch.cuda, "Event"), "torch.cuda.Stream": (torch.cuda, "Stream"),
        "torch.cuda.set_stream": (torch.cuda, "set_stream"),
        "torch.cuda.current_stream": (torch.cuda, "current_stream"),
        "torch.Event": (torch, "Event"),
        "torch.accelerator.get_memory_info": (torch.accelerator, "get_memory_info"),
        "torch.accelerator.synchronize": (torch.accelerator, "synchronize"),
        "torch.Tensor.pin_memory": (torch.Tensor, "pin_memory"),
        "torch.Tensor.record_stream": (torch.Tensor, "record_stream"),
    }
    # Baseline: what stock vLLM's own GPU process imports (vllm.utils.torch_utils wraps
    # torch.cuda.set_stream itself, on every device); the plugin must add nothing to that.
    for name in ("vllm.platforms.cuda", "vllm.v1.worker.gpu_worker",
                 "vllm.v1.attention.backends.flash_attn", "vllm.v1.core.sched.scheduler",
                 "vllm.entrypoints.cli.main"):
        importlib.import_module(name)
    before = {name: getattr(obj, attr) for name, (obj, attr) in watched.items()}
    cpu_only, extra = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    import vllm_kvsparse
    from vllm.utils.import_utils import resolve_obj_by_qualname
    imported = []
    for mod in pkgutil.walk_packages(vllm_kvsparse.__path__, "vllm_kvsparse."):
        if mod.name not in cpu_only:
            importlib.import_module(mod.name)
            imported.append(mod.name)
    from vllm_kvsparse import plugin
    from vllm_kvsparse.platform_cuda import KVSparseCudaPlatform
    from vllm_kvsparse.platform import SCHEDULER_CLS
    for qualname in [KVSparseCudaPlatform.kvsparse_worker_cls, plugin._BACKENDS["cuda"][1],
                     SCHEDULER_CLS, *extra]:
        resolve_obj_by_qualname(qualname)
    changed = [name for name, (obj, attr) in watched.items()
               if getattr(obj, attr) is not before[name]]
    print("RESULT " + json.dumps({"changed": changed, "imported": imported,
                                  "cpu_worker_loaded": "vllm.v1.worker.cpu_worker" in sys.modules,
                                  "shm_loaded": "vllm.v1.worker.cpu.shm" in sys.modules}))
""")


def run_check(extra: list[str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(CPU_ONLY),
                           json.dumps(extra or [])],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_gpu_process_imports_leave_torch_cuda_untouched():
    out = run_check()
    assert out["changed"] == [] and not out["shm_loaded"] and not out["cpu_worker_loaded"]
    # the walk really covered the GPU path's modules
    for name in ("vllm_kvsparse.gpu_worker", "vllm_kvsparse.platform_cuda",
                 "vllm_kvsparse.attention.cuda", "vllm_kvsparse.scheduler",
                 "vllm_kvsparse.metrics", "vllm_kvsparse.plugin"):
        assert name in out["imported"]


def test_the_check_detects_the_cpu_worker_patch():
    """Control: resolving the CPU worker does replace torch.cuda.Event (vLLM 0.32 behaviour),
    so the test above would catch a GPU-path module that imports it."""
    out = run_check(["vllm_kvsparse.cpu_worker.KVSparseCPUWorker"])
    assert out["shm_loaded"]
    assert {"torch.cuda.Event", "torch.cuda.set_stream",
            "torch.accelerator.get_memory_info"} <= set(out["changed"])
