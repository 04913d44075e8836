"""benchmarks/chunked_prefill.py without servers: arguments, the per-mode `vllm serve` flags,
the ITL split around the long prompt's prefill window, and the tables rendered from fake
measurements (the real run needs three `vllm serve` processes: see docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_benchmark

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "chunked_prefill.py"


@pytest.fixture(scope="module")
def cp():
    return load_benchmark("chunked_prefill")


def test_help_runs():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout and "--chunk-tokens" in r.stdout


def test_quick_defaults_and_mode_flags(cp):
    a = cp.parse_args(["--quick", "--repeats", "2"])
    assert (a.long_tokens, a.long_images, a.max_model_len, a.repeats) == (4096, 2, 5120, 2)
    full = cp.parse_args([])
    assert (full.long_tokens, full.max_model_len, full.chunk_tokens) == (16384, 20480, 2048)
    none = cp.server_args("none", full, 1 << 26)
    one = cp.server_args("zipvl-one-step", full, 1 << 26)
    chunked = cp.server_args("zipvl-chunked", full, 1 << 26)
    assert none[-2:] == chunked[-2:] == ["--max-num-batched-tokens", "2048"]
    assert one[-3:] == ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "20480"]
    assert json.loads(chunked[chunked.index("--kv-sparsity-config") + 1]) == {"tau": 0.975}
    assert "--no-enable-chunked-prefill" not in none + chunked
    with pytest.raises(SystemExit):
        cp.parse_args(["--image-size", "1000"])        # not a multiple of 28


def test_itl_split_and_percentiles(cp):
    shorts = [{"token_s": [0.0, 0.1, 0.2, 2.2, 2.3], "token_n": [1, 1, 1, 3, 1]},
              {"token_s": [0.05, 0.15, 2.25], "token_n": [1, 1, 2]}]
    s = cp.itl_split(shorts, (0.5, 2.0))
    assert sorted(round(x, 3) for x in s["during"]) == [2.0, 2.1]
    assert len(s["overall"]) == 6 and s["shorts_decoding_past_window"] == 2
    assert s["tokens_during"] == 5 and s["max_tokens_per_chunk_during"] == 3
    assert cp.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert cp.percentile([], 99) is None
    assert cp.stats_ms([0.01, 0.02])["max_ms"] == pytest.approx(20.0)


def _round(ttft, kept):
    return {"long": {"prompt_tokens": 16390, "ttft_s": ttft}, "shorts": [{}, {}],
            "long_engine": {"queue_s": 0.7, "prefill_s": ttft - 0.9},
            "kept_ratio_per_layer": None if kept is None else {"0": kept / 2, "1": kept * 2},
            "itl_during_engine_prefill_s": [0.2],
            "itl_during_s": [0.2, 0.3], "itl_overall_s": [0.01, 0.2, 0.3],
            "shorts_decoding_past_window": 2, "tokens_during": 3,
            "max_tokens_per_chunk_during": 2, "kept_ratio_mean": kept, "errors": []}


def _chat(mode, selected):
    turns = [{"turn": 1, "prompt_tokens": 300, "hits": 0, "queries": 0 if selected else 300,
              "selected": selected, "hit_rate": None if selected else 0.0,
              "hits_per_prompt_token": 0.0, "error": None}]
    return {"chat": "large", "image_size": 1008, "image_tokens": 1296, "turns": turns,
            "total": {"hits": 0, "queries": turns[0]["queries"], "prompt_tokens": 300,
                      "hit_rate": None, "hits_per_prompt_token": 0.0,
                      "selected_turns": None if selected is None else int(selected)}}


def test_summary_and_tables_from_fake_measurements(cp):
    report = {"derived": {"min_prompt_len": 1024}, "modes": {
        "none": {"serve_args": ["--max-num-batched-tokens", "2048"],
                 "server": {"chunked_prefill": True}, "rounds": [_round(9.0, None)],
                 "chats": [_chat("none", None)]},
        "zipvl-one-step": {"serve_args": ["--max-num-batched-tokens", "20480"],
                           "server": {"chunked_prefill": False},
                           "rounds": [_round(3.0, 0.2), _round(5.0, 0.4)]},
        "zipvl-chunked": {"serve_args": [], "server": {"chunked_prefill": True},
                          "rounds": [_round(8.0, 0.3)], "chats": [_chat("zipvl", True)]},
        "broken": {"serve_args": [], "error": "RuntimeError: vllm serve exited with 1"}}}
    cp.summarize(report)
    itl = report["summary"]["itl"]
    assert itl["zipvl-one-step"]["long_ttft_s"] == 4.0
    assert itl["zipvl-one-step"]["kept_ratio_mean"] == pytest.approx(0.3)
    assert itl["zipvl-one-step"]["itl_during_prefill"]["n"] == 4
    text = cp.render(report)
    assert "| zipvl-one-step | off | 20480 | 16390 | 4 | 0.7 | 3.1 | 0.3 | 0.15 / 0.60 | - |" \
        in text
    assert "| zipvl-one-step | 250 / 300 / 300 | 4 (6 tok, <= 2/chunk) | 200 / 200 / 200 | " \
        "200 / 300 / 300 | 6 | 2/2 |" in text
    assert "| zipvl-chunked | on | vLLM default |" in text
    assert "| none | large (1008px, 1296 img tok) | 1 | 300 | - | 300 | 0 | 0 | 0 | - |" in text
    assert "| zipvl-chunked | large (1008px, 1296 img tok) | 1 | 300 | yes | 0 | 0 | - |" in text
    assert "broken: FAILED: RuntimeError" in text
    json.dumps(report)


def test_footer_names_the_load_and_the_cpu(cp):
    report = {"wall_seconds": 90, "meta": {"machine": {
        "cpu_model": "AMD EPYC", "cpu_count": 2, "cpu_isa": "AVX2", "cpu_flags": ["avx2"]}},
        "modes": {"none": {"loadavg_before": [2.5, 2.0, 1.0], "other_busy_processes_before": [],
                           "other_busy_processes_during": ["123 python -m pytest"]}}}
    text = cp.footer(report)
    assert "none: loadavg before 2.50 2.00 1.00; 1 other busy processes" in text
    assert "timings contended" in text and "wall time 1.5 min" in text
    assert "AMD EPYC x 2, ISA AVX2" in text
