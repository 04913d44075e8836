"""deploy/compose + deploy/prometheus + deploy/grafana/provisioning: the compose files against
the compose-spec JSON schema (check-jsonschema's vendored copy) and Docker Compose v2's own
loader (`docker compose config`, no engine needed), and the wiring between the services."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, run, tool

COMPOSE = DEPLOY / "compose"
FILES = {"cpu": ["docker-compose.yml"], "gpu": ["docker-compose.yml", "docker-compose.gpu.yml"]}


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_file_matches_the_compose_spec_schema(name):
    r = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
             str(COMPOSE / name)])
    assert r.returncode == 0, r.stdout + r.stderr


def compose_config(variant: str, **shell: str) -> dict:
    args = [tool("docker-compose")]
    for f in FILES[variant]:
        args += ["-f", str(COMPOSE / f)]
    # A clean environment: the files' defaults, not this shell's variables (plus `shell`).
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(ROOT), **shell}
    r = run(args + ["config", "--format", "yaml"], env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


@pytest.mark.parametrize("variant", FILES)
def test_docker_compose_loads_the_stack(variant):
    cfg = compose_config(variant)
    assert set(cfg["services"]) == {"vllm-kvsparse", "prometheus", "grafana"}
    server = cfg["services"]["vllm-kvsparse"]
    build = server["build"]
    dockerfile = "docker/Dockerfile.gpu" if variant == "gpu" else "docker/Dockerfile.cpu"
    assert Path(build["context"]).resolve() == ROOT and build["dockerfile"] == dockerfile
    assert (ROOT / dockerfile).is_file()
    assert server["image"] == f"vllm-kvsparse:{variant}"
    assert any(p["target"] == 8000 for p in server["ports"])
    # Unset settings stay unset (null), so the image's ENV defaults apply.
    assert server["environment"]["KVSPARSE_METHOD"] is None
    devices = server.get("deploy", {}).get("resources", {}).get("reservations", {}) \
        .get("devices", [])
    if variant == "gpu":
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert server["ipc"] == "host"
    else:
        assert not devices and server["shm_size"]
    for svc in ("prometheus", "grafana"):
        image = cfg["services"][svc]["image"]
        tag = image.rpartition(":")[2]
        assert tag and tag != "latest" and any(ch.isdigit() for ch in tag), image
    # Every bind-mounted file or folder exists in the repository.
    for svc in cfg["services"].values():
        for v in svc.get("volumes", []):
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), v["source"]


def test_prometheus_scrapes_the_server_service():
    cfg = compose_config("cpu")
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    job = jobs["vllm-kvsparse"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["vllm-kvsparse:8000"]
    host, port = targets[0].split(":")
    assert host in cfg["services"]
    assert any(p["target"] == int(port) for p in cfg["services"][host]["ports"])
    mounts = {v["target"]: v["source"] for v in cfg["services"]["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == DEPLOY / "prometheus" / \
        "prometheus.yml"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    cfg = compose_config("cpu")
    grafana = cfg["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    prov = mounts["/etc/grafana/provisioning"]
    assert prov == DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["type"] for d in ds] == ["prometheus"] and ds[0]["isDefault"] is True
    assert ds[0]["url"] == "http://prometheus:9090" and "prometheus" in cfg["services"]
    providers = [p for f in (prov / "dashboards").glob("*.yml")
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert len(providers) == 1
    path = providers[0]["options"]["path"]
    dash = [src for target, src in mounts.items() if target.startswith(path + "/")]
    assert dash == [DEPLOY / "grafana" / "kvsparse-dashboard.json"]


@pytest.mark.parametrize("variant", FILES)
def test_ports_are_published_on_loopback_unless_opened(variant):
    """No API key and Grafana's admin password `admin` by default: nothing listens beyond the
    host unless BIND_ADDRESS is set (docs/deployment.md says to set VLLM_API_KEY and
    GRAFANA_ADMIN_PASSWORD with it)."""
    cfg = compose_config(variant)
    ports = [p for svc in cfg["services"].values() for p in svc.get("ports", [])]
    assert len(ports) == 3 and {p["host_ip"] for p in ports} == {"127.0.0.1"}, ports
    opened = compose_config(variant, BIND_ADDRESS="0.0.0.0", VLLM_API_KEY="k")
    assert {p["host_ip"] for svc in opened["services"].values()
            for p in svc.get("ports", [])} == {"0.0.0.0"}
    server = opened["services"]["vllm-kvsparse"]
    assert server["environment"]["VLLM_API_KEY"] == "k"   # passed through from the shell


def _seconds(duration: str) -> int:
    n, unit = int(duration[:-1]), duration[-1]
    return n * {"s": 1, "m": 60}[unit]


def test_server_drains_before_compose_kills_it():
    server = compose_config("cpu")["services"]["vllm-kvsparse"]
    timeout = int(server["environment"]["SHUTDOWN_TIMEOUT"])
    assert 0 < timeout < _seconds(server["stop_grace_period"])


def test_server_may_use_numa_memory_policy():
    assert compose_config("cpu")["services"]["vllm-kvsparse"]["cap_add"] == ["SYS_NICE"]
