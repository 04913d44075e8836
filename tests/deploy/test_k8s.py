"""deploy/k8s: every overlay rendered by real kustomize (kubectl's built-in) and every object
validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict), plus the
cross-object references a schema cannot see."""

from __future__ import annotations

import functools
import json
import re
import shutil

import pytest
import yaml
from deploy_helpers import DEPLOY, entrypoint_dry_run, image_env, need_module, run, tool

from vllm_kvsparse.config import SparsityConfig

# Oldest and newest Kubernetes minor versions we validate against.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
OVERLAYS = ["gpu", "cpu", "gpu-tp2"]


def kustomize(path) -> list[dict]:
    r = run([tool("kubectl"), "kustomize", str(path)], timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(kustomize(DEPLOY / "k8s" / "overlays" / overlay))


def one(objs, kind: str, name_prefix: str = "") -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, (kind, name_prefix, [o["metadata"]["name"] for o in objs])
    return found[0]


def container(objs) -> dict:
    return one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def with_component(tmp_path_factory, overlay: str, component: str) -> list[dict]:
    """An overlay plus an optional component, the way the docs tell a user to add it."""
    d = tmp_path_factory.mktemp(f"{overlay}-{component}")
    shutil.copytree(DEPLOY, d / "deploy")
    user = d / "deploy" / "k8s" / "overlays" / f"{overlay}-{component}"
    user.mkdir()
    (user / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [../{overlay}]\ncomponents: [../../components/{component}]\n")
    return kustomize(user)


@pytest.fixture(scope="module")
def with_servicemonitor(tmp_path_factory):
    return {o: with_component(tmp_path_factory, o, "servicemonitor") for o in OVERLAYS}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(overlay, version):
    kv = need_module("kubernetes_validate")
    objs = rendered(overlay)
    kinds = sorted(o["kind"] for o in objs)
    expected = ["ConfigMap", "ConfigMap", "Deployment", "Namespace", "Service"]
    gpu = overlay.startswith("gpu")
    assert kinds == sorted(expected + (["PersistentVolumeClaim"] if gpu else []))
    for obj in objs:
        try:
            kv.validate(obj, version, strict=True)
        except Exception as e:  # noqa: BLE001 - report which object failed and why
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} is invalid for "
                        f"Kubernetes {version}: {type(e).__name__}: {str(e)[:1500]}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_between_objects_resolve(overlay):
    objs = rendered(overlay)
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = one(objs, "Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    c = container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    # envFrom ConfigMap (hash-suffixed by the generator) exists.
    cm_names = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
    for ref in c["envFrom"]:
        assert ref["configMapRef"]["name"] in cm_names
    # Every mount has a volume; every PVC claim exists.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= volumes.keys()
    pvcs = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    for v in volumes.values():
        if "persistentVolumeClaim" in v:
            assert v["persistentVolumeClaim"]["claimName"] in pvcs
        assert len(set(v) - {"name"}) == 1, v   # exactly one volume source after patches
    # Everything lands in one namespace (the Namespace object itself excepted).
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == \
        {one(objs, "Namespace")["metadata"]["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_security_and_metrics_scraping(overlay):
    objs = rendered(overlay)
    pod = one(objs, "Deployment")["spec"]["template"]
    c = container(objs)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # Slow model loading: the startup probe's budget, not an initial delay, covers it.
    budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert budget >= (1200 if overlay.startswith("gpu") else 300)
    psc, csc = pod["spec"]["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
    # Annotation-based scraping: the pod only. With the Service annotated as well, the
    # community Prometheus chart's kubernetes-pods and kubernetes-service-endpoints jobs both
    # scrape each pod, under two `job` labels, and every sum() on the dashboard doubles.
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == c["ports"][0]["containerPort"]
    for obj in objs:
        if obj is not one(objs, "Deployment"):
            assert not [k for k in obj["metadata"].get("annotations", {})
                        if k.startswith("prometheus.io/")], obj["metadata"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/cache", "/dev/shm", "/tmp"} <= mounts   # writable dirs of a read-only rootfs


@pytest.mark.parametrize("overlay, gpus", [("gpu", 1), ("gpu-tp2", 2)])
def test_gpu_overlays_request_their_gpus_and_keep_the_model_cache(overlay, gpus):
    objs = rendered(overlay)
    c = container(objs)
    assert c["image"].endswith(":gpu")
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == str(gpus)
    assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == str(gpus)
    vol = {v["name"]: v for v in one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" in vol["model-cache"]
    assert vol["dshm"]["emptyDir"]["medium"] == "Memory"   # a patch must not break /dev/shm
    data = one(objs, "ConfigMap", "vllm-kvsparse-config")["data"]
    assert data["KVSPARSE_METHOD"] == "zipvl"


def test_gpu_tp2_overlay_passes_tensor_parallel_2():
    r = entrypoint_dry_run(container_env(rendered("gpu-tp2")))
    assert r.returncode == 0, r.stderr
    args = r.stdout.split()
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--kv-sparsity") + 1] == "zipvl"


def test_cpu_overlay_serves_the_images_tiny_model_with_zipvl_and_no_gpu():
    objs = rendered("cpu")
    c = container(objs)
    assert c["image"].endswith(":cpu")
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert "tolerations" not in spec
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    data = one(objs, "ConfigMap", "vllm-kvsparse-config")["data"]
    assert data["MODEL"] == image_env("Dockerfile.cpu")["MODEL"]   # built into the CPU image
    assert data["KVSPARSE_METHOD"] == "zipvl"
    SparsityConfig.from_options(data["KVSPARSE_METHOD"], data["KVSPARSE_CONFIG"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grafana_dashboard_configmap_is_the_dashboard_file(overlay):
    cm = one(rendered(overlay), "ConfigMap", "vllm-kvsparse-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (DEPLOY / "grafana" / "kvsparse-dashboard.json").read_text()
    assert cm["data"] == {"kvsparse-dashboard.json": text}
    # kubectl apply (client side) stores the object in an annotation limited to 256 KiB.
    assert len(text.encode()) < 200_000


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_optional_servicemonitor_component_selects_the_service(overlay, with_servicemonitor):
    """No package ships the Prometheus Operator's CRD schema for Python 3.11 (see
    docs/deployment.md), so the ServiceMonitor is checked field by field against the
    monitoring.coreos.com/v1 ServiceMonitor spec and against the Service it must select."""
    objs = with_servicemonitor[overlay]
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    svc = one(objs, "Service")
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert ep["port"] in port_names and ep["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", ep["interval"])
    # The other objects are unchanged by the component and still validate.
    kv = need_module("kubernetes_validate")
    for obj in objs:
        if obj["kind"] != "ServiceMonitor":
            kv.validate(obj, K8S_VERSIONS[-1], strict=True)


def container_env(objs) -> dict[str, str]:
    """The environment the entrypoint sees: the ConfigMap (envFrom) plus literal env values."""
    c = container(objs)
    env: dict[str, str] = {}
    for ref in c["envFrom"]:
        env.update(one(objs, "ConfigMap", ref["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sigterm_drains_in_flight_requests_within_the_grace_period(overlay):
    """vLLM 0.32 aborts in-flight requests on SIGTERM unless --shutdown-timeout > 0 (default
    0: config/vllm.py shutdown_timeout, engine/core.py mode=abort). The entrypoint must pass
    it, and it must end before the kubelet's SIGKILL."""
    objs = rendered(overlay)
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    r = entrypoint_dry_run(container_env(objs))
    assert r.returncode == 0, r.stderr
    args = r.stdout.split()
    timeout = int(args[args.index("--shutdown-timeout") + 1])
    assert 0 < timeout <= grace - 15, (timeout, grace)   # teardown time left before SIGKILL


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cache_volume_ownership_is_not_walked_on_every_start(overlay):
    psc = one(rendered(overlay), "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert psc["fsGroupChangePolicy"] == "OnRootMismatch" and psc["fsGroup"] == 10001


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_key_comes_from_an_optional_secret_not_from_arguments(overlay):
    objs = rendered(overlay)
    env = {e["name"]: e for e in container(objs).get("env", [])}
    ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and ref["name"] == "vllm-api-key"
    assert "--api-key" not in json.dumps(container_env(objs))


def test_cpu_overlay_adds_back_only_sys_nice_for_numa_binding():
    caps = {o: container(rendered(o))["securityContext"]["capabilities"] for o in OVERLAYS}
    assert caps["cpu"] == {"drop": ["ALL"], "add": ["SYS_NICE"]}
    assert caps["gpu"] == {"drop": ["ALL"]}


def test_nvidia_runtimeclass_component(tmp_path_factory):
    objs = with_component(tmp_path_factory, "gpu", "nvidia-runtimeclass")
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in one(rendered("gpu"), "Deployment")["spec"]["template"]["spec"]
    kv = need_module("kubernetes_validate")
    for version in K8S_VERSIONS:
        kv.validate(one(objs, "Deployment"), version, strict=True)
