"""deploy/grafana/kvsparse-dashboard.json: a Grafana dashboard whose every PromQL expression
parses (superficially) and names only metrics from docs/metrics.md."""

from __future__ import annotations

import json
import re

import pytest
from deploy_helpers import DEPLOY, ROOT

DASHBOARD = DEPLOY / "grafana" / "kvsparse-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

PROMQL_FUNCTIONS = {
    "abs", "absent", "avg", "avg_over_time", "ceil", "clamp", "clamp_max", "clamp_min", "count",
    "count_over_time", "delta", "deriv", "floor", "histogram_quantile", "idelta", "increase",
    "irate", "label_replace", "max", "max_over_time", "min", "min_over_time", "quantile",
    "rate", "round", "scalar", "sort", "sort_desc", "sum", "sum_over_time", "topk", "bottomk",
    "vector", "time", "histogram_avg", "histogram_count", "histogram_sum",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan"}


def documented_metrics() -> set[str]:
    """Metric names as exposed, from docs/metrics.md (histograms with their series suffixes)."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    names = set(re.findall(r"`((?:vllm:|kvsparse_)[a-z0-9_:]+)`", text))
    histograms = {n for n in names if n.endswith("_seconds")}   # vLLM's latency histograms
    histograms |= set(re.findall(r"^\|\s*`(kvsparse_[a-z0-9_]+)`[^|]*\|\s*histogram\s*\|", text,
                                 re.M))
    return names | {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def targets(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in all_panels(dash) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression; fails on an unknown function or keyword."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)            # string literals
    e = re.sub(r"\{[^{}]*\}", "", e)                         # label matchers
    e = re.sub(r"\[[^\[\]]*\]", "", e)                       # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word, rest = m.group(0), e[m.end():].lstrip()
        if re.fullmatch(r"\d", e[m.start() - 1:m.start()] or " "):
            continue                                         # part of a number like 1e3
        if rest.startswith("("):
            assert word in PROMQL_FUNCTIONS, f"unknown PromQL function {word!r} in {expr}"
        elif word not in KEYWORDS:
            names.add(word)
    return names


def balanced(expr: str) -> bool:
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def test_is_a_provisionable_dashboard_with_a_datasource_variable():
    dash = load()
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"]
    assert "__inputs" not in dash   # import-only placeholders break file/sidecar provisioning
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model_name"]
    assert model["type"] == "query" and model["datasource"] == DS
    m = re.fullmatch(r"label_values\(([a-z_:]+), model_name\)", model["definition"])
    assert m and m.group(1) in documented_metrics(), model["definition"]
    assert model["query"]["query"] == model["definition"]
    panels = [p for p in all_panels(dash) if p["type"] != "row"]
    assert len(panels) >= 12
    for p in panels:
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS and t["refId"] and t["expr"], p["title"]
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap():
    cells = {}
    for p in all_panels(load()):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells[(x, y)])
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("title,expr", targets(load()))
def test_every_expression_parses_and_names_only_documented_metrics(title, expr):
    assert balanced(expr), f"{title}: unbalanced brackets in {expr}"
    names = metric_names(expr)
    assert names, f"{title}: no metric in {expr}"
    unknown = names - documented_metrics()
    assert not unknown, f"{title}: {sorted(unknown)} not in docs/metrics.md"
    assert 'model_name=~"$model_name"' in expr, f"{title}: not filtered by the model variable"


def test_metric_name_extraction_is_not_vacuous():
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(vllm:x_bucket{a="b(c)"}[5m])))'
                        ) == {"vllm:x_bucket"}
    assert metric_names("sum by (layer) (rate(a_sum[1m])) / sum(rate(b_count[1m])) * 1e3") == \
        {"a_sum", "b_count"}
    with pytest.raises(AssertionError):
        metric_names("made_up_function(x)")
    assert not balanced("sum(rate(x[5m])")


REQUIRED = {
    # what the issue asks to see -> a pattern one of the expressions must contain
    "TTFT p50": r"histogram_quantile\(0\.5, .*vllm:time_to_first_token_seconds_bucket",
    "TTFT p90": r"histogram_quantile\(0\.9, .*vllm:time_to_first_token_seconds_bucket",
    "TTFT p99": r"histogram_quantile\(0\.99, .*vllm:time_to_first_token_seconds_bucket",
    "inter-token latency": r"vllm:inter_token_latency_seconds_bucket",
    "generation throughput": r"rate\(vllm:generation_tokens_total",
    "requests running": r"vllm:num_requests_running",
    "requests waiting": r"vllm:num_requests_waiting",
    "KV cache usage": r"vllm:kv_cache_usage_perc",
    "mean kept ratio": r"kvsparse_prompt_tokens_kept_total.*/.*kvsparse_prompt_tokens_seen_total",
    "kept ratio per layer": r"sum by \(layer\) \(rate\(kvsparse_kept_ratio_sum.*/.*"
                            r"sum by \(layer\) \(rate\(kvsparse_kept_ratio_count",
    "blocks freed": r"rate\(kvsparse_kv_blocks_freed_total",
    "probe time": r"rate\(kvsparse_probe_seconds_total",
    "FLOPs saved": r"rate\(kvsparse_attention_flops_saved_total",
    "dense fallbacks by reason": r"sum by \(reason\) \(rate\(kvsparse_dense_fallback_requests_total",
}


@pytest.mark.parametrize("what", REQUIRED)
def test_required_panel_is_present(what):
    assert any(re.search(REQUIRED[what], e) for _, e in targets(load())), what
