"""docker/entrypoint.sh: the `vllm serve` argv it builds from the environment (dry run)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from deploy_helpers import (ENTRYPOINT, ROOT, entrypoint_dry_run, entrypoint_exec, image_env, run,
                            tool)

from vllm_kvsparse.config import METHODS, SparsityConfig

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
                    "KVSPARSE_METHOD='fast' is invalid; valid values are "
                    + ", ".join(METHODS))


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


# ---- the container's arguments, run for real (exec of a fake `vllm` that prints its argv) ----
# The official vllm/vllm-openai image is ENTRYPOINT ["vllm", "serve"], so `docker run IMAGE
# MODEL ...` and `docker run IMAGE --model MODEL ...` both serve MODEL. Ours must do the same
# instead of exec'ing the model id or letting the image's MODEL win over --model.

def served(env: dict[str, str], *args: str, fake_bin) -> dict:
    r = entrypoint_exec(env, *args, fake_bin=fake_bin)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["argv"][0] == "serve", out
    return {"args": out["argv"][1:], "env": out["env"], "stderr": r.stderr}


def model_of(args: list[str]) -> str:
    """The model `vllm serve` uses: its positional model_tag wins over --model (serve.py)."""
    assert "--model" not in args and not any(a.startswith("--model=") for a in args), args
    return args[0]


CPU_ENV = image_env("Dockerfile.cpu")


def test_leading_model_argument_sets_the_model_like_the_upstream_image(tmp_path):
    out = served(CPU_ENV, "Qwen/Qwen2-VL-2B-Instruct", "--max-num-seqs", "8",
                 fake_bin=tmp_path)
    args = out["args"]
    assert model_of(args) == "Qwen/Qwen2-VL-2B-Instruct"
    assert args[-2:] == ["--max-num-seqs", "8"]
    # The image's SERVED_MODEL_NAME named the image's own model: not this one.
    assert "--served-model-name" not in args
    assert "SERVED_MODEL_NAME=tiny-qwen2vl is not used" in out["stderr"]
    assert flag(args, "--kv-sparsity") == "zipvl"          # the plugin settings still apply


@pytest.mark.parametrize("form", [["--model", "Qwen/X"], ["--model=Qwen/X"]])
def test_model_flag_sets_the_model_instead_of_being_overridden(tmp_path, form):
    out = served(CPU_ENV, *form, "--served-model-name", "x", fake_bin=tmp_path)
    args = out["args"]
    assert model_of(args) == "Qwen/X"
    assert flag(args, "--served-model-name") == "x"


def test_model_flag_in_extra_args_sets_the_model(tmp_path):
    out = served({"MODEL": "m", "EXTRA_ARGS": "--model Qwen/Y --seed 1"}, fake_bin=tmp_path)
    assert model_of(out["args"]) == "Qwen/Y" and out["args"][-2:] == ["--seed", "1"]


def test_a_local_model_directory_is_a_model_not_a_command(tmp_path):
    model_dir = tmp_path / "models" / "mine"
    model_dir.mkdir(parents=True)
    out = served({"MODEL": "m"}, str(model_dir), fake_bin=tmp_path / "bin")
    assert model_of(out["args"]) == str(model_dir)


def test_executables_still_run_instead_of_the_server(tmp_path):
    for cmd in (["bash", "-c", "echo via bash"], ["/bin/echo", "via path"]):
        r = entrypoint_exec({"MODEL": "m"}, *cmd, fake_bin=tmp_path)
        assert r.returncode == 0 and r.stdout.strip().startswith("via"), (cmd, r)


def test_two_different_models_in_the_arguments_is_one_line_error(tmp_path):
    r = entrypoint_exec({"MODEL": "m"}, "A", "--model", "B", fake_bin=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "kvsparse-entrypoint: error: two models in the container arguments: 'A' and "
        "--model 'B'; give one"]


@pytest.mark.parametrize("where", ["args", "EXTRA_ARGS"])
def test_a_port_flag_must_match_PORT_which_the_health_checks_use(tmp_path, where):
    def go(port: str):
        if where == "args":
            return entrypoint_exec({"MODEL": "m"}, "--port", port, fake_bin=tmp_path)
        return entrypoint_exec({"MODEL": "m", "EXTRA_ARGS": f"--port={port}"}, fake_bin=tmp_path)
    same = go("8000")
    assert same.returncode == 0
    assert json.loads(same.stdout)["argv"].count("--port") == 1
    other = go("9000")
    assert other.returncode == 2 and other.stdout == ""
    assert "set PORT=9000 instead" in other.stderr and len(other.stderr.splitlines()) == 1


def test_api_key_is_passed_but_never_logged(tmp_path):
    out = served({"MODEL": "m", "EXTRA_ARGS": "--api-key s3cret-1 s3cret-2 --seed 1"},
                 fake_bin=tmp_path)
    assert out["args"][-5:] == ["--api-key", "s3cret-1", "s3cret-2", "--seed", "1"]
    assert "s3cret" not in out["stderr"]
    assert "--api-key REDACTED REDACTED --seed 1" in out["stderr"]
    assert "prefer VLLM_API_KEY" in out["stderr"]
    dry = entrypoint_dry_run({"MODEL": "m", "EXTRA_ARGS": "--api-key=s3cret"})
    assert dry.returncode == 0 and "s3cret" not in dry.stdout + dry.stderr


def test_shutdown_timeout_becomes_the_vllm_flag(tmp_path):
    out = served({"MODEL": "m", "SHUTDOWN_TIMEOUT": "45"}, fake_bin=tmp_path)
    assert flag(out["args"], "--shutdown-timeout") == "45"
    assert "--shutdown-timeout" not in served({"MODEL": "m"}, fake_bin=tmp_path)["args"]
    _one_line_error({"MODEL": "m", "SHUTDOWN_TIMEOUT": "1m"}, "SHUTDOWN_TIMEOUT='1m' is invalid")


def test_arbitrary_uid_gets_a_writable_home_and_a_user_name(tmp_path):
    """`docker run --user UID:0`: a uid missing from /etc/passwd gets HOME=/ and no name."""
    out = served({"MODEL": "m", "HOME": "/nonexistent/home", "TMPDIR": str(tmp_path)},
                 fake_bin=tmp_path / "bin")
    assert out["env"] == {"HOME": str(tmp_path / "kvsparse-home"), "USER": "kvsparse",
                          "LOGNAME": "kvsparse"}
    assert (tmp_path / "kvsparse-home").is_dir()
    kept = served({"MODEL": "m", "HOME": str(tmp_path), "USER": "me"}, fake_bin=tmp_path / "b2")
    assert kept["env"] == {"HOME": str(tmp_path), "USER": "me", "LOGNAME": "me"}


# ---- every argv above, through the installed vLLM 0.32 `vllm serve` parser (one process) ----

PARSE = (
    "import json, sys\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
    "from vllm_kvsparse.platform import add_cli_args\n"
    "p = make_arg_parser(FlexibleArgumentParser())\n"
    "add_cli_args(p)\n"
    "out = {}\n"
    "for name, argv in json.loads(sys.argv[1]).items():\n"
    "    a = p.parse_args(argv)\n"
    "    out[name] = {'model': a.model_tag if a.model_tag is not None else a.model,\n"
    "                 'kv_sparsity': a.kv_sparsity,\n"
    "                 'kv_cache_memory_bytes': a.kv_cache_memory_bytes,\n"
    "                 'max_model_len': a.max_model_len, 'enforce_eager': a.enforce_eager}\n"
    "print(json.dumps(out))\n")


@pytest.fixture(scope="module")
def vllm_parsed(tmp_path_factory):
    """The real `vllm serve` parser of vLLM 0.32 (the CPU build installed by
    scripts/install.sh; the CUDA build's parser is the same Python source) plus the plugin's
    flags, on each image's default argv and on what the entrypoint execs for each calling
    convention. `model` is what serve.py serves: the positional model_tag wins over --model."""
    d = tmp_path_factory.mktemp("fake-vllm")
    cases = {
        "Dockerfile.cpu": argv(image_env("Dockerfile.cpu"))[2:],
        "Dockerfile.gpu": argv(image_env("Dockerfile.gpu"))[2:],
        "Qwen/A": served(CPU_ENV, "Qwen/A", fake_bin=d / "1")["args"],
        "Qwen/B": served(CPU_ENV, "--model", "Qwen/B", fake_bin=d / "2")["args"],
        "Qwen/C": served({**CPU_ENV, "EXTRA_ARGS": "--model=Qwen/C"}, fake_bin=d / "3")["args"],
        "/models/tiny-qwen2vl": served(CPU_ENV, "--seed", "3", fake_bin=d / "4")["args"],
    }
    r = subprocess.run([sys.executable, "-c", PARSE, json.dumps(cases)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return cases, json.loads(r.stdout.strip().splitlines()[-1])


def test_image_default_commands_parse_with_the_installed_vllm_serve_parser(vllm_parsed):
    """Catches a misspelt or removed vLLM flag in either image's defaults."""
    cases, parsed = vllm_parsed
    assert parsed["Dockerfile.cpu"] == {
        "model": "/models/tiny-qwen2vl", "kv_sparsity": "zipvl",
        "kv_cache_memory_bytes": int(flag(cases["Dockerfile.cpu"], "--kv-cache-memory-bytes")),
        "max_model_len": 4096, "enforce_eager": True}
    # GPU: vLLM's own defaults (KV cache sized by gpu_memory_utilization, CUDA graphs on), and
    # max-model-len 16384 so that the 7B model starts on a 24 GB GPU (docs/deployment.md).
    assert parsed["Dockerfile.gpu"] == {
        "model": "Qwen/Qwen2-VL-7B-Instruct", "kv_sparsity": "zipvl",
        "kv_cache_memory_bytes": None, "max_model_len": 16384, "enforce_eager": False}


def test_every_calling_convention_serves_the_requested_model_in_vllm(vllm_parsed):
    _, parsed = vllm_parsed
    for want in ("Qwen/A", "Qwen/B", "Qwen/C", "/models/tiny-qwen2vl"):
        assert parsed[want]["model"] == want, (want, parsed[want])
        assert parsed[want]["kv_sparsity"] == "zipvl"


@pytest.mark.parametrize("method", METHODS[1:])
def test_every_method_of_the_plugin_is_accepted(method):
    args = argv({"MODEL": "m", "KVSPARSE_METHOD": method})
    assert args[args.index("--kv-sparsity") + 1] == method
