"""docker/Dockerfile.cpu and docker/Dockerfile.gpu: lint, pins, user, health check, and the CPU
image's install being scripts/install.sh itself (the README's and CI's install path)."""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_helpers import DOCKER, ROOT, dockerfile, image_env, run, tool

DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]
INSTALL_SH = "scripts/install.sh"


def instructions(name: str) -> list[tuple[str, str]]:
    return [(i["instruction"], i["value"]) for i in dockerfile(name).structure
            if i["instruction"] != "COMMENT"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name):
    # Default failure threshold (info): any finding fails. Inline ignores carry a reason.
    r = run([tool("hadolint"), "--no-color", str(DOCKER / name)])
    assert r.returncode == 0, r.stdout + r.stderr
    text = (DOCKER / name).read_text()
    for m in re.finditer(r"^# hadolint ignore=.*$", text, re.M):
        before = text[:m.start()].rstrip("\n").splitlines()[-1]
        assert before.startswith("#") and "ignored on purpose" in text[:m.start()][-400:], \
            f"{name}: `{m.group(0)}` needs a justification comment"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_image_is_pinned_to_a_version(name):
    df = dockerfile(name)
    base = df.baseimage
    if base.startswith("${"):   # FROM ${ARG}: resolve the ARG's default
        arg = base.strip("${}")
        defaults = dict(v.split("=", 1) for k, v in instructions(name) if k == "ARG" and "=" in v)
        base = defaults[arg]
    repo, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), base
    if name == "Dockerfile.gpu":
        assert repo == "vllm/vllm-openai"
        # The tag must be the [gpu] extra's pinned vLLM (pyproject.toml: vllm==0.32.0), which
        # is also the vllm-cpu version of the [cpu] extra (one vLLM API for both paths).
        spec = tomllib.loads((ROOT / "pyproject.toml").read_text())
        extras = spec["project"]["optional-dependencies"]
        gpu = re.fullmatch(r"vllm==([\d.]+)", extras["gpu"][0]).group(1)
        cpu = [re.fullmatch(r"vllm-cpu==([\d.]+)", d) for d in extras["cpu"]]
        assert tag == f"v{gpu}", (tag, gpu)
        assert [m.group(1) for m in cpu if m] == [gpu], extras
    else:
        assert repo == "python" and tag.startswith("3.11") and "slim" in tag, base


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_non_root_numeric_user_with_health_check(name):
    ins = instructions(name)
    users = [v for k, v in ins if k == "USER"]
    assert users and users[-1].isdigit() and int(users[-1]) != 0, users
    health = [v for k, v in ins if k == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0], health
    assert re.search(r"--start-period=\d+", health[0])
    entry = [v for k, v in ins if k == "ENTRYPOINT"]
    assert json.loads(entry[-1]) == ["/usr/local/bin/kvsparse-entrypoint"]
    copies = [v for k, v in ins if k == "COPY"]
    assert "docker/entrypoint.sh /usr/local/bin/kvsparse-entrypoint" in copies
    assert [v for k, v in ins if k == "EXPOSE"] == ["8000"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_exist_and_cover_the_package(name):
    copied = set()
    for k, v in instructions(name):
        if k == "COPY":
            *srcs, _dest = shlex.split(v)
            for s in srcs:
                if s.startswith("--"):
                    continue
                assert (ROOT / s).exists(), f"{name}: COPY {s}: no such file in the repository"
                copied.add(s)
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", spec["project"]["readme"]}
    needed |= set(spec["tool"]["setuptools"].get("package-dir", {}).values())
    needed |= {p.split(".")[0] for p in spec["tool"]["setuptools"]["packages"]
               if p.split(".")[0] not in spec["tool"]["setuptools"].get("package-dir", {})}
    assert needed <= copied, f"{name} does not COPY {sorted(needed - copied)}"


def test_gpu_image_installs_the_package_without_touching_the_images_vllm():
    runs = [v for k, v in instructions("Dockerfile.gpu") if k == "RUN"]
    install = [r for r in runs if "pip install" in r]
    assert len(install) == 1 and "--no-deps" in install[0] and " . " in install[0] + " "
    assert 'startswith("0.32.")' in install[0]     # fails the build on another vLLM


# ---- the CPU image's install is scripts/install.sh ------------------------------------------

def test_cpu_image_copies_and_runs_scripts_install_sh():
    workdir = "/"
    copied: dict[str, str] = {}          # absolute path in the image -> repository path
    install_runs = []
    for k, v in instructions("Dockerfile.cpu"):
        if k == "WORKDIR":
            workdir = posixpath.join(workdir, v)
        elif k == "COPY":
            *srcs, dest = shlex.split(v)
            for s in srcs:
                target = posixpath.normpath(posixpath.join(workdir, dest))
                if len(srcs) > 1 or dest.endswith("/"):
                    target = posixpath.join(target, posixpath.basename(s))
                copied[target] = s
        elif k == "RUN" and "install.sh" in v:
            install_runs.append((workdir, v))
    assert len(install_runs) == 1, install_runs
    wd, cmd = install_runs[0]
    words = shlex.split(cmd.split("&&")[0])
    script = next(w for w in words if w.endswith("install.sh"))
    in_image = posixpath.normpath(posixpath.join(wd, script))
    # Which repository file lands at that path?
    source = None
    for target, src in copied.items():
        if in_image == target:
            source = src
        elif in_image.startswith(target + "/"):
            source = posixpath.join(src, in_image[len(target) + 1:])
    assert source == INSTALL_SH, (in_image, copied)
    assert words[words.index(script) - 1] == "bash" and "KVSPARSE_EDITABLE=0" in words
    venv = words[words.index(script) + 1]
    # The venv it creates is the one on PATH, and the tiny model is the one served.
    env = dockerfile("Dockerfile.cpu").envs
    runs = [v for k, v in instructions("Dockerfile.cpu") if k == "RUN"]
    assert f"ENV PATH={venv}/bin:$PATH" in [f"{k} {v}" for k, v in
                                            instructions("Dockerfile.cpu")]
    tiny = [shlex.split(r) for r in runs if "tiny-model" in r]
    assert len(tiny) == 1 and tiny[0][:2] == ["vllm-kvsparse", "tiny-model"]
    assert tiny[0][2] == env["MODEL"] == image_env("Dockerfile.cpu")["MODEL"]
    # pip reads PIP_EXTRA_INDEX_URL: the CPU torch index install.sh's comment asks for.
    assert env["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in \
        (ROOT / INSTALL_SH).read_text()


def test_install_sh_is_the_readme_and_ci_install_path():
    assert f"bash {INSTALL_SH}" in (ROOT / "README.md").read_text() or \
        INSTALL_SH in (ROOT / "README.md").read_text()
    # CI: .ci/run reaches scripts/install.sh through the scripts it runs.
    seen, todo = set(), [".ci/run"]
    while todo:
        path = todo.pop()
        if path in seen or not (ROOT / path).is_file():
            continue
        seen.add(path)
        todo += re.findall(r"(scripts/[\w.-]+\.sh)", (ROOT / path).read_text())
    assert INSTALL_SH in seen, f".ci/run does not reach {INSTALL_SH} (followed {sorted(seen)})"


# Lines that only scripts/install.sh may contain: a second copy of the install logic anywhere
# else (a Dockerfile, a CI script, a doc with a copy-paste recipe) fails this test.
INSTALL_LOGIC = [
    re.compile(r"uninstall\b.*\btorchaudio"),                    # step 3
    re.compile(r"pip[\s_-]+install\b[^\n]*\btorch==\d"),         # step 1
    re.compile(r"install\b[^\n]*vllm-cpu-alias"),                # step 2's alias distribution
    re.compile(r"python\S*\s+\S*fix_torchvision\.py"),           # step 4
    re.compile(r'endswith\("\+cpu"\)'),                          # the +cpu torch check
]


def test_no_second_copy_of_the_install_logic():
    text = (ROOT / INSTALL_SH).read_text()
    for rx in INSTALL_LOGIC:
        assert rx.search(text), f"{rx.pattern} no longer matches {INSTALL_SH}: update this test"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    me = "tests/deploy/test_images.py"
    offenders = []
    for f in files:
        if f in (INSTALL_SH, me) or not (ROOT / f).is_file():
            continue
        try:
            content = (ROOT / f).read_text()
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [f"{f}: {rx.pattern}" for rx in INSTALL_LOGIC if rx.search(content)]
    assert not offenders, offenders


# ---- the CPU image's runtime: compiler, preloads, extras; both images' non-root layout -------

def apt_packages(name: str) -> set[str]:
    pkgs: set[str] = set()
    for k, v in instructions(name):
        if k == "RUN" and "apt-get install" in v:
            for part in v.split("&&"):
                words = shlex.split(part)
                if words[:2] == ["apt-get", "install"]:
                    pkgs |= {w for w in words[2:] if not w.startswith("-")}
    return pkgs


def test_cpu_image_has_the_cxx_compiler_vllm_compiles_logprobs_ops_with():
    """vLLM on CPU compiles its logprobs helper with torch Inductor (torch.compile, backend
    `inductor` = CpuPlatform.simple_compile_backend) at the first request with logprobs;
    Inductor runs $CXX or g++. Without it the engine dies (InvalidCxxCompiler). End to end:
    tests/e2e/test_cpu_image_serving.py."""
    assert "g++" in apt_packages("Dockerfile.cpu")
    assert "CXX" not in image_env("Dockerfile.cpu")      # Inductor's default, g++, is used


def test_cpu_image_installs_only_the_serving_extra():
    runs = [v for k, v in instructions("Dockerfile.cpu") if k == "RUN" and "install.sh" in v]
    words = shlex.split(runs[0].split("&&")[0])
    assert "KVSPARSE_EXTRAS=cpu" in words, words     # not test (linters, kubectl...), not bench


def test_cpu_image_preloads_tcmalloc_and_intel_openmp_like_vllms_cpu_image():
    ins = instructions("Dockerfile.cpu")
    env_lines = [i for i, (k, v) in enumerate(ins) if k == "ENV" and "LD_PRELOAD=" in v]
    assert len(env_lines) == 1
    preload = dockerfile("Dockerfile.cpu").envs["LD_PRELOAD"].split(":")
    venv = next(v.split("=", 1)[1].split("/bin:")[0] for k, v in ins
                if k == "ENV" and v.startswith("PATH="))
    # vLLM's docker/Dockerfile.cpu (linux/amd64): the same two files, in this order.
    assert preload == ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                       f"{venv}/lib/libiomp5.so"]
    assert "libtcmalloc-minimal4" in apt_packages("Dockerfile.cpu")   # Debian's package
    # libiomp5.so comes with intel-openmp, a vllm-cpu dependency, into the venv's lib/: the
    # venv scripts/install.sh built here has it at the same place.
    assert (Path(sys.prefix) / "lib" / "libiomp5.so").is_file()
    # Set after every build step (no RUN preloads them); the build checks both files exist.
    later_runs = [v for k, v in ins[env_lines[0]:] if k == "RUN"]
    assert not later_runs
    check = [v for k, v in ins[:env_lines[0]] if k == "RUN" and "test -f" in v]
    assert check and all(f in check[-1] for f in preload)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_home_and_cache_are_group_zero_writable_for_arbitrary_uids(name):
    """`docker run --user "$(id -u):0" -v ~/.cache/huggingface:/cache/huggingface` (host
    cache) and OpenShift's arbitrary uids: group 0 must be able to write $HOME and /cache."""
    env = image_env(name)
    assert env["HF_HOME"] == "/cache/huggingface" and env["VLLM_CACHE_ROOT"] == "/cache/vllm"
    user = [v for k, v in instructions(name) if k == "RUN" and "useradd" in v]
    assert len(user) == 1
    parts = [shlex.split(p) for p in user[0].split("&&")]
    add = next(p for p in parts if p[0] == "useradd")
    assert add[add.index("--gid") + 1] == "0" and add[add.index("--uid") + 1] == "10001"
    home = add[add.index("--home-dir") + 1]
    chown = next(p for p in parts if p[0] == "chown")
    chmod = next(p for p in parts if p[0] == "chmod")
    assert chown[1] == "10001:0" and {"/cache", home} <= set(chown[2:])
    assert chmod[1] == "0775" and {"/cache", home} <= set(chmod[2:])
