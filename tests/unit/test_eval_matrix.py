"""benchmarks/eval_matrix.py without servers: every method the plugin offers gets a row per
budget (zipvl one per tau), each row's flags are a configuration the plugin accepts, and the
table renders every configuration (the real run serves each one: docs/eval.md)."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def em():
    return load_benchmark("eval_matrix")


def test_every_method_and_budget_is_a_valid_configuration(em):
    from vllm_kvsparse.config import SparsityConfig
    from vllm_kvsparse.policies import METHOD_NAMES

    configs = em.configurations(list(METHOD_NAMES), [0.01, 0.1, 0.4], [0.9, 0.95, 0.975, 0.99],
                                zipvl_scopes=("all", "visual"))
    assert len(configs) == 3 * (len(METHOD_NAMES) - 1) + 2 * 4
    seen = set()
    for name, flags in configs.items():
        assert flags[0] == "--kv-sparsity" and flags[2] == "--kv-sparsity-config"
        options = json.loads(flags[3])
        cfg = SparsityConfig.from_options(flags[1], options)   # raises on a bad configuration
        assert cfg.min_prompt_len == 0
        seen.add(flags[1])
        key = "tau" if flags[1] == "zipvl" else "budget"
        scope = f" scope {options['scope']}" if "scope" in options else ""
        assert name == f"{flags[1]} {key} {options[key]}{scope}" and "=" not in name
        assert cfg.policy.scope == "visual" if scope else True
    assert seen == set(METHOD_NAMES)


def test_table_has_a_row_per_configuration(em):
    rows = [{"config": c, "accuracy": {"color": a}, "accuracy_all": a, "OL": a, "kept_ratio": k,
             "ttft_ratio": 1.1, "kv_blocks_freed": 3, "failures": 0}
            for c, a, k in [("dense", 1.0, None), ("random budget 0.1", 0.4, 0.3)]]
    table = em.markdown(rows, ["color"])
    lines = table.splitlines()
    assert lines[0].startswith("| configuration | color | all | OL (loyalty) | kept ratio")
    assert lines[2].startswith("| dense | 1 | 1 | 1 | - |")
    assert lines[3].startswith("| random budget 0.1 | 0.4 | 0.4 | 0.4 | 0.3 |")


def test_unknown_method_is_one_clear_error(em, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["eval_matrix.py", "--methods", "zipvl,bogus", "--out", "x"])
    with pytest.raises(SystemExit) as e:
        em.main()
    assert e.value.code == 2
    assert "unknown method(s) ['bogus']; valid: zipvl" in capsys.readouterr().err


def test_bad_zipvl_scope_is_one_clear_error(em, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["eval_matrix.py", "--zipvl-scopes", "all,text", "--out", "x"])
    with pytest.raises(SystemExit) as e:
        em.main()
    assert e.value.code == 2
    assert "--zipvl-scopes 'all,text': valid scopes are all, visual" in capsys.readouterr().err


def test_merge_joins_runs_in_method_order(em, tmp_path):
    def run(name, rows, limit=8):
        d = tmp_path / name
        d.mkdir()
        dense = {"config": "dense (group 0)", "flags": ["--kv-sparsity", "none"],
                 "accuracy": {"color": 1.0}, "accuracy_all": 1.0, "OL": 1.0,
                 "kept_ratio": None, "ttft_ratio": 1.0, "kv_blocks_freed": None, "failures": 0}
        (d / "matrix.json").write_text(json.dumps({
            "command": f"python eval_matrix.py {name}", "date": "d", "machine": {},
            "model": "m", "dataset": "synthetic:color", "limit": limit, "dense": [dense],
            "rows": [{"config": c, "flags": em.configurations([m], [b], [b])[c],
                      "accuracy": {"color": a}, "accuracy_all": a, "OL": a, "kept_ratio": b,
                      "ttft_ratio": 1.0, "kv_blocks_freed": 1, "failures": 0}
                     for c, m, b, a in rows]}))
        return str(d)

    first = run("a", [("snapkv budget 0.4", "snapkv", 0.4, 1.0),
                      ("snapkv budget 0.1", "snapkv", 0.1, 0.5)])
    rest = run("b", [("aircache budget 0.1", "aircache", 0.1, 0.75),
                     ("zipvl tau 0.9", "zipvl", 0.9, 1.0)])
    table = em.merge([first, rest], tmp_path / "all", ["eval_matrix.py"])
    names = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]]
    assert names == ["dense (group 0)", "zipvl tau 0.9", "snapkv budget 0.1",
                     "snapkv budget 0.4", "aircache budget 0.1"]
    merged = json.loads((tmp_path / "all" / "matrix.json").read_text())
    assert [m["dir"] for m in merged["merged_from"]] == [first, rest]
    assert len(merged["rows"]) == 4 and len(merged["dense"]) == 2
    other = run("c", [("zipvl tau 0.95", "zipvl", 0.95, 1.0)], limit=4)
    with pytest.raises(SystemExit, match="has limit 4"):
        em.merge([first, other], tmp_path / "bad", ["eval_matrix.py"])
