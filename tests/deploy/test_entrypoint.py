"""docker/entrypoint.sh: the `vllm serve` argv it builds from the environment (dry run)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from deploy_helpers import ENTRYPOINT, ROOT, entrypoint_dry_run, image_env, run, tool

from vllm_kvsparse.config import SparsityConfig

BASE = ["vllm", "serve", "m", "--host", "0.0.0.0", "--port", "8000"]


def argv(env: dict[str, str], *args: str) -> list[str]:
    r = entrypoint_dry_run(env, *args)
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout)


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, args
    return args[args.index(name) + 1]


def test_shellcheck_clean():
    r = run([tool("shellcheck"), "--shell=bash", "--severity=style", str(ENTRYPOINT)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_method_none_passes_no_plugin_flag():
    # `none` must be plain vLLM: no plugin flag at all.
    r = entrypoint_dry_run({"MODEL": "m", "KVSPARSE_METHOD": "none",
                            "KVSPARSE_CONFIG": '{"tau": 0.9}'})
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == BASE
    assert "KVSPARSE_CONFIG is ignored" in r.stderr


def test_default_method_is_zipvl_without_config():
    assert argv({"MODEL": "m"}) == BASE + ["--kv-sparsity", "zipvl"]


def test_zipvl_with_config_json_passes_both_flags_intact():
    cfg = '{"tau": 0.95, "scope": "visual", "exempt_layers": [0, 1]}'
    args = argv({"MODEL": "m", "KVSPARSE_METHOD": "zipvl", "KVSPARSE_CONFIG": cfg})
    assert args == BASE + ["--kv-sparsity", "zipvl", "--kv-sparsity-config", cfg]


def test_extra_args_are_split_like_a_shell_and_nothing_is_executed(tmp_path):
    marker = tmp_path / "pwned"
    extra = (f"--max-num-seqs 8 --limit-mm-per-prompt '{{\"image\": 2}}' "
             f"--served-model-name \"my model\" $(touch {marker}) `touch {marker}`")
    args = argv({"MODEL": "m", "KVSPARSE_METHOD": "none", "EXTRA_ARGS": extra,
                 "VLLM_DEFAULT_ARGS": "--enforce-eager"}, "--seed", "1")
    assert args == BASE + ["--enforce-eager", "--max-num-seqs", "8",
                           "--limit-mm-per-prompt", '{"image": 2}',
                           "--served-model-name", "my model",
                           "$(touch", f"{marker})", "`touch", f"{marker}`",
                           "--seed", "1"]
    assert not marker.exists()


def test_host_port_and_served_model_name():
    args = argv({"MODEL": "/models/x", "KVSPARSE_METHOD": "none", "HOST": "127.0.0.1",
                 "PORT": "9001", "SERVED_MODEL_NAME": "x"})
    assert args == ["vllm", "serve", "/models/x", "--host", "127.0.0.1", "--port", "9001",
                    "--served-model-name", "x"]


def test_non_flag_container_arguments_run_instead_of_the_server():
    r = entrypoint_dry_run({"MODEL": "m"}, "echo", "hello from the image")
    assert (r.returncode, r.stdout) == (0, "hello from the image\n")


def _one_line_error(env: dict[str, str], expected: str) -> None:
    r = entrypoint_dry_run(env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvsparse-entrypoint: error:"), r.stderr
    assert expected in lines[0]


def test_invalid_method_is_one_line_error():
    _one_line_error({"MODEL": "m", "KVSPARSE_METHOD": "fast"},
                    "KVSPARSE_METHOD='fast' is invalid; valid values are none, zipvl")


def test_missing_model_is_one_line_error():
    _one_line_error({"MODEL": ""}, "MODEL is empty")


def test_invalid_port_is_one_line_error():
    _one_line_error({"MODEL": "m", "PORT": "80a"}, "PORT='80a' is invalid")
    _one_line_error({"MODEL": "m", "PORT": "70000"}, "PORT='70000' is invalid")


def test_unbalanced_quote_in_extra_args_is_one_line_error():
    _one_line_error({"MODEL": "m", "EXTRA_ARGS": "--served-model-name 'x"},
                    "EXTRA_ARGS cannot be split")


# ---- the images' default commands ------------------------------------------------------------

def cpu_default_argv() -> list[str]:
    return argv(image_env("Dockerfile.cpu"))


def test_cpu_image_default_command_serves_tiny_model_with_zipvl_and_bounded_cpu_flags():
    args = cpu_default_argv()
    assert args[:3] == ["vllm", "serve", "/models/tiny-qwen2vl"]
    assert flag(args, "--kv-sparsity") == "zipvl"
    SparsityConfig.from_options("zipvl", flag(args, "--kv-sparsity-config"))  # valid config
    assert int(flag(args, "--kv-cache-memory-bytes")) <= 1 << 30      # bounded KV cache
    assert int(flag(args, "--max-model-len")) <= 8192
    assert "--enforce-eager" in args
    assert json.loads(flag(args, "--limit-mm-per-prompt"))["image"] >= 1
    assert flag(args, "--served-model-name") == "tiny-qwen2vl"


def test_gpu_image_default_command_serves_zipvl():
    args = argv(image_env("Dockerfile.gpu"))
    assert args[:3] == ["vllm", "serve", "Qwen/Qwen2-VL-7B-Instruct"]
    assert flag(args, "--kv-sparsity") == "zipvl"


@pytest.mark.parametrize("image", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_image_default_command_parses_with_the_installed_vllm_serve_parser(image):
    """Each image's argv against the real `vllm serve` parser of vLLM 0.32 (the CPU build
    installed by scripts/install.sh; the CUDA build's parser is the same Python source) plus
    the plugin's flags: catches a misspelt or removed vLLM flag."""
    code = (
        "import json, sys\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
        "from vllm_kvsparse.platform import add_cli_args\n"
        "p = make_arg_parser(FlexibleArgumentParser())\n"
        "add_cli_args(p)\n"
        "a = p.parse_args(json.loads(sys.argv[1]))\n"
        "print(json.dumps({'model': a.model_tag, 'kv_sparsity': a.kv_sparsity,\n"
        "                  'kv_cache_memory_bytes': a.kv_cache_memory_bytes,\n"
        "                  'enforce_eager': a.enforce_eager}))\n")
    args = argv(image_env(image))
    assert args[:2] == ["vllm", "serve"]
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args[2:])], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    parsed = json.loads(r.stdout.strip().splitlines()[-1])
    if image == "Dockerfile.cpu":
        assert parsed == {"model": "/models/tiny-qwen2vl", "kv_sparsity": "zipvl",
                          "kv_cache_memory_bytes": int(flag(args, "--kv-cache-memory-bytes")),
                          "enforce_eager": True}
    else:   # vLLM's own defaults: KV cache sized by gpu_memory_utilization, CUDA graphs on
        assert parsed == {"model": "Qwen/Qwen2-VL-7B-Instruct", "kv_sparsity": "zipvl",
                          "kv_cache_memory_bytes": None, "enforce_eager": False}
