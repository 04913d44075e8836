"""scripts/install.sh run for real against a stand-in venv (its python/vllm print their argv):
which extras it installs (KVSPARSE_EXTRAS, the CPU image installs only `cpu`) and its check
for the C++ compiler that vLLM's CPU backend needs for logprobs requests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deploy_helpers import ROOT, run

INSTALL_SH = ROOT / "scripts" / "install.sh"
# What install.sh itself calls besides the venv's programs (bash runs it by absolute path).
TOOLS = ["dirname", "grep"]


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    for prog in ("python", "vllm"):
        p = venv / "bin" / prog
        p.write_text(f"#!/bin/bash\nprintf '{prog} %s\\n' \"$*\" >> '{log}'\n")
        p.chmod(0o755)
    return venv, log


def install(tmp_path: Path, path: str, **env: str):
    venv, log = fake_venv(tmp_path)
    r = run(["/bin/bash", str(INSTALL_SH), str(venv)], env={"PATH": path, **env}, timeout=60)
    return r, (log.read_text() if log.exists() else "")


def bin_without_compiler(tmp_path: Path) -> str:
    """A PATH with install.sh's tools and no g++/c++."""
    d = tmp_path / "bin"
    d.mkdir()
    for t in TOOLS:
        (d / t).symlink_to(shutil.which(t))
    return str(d)


def pip_installs(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("python -m pip install")]


def test_default_installs_the_test_and_bench_extras_editable(tmp_path):
    r, log = install(tmp_path, os.environ["PATH"])
    assert r.returncode == 0, r.stderr
    assert any(f"-e {ROOT}[cpu,test,bench] " in line for line in pip_installs(log)), log


def test_serving_image_extras_are_cpu_only(tmp_path):
    r, log = install(tmp_path, os.environ["PATH"], KVSPARSE_EXTRAS="cpu", KVSPARSE_EDITABLE="0")
    assert r.returncode == 0, r.stderr
    installs = pip_installs(log)
    assert any(f" {ROOT}[cpu] " in line and " -e " not in line for line in installs), log
    assert "test" not in " ".join(installs) and "bench" not in " ".join(installs)


def test_extras_without_cpu_are_refused(tmp_path):
    r, log = install(tmp_path, os.environ["PATH"], KVSPARSE_EXTRAS="test")
    assert r.returncode == 2 and "must include cpu" in r.stderr and not pip_installs(log)


def test_missing_cxx_compiler_is_a_warning_naming_logprobs(tmp_path):
    r, _ = install(tmp_path, bin_without_compiler(tmp_path))
    assert r.returncode == 0, r.stderr          # a warning, not a failed install
    warning = [line for line in r.stderr.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "no C++ compiler" in warning[0] and "logprobs" in warning[0]
    assert "g++" in warning[0]


def test_cxx_variable_is_the_compiler_inductor_uses(tmp_path):
    path = bin_without_compiler(tmp_path)
    cxx = tmp_path / "my-cxx"
    cxx.write_text("#!/bin/bash\necho fake 1.0\n")
    cxx.chmod(0o755)
    r, _ = install(tmp_path / "ok", path, CXX=str(cxx))
    assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr
    r, _ = install(tmp_path / "bad", path, CXX=str(tmp_path / "missing"))
    assert r.returncode == 0 and "CXX=" in r.stderr and "no C++ compiler" in r.stderr


def test_this_machine_has_the_compiler(tmp_path):
    """CI runs the e2e logprobs test (tests/e2e/test_cpu_image_serving.py), which needs it."""
    compiler = os.environ.get("CXX", "g++")
    assert shutil.which(compiler), (
        f"{compiler} not found: vLLM's CPU backend compiles its logprobs ops with it; "
        "apt-get install g++")
    r, _ = install(tmp_path, os.environ["PATH"])
    assert "WARNING" not in r.stderr, r.stderr

