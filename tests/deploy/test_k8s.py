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
from deploy_helpers import DEPLOY, image_env, need_module, run, tool

from vllm_kvsparse.config import SparsityConfig

# Oldest and newest Kubernetes minor versions we validate against.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
OVERLAYS = ["gpu", "cpu"]


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


@pytest.fixture(scope="module")
def with_servicemonitor(tmp_path_factory):
    out = {}
    for overlay in OVERLAYS:
        d = tmp_path_factory.mktemp(f"{overlay}-sm")
        shutil.copytree(DEPLOY, d / "deploy")
        user = d / "deploy" / "k8s" / "overlays" / f"{overlay}-prometheus-operator"
        user.mkdir()
        (user / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [../{overlay}]\ncomponents: [../../components/servicemonitor]\n")
        out[overlay] = kustomize(user)
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(overlay, version):
    kv = need_module("kubernetes_validate")
    objs = rendered(overlay)
    kinds = sorted(o["kind"] for o in objs)
    expected = ["ConfigMap", "ConfigMap", "Deployment", "Namespace", "Service"]
    assert kinds == sorted(expected + (["PersistentVolumeClaim"] if overlay == "gpu" else []))
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
    assert budget >= (1200 if overlay == "gpu" else 300)
    psc, csc = pod["spec"]["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
    for obj in (pod, one(objs, "Service")):
        ann = obj["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        assert int(ann["prometheus.io/port"]) == c["ports"][0]["containerPort"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/cache", "/dev/shm", "/tmp"} <= mounts   # writable dirs of a read-only rootfs


def test_gpu_overlay_requests_one_gpu_and_keeps_the_model_cache():
    objs = rendered("gpu")
    c = container(objs)
    assert c["image"].endswith(":gpu")
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == "1"
    vol = {v["name"]: v for v in one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" in vol["model-cache"]
    data = one(objs, "ConfigMap", "vllm-kvsparse-config")["data"]
    assert data["KVSPARSE_METHOD"] == "zipvl"


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
