"""Foundation: install, `vllm serve ... --kv-sparsity`, start-up errors, stock behaviour of
`none`, and the config reaching the worker. Real vLLM only."""

import subprocess

import pytest
import requests
from helpers import BIN, VllmServer, chat_image, isolated_env, run_offline, make_image

pytestmark = pytest.mark.e2e

PROMPTS = [{"image": {"seed": 1}, "question": "What is in this image?"},
           {"image": [{"seed": 2}, {"seed": 3, "size": [224, 336]}], "question": "Compare."},
           {"tokens": 700, "seed": 0}, {"tokens": 20, "seed": 2},
           {"text": "<|im_start|>user\nDescribe a red car.<|im_end|>\n<|im_start|>assistant\n"}]


def test_vllm_command_prints_version():
    out = subprocess.run([str(BIN / "vllm"), "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("0.32.0"), out.stdout


def test_serve_with_plugin_answers_image_chat_and_metrics(tiny_model, tmp_path):
    with VllmServer(tiny_model, ["--kv-sparsity", "none"], tmp_path) as srv:
        reply = chat_image(srv.client(), make_image(seed=5))
        assert reply.choices[0].message.content
        assert reply.usage.prompt_tokens > 256  # the image's 256 placeholder tokens are in
        metrics = requests.get(srv.url + "/metrics", timeout=10)
        assert metrics.status_code == 200
        assert "vllm:time_to_first_token_seconds_count" in metrics.text


@pytest.mark.parametrize("args, needle", [
    (["--kv-sparsity", "bogus"], "invalid choice: 'bogus' (choose from 'none', 'zipvl', "
                                 "'fastv', 'snapkv', 'pyramidkv', 'streamingllm', 'vlcache', "
                                 "'aircache', 'random')"),
    (["--kv-sparsity", "zipvl", "--kv-sparsity-config", '{"tau": 1.5}'],
     "zipvl: tau=1.5 is invalid; valid values are numbers in (0, 1]"),
    (["--kv-sparsity", "pyramidkv", "--kv-sparsity-config", '{"tau": 0.9}'],
     "unknown key 'tau' for pyramidkv; valid keys are budget, window, kernel, pooling, beta, "),
    (["--kv-sparsity", "zipvl", "--kv-sparsity-config", '{"exempt_layers": [5]}'],
     "exempt layer 5 is out of range; valid layer indices are 0..1"),
    (["--kv-sparsity", "zipvl", "--pipeline-parallel-size", "2"],
     "kv-sparsity=zipvl cannot run with --pipeline-parallel-size=2 (only 1 is supported: vLLM "
     "0.32 returns only the last pipeline stage's output to the scheduler"),
    (["--kv-sparsity", "snapkv", "--kv-cache-dtype", "fp8"],
     "kv-sparsity=snapkv cannot run with --kv-cache-dtype=fp8 with chunked prefill (a "
     "quantized cache does not hold the plain K/V of earlier prompt chunks"),
])   # every other bad option value: tests/unit/test_config.py (the same one-line messages)
def test_bad_flag_values_exit_nonzero_with_one_line(tiny_model, tmp_path, args, needle):
    proc = subprocess.run([str(BIN / "vllm"), "serve", tiny_model, "--port", "1", *args],
                          env=isolated_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert needle in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_serve_help_lists_the_methods():
    proc = subprocess.run([str(BIN / "vllm"), "serve", "--help=vllm-kvsparse"],
                          capture_output=True, text=True, timeout=300)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "--kv-sparsity" in text, proc.stderr[-2000:]
    assert "{none,zipvl,fastv,snapkv,pyramidkv,streamingllm,vlcache,aircache,random}" in text


@pytest.fixture(scope="module")
def stock_outputs(tiny_model, tmp_path_factory):
    """Greedy tokens of stock vLLM (no plugin loaded), uniprocess engine."""
    return run_offline({"model": tiny_model, "prompts": PROMPTS},
                       tmp_path_factory.mktemp("stock"), plugins=False)


def test_none_is_stock_vllm_and_config_reaches_workers(tiny_model, tmp_path, stock_outputs):
    out = run_offline({"model": tiny_model, "prompts": PROMPTS, "probe_workers": True,
                       "additional_config": {"kv_sparsity": "none"}}, tmp_path)
    assert out["outputs"] == stock_outputs["outputs"]
    layers = out["workers"][0]
    assert sorted(layers) == [f"language_model.model.layers.{i}.self_attn.attn" for i in (0, 1)]
    for info in layers.values():
        assert info["impl"] == "KVSparseCPUAttentionImpl"
        assert info["config"]["kv_sparsity"] == "none"


def test_python_llm_bad_config_fails_at_start(tiny_model, tmp_path):
    with pytest.raises(RuntimeError, match=r"zipvl: tau=2 is invalid; valid values are "
                                           r"numbers in \(0, 1\]"):
        run_offline({"model": tiny_model, "prompts": PROMPTS[:1],
                     "additional_config": {"kv_sparsity": "zipvl",
                                           "kv_sparsity_config": {"tau": 2}}}, tmp_path)
