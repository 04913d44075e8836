"""Shared test helpers: a real `vllm serve` process, a real offline vLLM engine, test images.

Every server runs on loopback on a free port with its own TMPDIR and caches, and is stopped by
its process group id even when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vllm_kvsparse.bench.server import ServeProcess, free_port  # noqa: F401 (tests use it)
from vllm_kvsparse.bench.workload import png_data_url as image_data_url
from vllm_kvsparse.bench.workload import rectangle_image as make_image  # noqa: F401 (tests use it)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OFFLINE_RUNNER = REPO / "tests" / "e2e" / "offline_run.py"
STEPPED_RUNNER = REPO / "tests" / "e2e" / "stepped_run.py"


def isolated_env(workdir: Path, plugins: bool = True, **extra: str) -> dict[str, str]:
    """Environment for one vLLM process tree: own temp dir and caches, no hub, no plugin
    leftovers from the caller."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_", "PROMETHEUS_MULTIPROC"))}
    env.update(TMPDIR=str(workdir), VLLM_CACHE_ROOT=str(workdir / "vllm-cache"),
               VLLM_RPC_BASE_PATH=str(workdir), HF_HOME=str(workdir / "hf"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    if not plugins:
        env["VLLM_PLUGINS"] = "none-at-all"  # loads no plugin: stock vLLM
    env.update(extra)
    return env


SERVE_DEFAULTS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", "4",
                  "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
                  "--limit-mm-per-prompt", '{"image": 2, "video": 0}']


class VllmServer(ServeProcess):
    """`vllm serve MODEL ARGS` (after SERVE_DEFAULTS) in `workdir`, with its own TMPDIR and
    caches; `.url`, `.log()`, `.client()`."""

    def __init__(self, model: str, args: list[str], workdir: Path, plugins: bool = True,
                 startup_timeout: float = 240, env: dict[str, str] | None = None):
        self.workdir = workdir
        super().__init__(str(BIN / "vllm"), model, [*SERVE_DEFAULTS, *args],
                         isolated_env(workdir, plugins, **(env or {})), workdir / "server.log",
                         startup_timeout)

    def client(self):
        from openai import OpenAI
        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def run_offline(spec: dict, workdir: Path, plugins: bool = True, timeout: float = 600,
                runner: Path = OFFLINE_RUNNER, env: dict[str, str] | None = None) -> dict:
    """Run tests/e2e/offline_run.py (a real vLLM engine in a fresh process) on `spec`; `env`:
    extra environment variables for it."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = isolated_env(workdir, plugins, **(env or {}))
    if spec.get("uni", True):
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    proc = subprocess.run([sys.executable, str(runner), str(spec_path), str(out_path)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"offline run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())


def run_offline_all(jobs: dict, **kw) -> dict:
    """Several `run_offline`s at once, each its own engine process: {name: (spec, workdir)} or
    {name: (spec, workdir, that job's own run_offline keywords)} -> {name: output}; `kw` go to
    every job. Most of a short run is the engine's import, profiling and warm-up, which overlap
    on 2 cores; results do not depend on it (each engine's threads are its own)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(run_offline, job[0], job[1], **kw,
                                     **(job[2] if len(job) > 2 else {}))
                   for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def chat_image(client, img, question: str = "What is in this image?", max_tokens: int = 16,
               **kw):
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0, seed=0, **kw,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(img)}},
            {"type": "text", "text": question}]}])


def load_benchmark(name: str):
    """benchmarks/NAME.py imported as a module (the benchmarks are scripts, not a package;
    their `import common` needs benchmarks/ on sys.path)."""
    import importlib.util

    script = REPO / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
