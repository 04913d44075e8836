"""`vllm-kvsparse bench`: the statistics, the /metrics parsing and the figures on synthetic
data, then the command end to end against a real tiny zipvl server plus an endpoint that is
down (every request of it must be a recorded failure, and the run must still report)."""

import json
import subprocess

import pytest
import requests
from helpers import BIN, VllmServer

from vllm_kvsparse.bench import metrics_scrape, plots, report, workload

pytestmark = pytest.mark.e2e

ZIPVL = ["--kv-sparsity", "zipvl", "--kv-sparsity-config", '{"min_prompt_len": 0, "tau": 0.9}']


def test_percentile_is_linear_interpolation():
    assert report.percentile([], 50) is None
    assert report.percentile([3.0], 99) == 3.0
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted 1..4: rank p/100 * 3
    assert report.percentile(xs, 50) == pytest.approx(2.5)
    assert report.percentile(xs, 90) == pytest.approx(3.7)
    assert report.percentile(xs, 0) == 1.0 and report.percentile(xs, 100) == 4.0


def test_synthetic_workload_is_deterministic_and_distinct():
    a = workload.synthetic(3, 2, 64, 48, 8, seed=7)
    b = workload.synthetic(3, 2, 64, 48, 8, seed=7)
    c = workload.synthetic(3, 2, 64, 48, 8, seed=8)
    assert [r.images for r in a] == [r.images for r in b]
    assert a[0].images != c[0].images
    assert len({u for r in a for u in r.images}) == 6
    assert a[0].images[0].startswith("data:image/png;base64,")
    assert workload.arrival_offsets(4, float("inf"), 0) == [0.0] * 4
    poisson = workload.arrival_offsets(200, 10.0, 3)
    assert poisson == workload.arrival_offsets(200, 10.0, 3)
    assert 10 < poisson[-1] < 30  # ~ 199 gaps of mean 0.1 s


def _exposition(kept: float, seen: float, freed: float, ratios: dict) -> str:
    """Real prometheus_client output for the docs/metrics.md names."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    reg = CollectorRegistry()
    labels = ["model_name", "method"]
    Counter("kvsparse_prompt_tokens_kept", "", labels, registry=reg).labels("m", "zipvl").inc(kept)
    Counter("kvsparse_prompt_tokens_seen", "", labels, registry=reg).labels("m", "zipvl").inc(seen)
    Counter("kvsparse_kv_blocks_freed", "", labels, registry=reg).labels("m", "zipvl").inc(freed)
    h = Histogram("kvsparse_kept_ratio", "", labels + ["layer"], registry=reg)
    for layer, values in ratios.items():
        for v in values:
            h.labels("m", "zipvl", layer).observe(v)
    Gauge("vllm:kv_cache_usage_perc", "", ["engine"], registry=reg).labels("0").set(0.25)
    return generate_latest(reg).decode()


def test_server_summary_from_metric_deltas_and_absence():
    before = metrics_scrape.parse(_exposition(10, 20, 1, {"0": [0.5], "1": [1.0]}))
    after = metrics_scrape.parse(_exposition(40, 80, 5, {"0": [0.5, 0.3, 0.1],
                                                         "1": [1.0, 0.8], "10": [0.6]}))
    s = metrics_scrape.server_summary(before, after, [(0.0, 0.0), (0.1, 0.5), (0.2, 0.1)])
    assert s["kept_ratio_mean"] == pytest.approx(30 / 60)
    assert s["kept_ratio_per_layer"] == pytest.approx({"0": 0.2, "1": 0.8, "10": 0.6})
    assert list(s["kept_ratio_per_layer"]) == ["0", "1", "10"]  # numeric layer order
    assert s["kv_blocks_freed"] == 4
    assert s["kv_usage_max"] == 0.5 and s["kv_usage_mean"] == pytest.approx(0.2)
    dense = metrics_scrape.parse('vllm:kv_cache_usage_perc{engine="0"} 0.0\n')
    s = metrics_scrape.server_summary(dense, dense, [])
    assert s["kept_ratio_mean"] is None and s["kept_ratio_per_layer"] is None
    assert s["kv_blocks_freed"] is None and s["kv_usage_max"] is None


def _synthetic_endpoints() -> dict:
    def rec(i, ttft, ok=True):
        return {"index": i, "ok": ok, "error": None if ok else "ConnectError: refused",
                "ttft_s": ttft if ok else None, "e2e_s": 0.5, "tpot_s": 0.01 if ok else None,
                "itl_s": [0.01, 0.012] if ok else [], "prompt_tokens": 300 if ok else None,
                "output_tokens": 3 if ok else 0}
    eps = {}
    for name, base, kept in (("dense", 0.2, None), ("zipvl", 0.1, {"0": 0.6, "1": 0.4})):
        records = [rec(i, base + 0.01 * i) for i in range(5)]
        eps[name] = {"url": "http://x", "model": "m", "requests": records,
                     "summary": report.summarize(records, 2.0),
                     "server": {"kept_ratio_per_layer": kept}}
    records = [rec(i, 0, ok=False) for i in range(5)]
    eps["down"] = {"url": "http://y", "model": None, "requests": records,
                   "summary": report.summarize(records, None), "server": {}}
    return eps


def test_plot_axes_and_empty_plots():
    eps = _synthetic_endpoints()
    fig = plots.ttft(eps)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "time to first token (ms)"
    assert ax.get_ylabel() == "fraction of requests"
    assert ax.get_title().startswith("TTFT distribution")
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["dense", "zipvl"]
    fig = plots.throughput(eps)
    assert [(a.get_xlabel(), a.get_ylabel()) for a in fig.axes] == [
        ("endpoint", "output tokens/s"), ("endpoint", "requests/s")]
    assert [b.get_height() for b in fig.axes[0].patches] == pytest.approx([7.5, 7.5, 0.0])
    fig = plots.kept_ratio_per_layer(eps)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_title()) == ("layer", "ZipVL kept ratio per layer")
    assert ax.get_ylabel().startswith("mean kept ratio")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]
    assert [b.get_height() for b in ax.patches] == pytest.approx([0.6, 0.4])
    for ep in eps.values():
        ep["server"] = {}
    texts = [t.get_text() for t in plots.kept_ratio_per_layer(eps).axes[0].texts]
    assert "no kvsparse metrics" in texts
    eps = {"down": eps["down"]}
    assert "no successful requests" in [t.get_text() for t in plots.ttft(eps).axes[0].texts]


def test_markdown_ratios_against_dense():
    eps = _synthetic_endpoints()
    for ep in eps.values():
        ep["discovery_error"] = None
    md = report.markdown({"config": {"baseline": "dense", "command_line": "vllm-kvsparse bench",
                                     "workload_description": "w", "concurrency": 2,
                                     "request_rate": "inf", "seed": 0}, "endpoints": eps})
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header == "| metric | dense | zipvl | down | zipvl/dense | down/dense |"
    ttft = next(line for line in md.splitlines() if line.startswith("| TTFT p50"))
    assert ttft.split("|")[2:6] == [" 220.0 ", " 120.0 ", " – ", " 0.545 "]


@pytest.mark.parametrize("flag, needle", [
    (["--concurrency", "0"], "argument --concurrency: '0' is invalid; valid range is integers >= 1"),
    (["--request-rate", "-2"], "argument --request-rate: '-2' is invalid; valid range is numbers > 0"),
    (["--image-size", "8x8"], "argument --image-size: '8x8' is invalid; valid values are WIDTHxHEIGHT"),
    (["--endpoint", "nourl"], "argument --endpoint: 'nourl' is invalid; valid values are NAME=URL"),
])
def test_bad_flag_values_are_one_line_errors(flag, needle, tmp_path):
    proc = subprocess.run([str(BIN / "vllm-kvsparse"), "bench", "--endpoint",
                           "a=http://127.0.0.1:1", *flag, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def _png_ok(path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert img.width > 200 and img.height > 150
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or [0, 0]) > 1


def test_bench_end_to_end_live_and_down_endpoint(tiny_model, tmp_path):
    out = tmp_path / "out"
    with VllmServer(tiny_model, ZIPVL, tmp_path / "srv") as srv:
        proc = subprocess.run(
            [str(BIN / "vllm-kvsparse"), "bench", "--endpoint", f"zipvl={srv.url}",
             "--endpoint", "down=http://127.0.0.1:1", "--num-requests", "6",
             "--concurrency", "2", "--images-per-prompt", "1", "--image-size", "224x224",
             "--max-tokens", "8", "--seed", "3", "--out", str(out)],
            capture_output=True, text=True, timeout=300)
        metrics_text = requests.get(srv.url + "/metrics", timeout=10).text
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert "--endpoint" in cfg["command_line"] and "zipvl=" in cfg["command_line"]
    assert cfg["seed"] == 3 and cfg["num_requests"] == 6 and cfg["image_size"] == [224, 224]
    live, down = res["endpoints"]["zipvl"], res["endpoints"]["down"]

    s = live["summary"]
    assert (s["successes"], s["failures"], s["requests"]) == (6, 0, 6)
    assert live["model"] == tiny_model and live["discovery_error"] is None
    for key in ("p50", "p90", "p99"):
        assert s["ttft_ms"][key] > 0 and s["e2e_ms"][key] >= s["ttft_ms"][key]
    assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"]
    assert 6 <= s["output_tokens"] <= 6 * 8
    assert s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0
    assert s["prompt_tokens"] > 6 * 64  # each 224x224 image is 64 placeholder tokens
    assert all(r["ok"] and r["ttft_s"] > 0 and r["prompt_tokens"] for r in live["requests"])
    assert sorted(r["index"] for r in live["requests"]) == list(range(6))

    server = live["server"]
    assert server["metrics_error"] is None
    assert server["kv_usage_samples"] >= 1 and 0 <= server["kv_usage_max"] <= 1
    if "kvsparse_prompt_tokens_seen_total" in metrics_text:  # plugin metrics implemented
        assert 0 < server["kept_ratio_mean"] <= 1
        assert server["kept_ratio_per_layer"] and all(
            0 < v <= 1 for v in server["kept_ratio_per_layer"].values())
    else:
        assert server["kept_ratio_mean"] is None and server["kept_ratio_per_layer"] is None

    d = down["summary"]
    assert (d["successes"], d["failures"]) == (0, 6)
    assert down["discovery_error"] and "ConnectError" in down["discovery_error"]
    assert all(not r["ok"] and r["error"] for r in down["requests"])
    assert down["server"]["kept_ratio_mean"] is None and down["server"]["metrics_error"]
    assert d["ttft_ms"]["p50"] is None and d["output_tokens_per_s"] is None

    md = (out / "results.md").read_text()
    assert "| metric | zipvl | down | down/zipvl |" in md
    assert "| successes / requests | 6 / 6 | 0 / 6 |" in md
    assert "ConnectError" in md
    for name in ("ttft.png", "throughput.png", "kept_ratio_per_layer.png"):
        _png_ok(out / name)
