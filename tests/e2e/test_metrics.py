"""kvsparse_ metrics on the server's /metrics, checked three ways against a real server: they
exist and moved, they agree with the per-(request, layer) records the backend writes, and a real
Prometheus server scrapes them and evaluates every PromQL expression of the Grafana dashboard."""

import json
import math
import re
import subprocess
import time

import pytest
import requests
from helpers import REPO, VllmServer, chat_image, free_port, make_image
from prometheus_client.parser import text_string_to_metric_families

from vllm_kvsparse.records import read_records

pytestmark = pytest.mark.e2e

PROMETHEUS = REPO / ".cache" / "prometheus" / "usr" / "bin" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "kvsparse-dashboard.json"


def scrape(url: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample on /metrics."""
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples, name, **labels):
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert found, f"{name}{labels} not exported"
    return sum(found)


@pytest.fixture(scope="module")
def served(peaked_model, tmp_path_factory):
    """A zipvl server that has answered 3 image requests and 1 short text request."""
    workdir = tmp_path_factory.mktemp("metrics")
    rec = workdir / "records"
    cfg = {"tau": 0.9, "min_prompt_len": 100, "exempt_layers": [0], "record_dir": str(rec)}
    with VllmServer(peaked_model, ["--kv-sparsity", "zipvl", "--kv-sparsity-config",
                                   json.dumps(cfg)], workdir / "srv") as srv:
        client = srv.client()
        for seed in (1, 2, 3):
            assert chat_image(client, make_image(seed=seed)).choices[0].message.content
        model = client.models.list().data[0].id
        client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "hi"}])
        time.sleep(1.0)   # let the last step's stats land
        yield srv, scrape(srv.url), read_records(str(rec)), model


def test_metrics_moved_and_agree_with_records(served):
    srv, samples, records, model = served
    labels = {"model_name": model, "method": "zipvl"}
    assert len(records) == 3 * 3  # 3 image requests x 3 sparse layers (layer 0 exempt)
    seen = value(samples, "kvsparse_prompt_tokens_seen_total", **labels)
    kept = value(samples, "kvsparse_prompt_tokens_kept_total", **labels)
    assert seen == sum(r["num_tokens"] for r in records)
    assert kept == sum(r["num_kept"] for r in records) < seen
    for layer in (1, 2, 3):
        mine = [r["num_kept"] / r["num_tokens"] for r in records if r["layer"] == layer]
        assert value(samples, "kvsparse_kept_ratio_count", layer=str(layer), **labels) == 3
        assert math.isclose(value(samples, "kvsparse_kept_ratio_sum", layer=str(layer),
                                  **labels), sum(mine), rel_tol=1e-9)
    assert not any(n == "kvsparse_kept_ratio_count" and ("layer", "0") in ls
                   for n, ls in samples)
    flops = sum(2.0 * 4 * 64 * (r["num_tokens"] ** 2 - r["num_kept"] ** 2) for r in records)
    assert math.isclose(value(samples, "kvsparse_attention_flops_saved_total", **labels), flops)
    assert value(samples, "kvsparse_probe_seconds_total", **labels) > 0
    assert value(samples, "kvsparse_kv_blocks_freed_total", **labels) > 0
    assert value(samples, "kvsparse_dense_fallback_requests_total", reason="short_prompt",
                 **labels) == 1
    assert value(samples, "kvsparse_dense_fallback_requests_total", reason="exempt_layer",
                 **labels) == 3
    # vLLM's own metrics are untouched: one TTFT observation per request
    assert value(samples, "vllm:time_to_first_token_seconds_count") == 4


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", []) if "expr" in t]


def test_real_prometheus_scrapes_them_and_evaluates_every_dashboard_query(served, tmp_path):
    srv, samples, _, model = served
    assert PROMETHEUS.exists(), "run scripts/install_prometheus.sh (scripts/test.sh does)"
    exported = {name for name, _ in samples}
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: vllm-kvsparse\n    static_configs: [{{targets: "
        f"['{srv.url.removeprefix('http://')}']}}]\n")
    prom = subprocess.Popen([str(PROMETHEUS), f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        want = value(samples, "kvsparse_prompt_tokens_kept_total")
        deadline, got = time.time() + 60, None
        while time.time() < deadline and got != want:
            time.sleep(1)
            try:
                res = requests.get(api, params={"query": "kvsparse_prompt_tokens_kept_total"},
                                   timeout=5).json()["data"]["result"]
                got = float(res[0]["value"][1]) if res else None
            except (requests.RequestException, KeyError, ValueError):
                pass
        assert got == want, "Prometheus did not scrape the kvsparse_ metrics"
        exprs = dashboard_exprs()
        assert len(exprs) >= 10
        for expr in exprs:
            names = set(re.findall(r"\b((?:vllm:|kvsparse_)[a-zA-Z0-9_:]+)", expr))
            assert names and names <= exported, (expr, names - exported)
            query = expr.replace("$__rate_interval", "1m").replace("$model_name", model)
            body = requests.get(api, params={"query": query}, timeout=10).json()
            assert body["status"] == "success", (expr, body)
    finally:
        prom.terminate()
        prom.wait(timeout=30)
