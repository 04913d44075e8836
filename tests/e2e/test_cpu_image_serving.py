"""The CPU image's server, outside Docker: docker/entrypoint.sh run for real with the image's
environment (docker/Dockerfile.cpu ENV), execing the real `vllm serve`; the model built by the
image's own build step; the packages only the `test`/`bench` extras bring made unimportable
(the image installs the `cpu` extra only).

A request with `logprobs` (and one with `prompt_logprobs`) makes vLLM's CPU backend compile its
logprobs op with torch Inductor, which needs a C++ compiler: the image installs g++. Without
one, the engine dies (InvalidCxxCompiler, then EngineDeadError) and the server exits. The test
checks both requests are answered and that the server still answers afterwards. One server.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests
from helpers import BIN, REPO, VllmServer

sys.path.insert(0, str(REPO / "tests" / "deploy"))
from deploy_helpers import ENTRYPOINT, image_env  # noqa: E402

pytestmark = pytest.mark.e2e

# Modules only the `test`/`bench` extras install (everything else they list is a vLLM
# dependency anyway): the serving image has none of them.
NOT_IN_THE_IMAGE = ["pytest", "matplotlib", "dockerfile_parse", "kubernetes_validate",
                    "check_jsonschema", "hadolint", "shellcheck"]

BLOCKER = f"""\
import importlib.abc, sys
class _NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {NOT_IN_THE_IMAGE!r}:
            raise ModuleNotFoundError(f"{{name}} is not installed in the CPU image", name=name)
        return None
sys.meta_path.insert(0, _NotInTheImage())
"""


class CpuImageServer(VllmServer):
    """`docker run vllm-kvsparse:cpu` without Docker: the entrypoint, the image's ENV."""

    def __init__(self, model: str, workdir, site_dir):
        super().__init__(model, [], workdir)
        env = image_env("Dockerfile.cpu")
        env.pop("LD_PRELOAD")          # the image's /usr/lib and /opt/venv paths; not here
        env.update(MODEL=model, HOST="127.0.0.1", PORT=str(self.port),
                   # caches in the test's own directory instead of the image's /cache
                   HF_HOME=self.env["HF_HOME"], VLLM_CACHE_ROOT=self.env["VLLM_CACHE_ROOT"])
        self.env.update(env)
        self.env["PATH"] = os.pathsep.join([str(BIN), self.env.get("PATH", "/usr/bin:/bin")])
        self.env["PYTHONPATH"] = str(site_dir)
        self.cmd = ["bash", str(ENTRYPOINT)]
        self.served_name = env["SERVED_MODEL_NAME"]


def completion(srv: CpuImageServer, **extra) -> requests.Response:
    return requests.post(srv.url + "/v1/completions", timeout=600, json={
        "model": srv.served_name, "prompt": "The capital of France is", "max_tokens": 4,
        "temperature": 0, **extra})


def test_cpu_image_command_answers_logprobs_requests_and_keeps_serving(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(site)}
    # The image's build step (Dockerfile.cpu: `vllm-kvsparse tiny-model /models/tiny-qwen2vl`).
    model = tmp_path / "tiny-qwen2vl"
    built = subprocess.run([str(BIN / "vllm-kvsparse"), "tiny-model", str(model)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert "is not installed in the CPU image" in probe.stderr   # the blocker is active

    with CpuImageServer(str(model), tmp_path / "srv", site) as srv:
        assert srv.proc.args[:2] == ["bash", str(ENTRYPOINT)]
        r = completion(srv, logprobs=2)
        assert r.status_code == 200, (r.text, srv.log()[-4000:])
        top = r.json()["choices"][0]["logprobs"]["top_logprobs"]
        tokens = r.json()["choices"][0]["logprobs"]["tokens"]
        assert tokens and len(top) == len(tokens) and all(2 <= len(t) <= 3 for t in top), top

        r = completion(srv, prompt_logprobs=1, max_tokens=1)
        assert r.status_code == 200, (r.text, srv.log()[-4000:])
        assert r.json()["choices"][0]["prompt_logprobs"], r.json()

        # The engine survived both: a plain request, health, and the process itself.
        r = completion(srv)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200
        assert srv.proc.poll() is None
        log = srv.log()
        assert "--kv-sparsity zipvl" in log            # the entrypoint's command line
        assert "InvalidCxxCompiler" not in log and "EngineDeadError" not in log
