"""Accuracy of every `--kv-sparsity` method at several budgets on one model: the method x budget
table of docs/eval.md, each configuration a real `vllm serve`, scored by `vllm-kvsparse eval`.

    python benchmarks/eval_matrix.py --out benchmarks/results/eval_matrix     # ~60 min on 2 cores
    python benchmarks/eval_matrix.py --quick --out /tmp/em                    # smoke run
    python benchmarks/eval_matrix.py --merge RUN_DIR RUN_DIR ... --out DIR     # one table

--merge joins the matrix.json of several runs on the same model and dataset (a run cut short,
then the rest) into one table, configurations in the plugin's method order; each row keeps
the ratios measured against the dense server of its own group.

Configurations: dense (`--kv-sparsity none`); zipvl at each --taus, once per --zipvl-scopes
(scope "all", the paper's, may drop question text; "visual" drops image tokens only); every
other method the plugin offers at each --budgets (its `budget` key, the method's other
defaults). All with `min_prompt_len: 0`, so every prompt is compressed. They are served --parallel at a time next
to a dense server, and one `vllm-kvsparse eval` run per group scores dense first (the reference:
loyalty OL and the TTFT ratio are measured side by side with it, in the same run) and then the
group's configurations, so every ratio in the table compares servers that ran at the same time
on the same machine. Output: OUT/matrix.json (every group's eval.json summary, the command, the
machine), OUT/matrix.md (the table), OUT/group-K/ (each eval's own files).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vllm_kvsparse.bench.server import start_all  # noqa: E402
from vllm_kvsparse.policies import METHOD_NAMES  # noqa: E402
from vllm_kvsparse.policies.zipvl import SCOPES as ZIPVL_SCOPES  # noqa: E402

MODEL = common.REPO / "tests" / "fixtures" / "tiny-qwen2vl-vqa"
SERVE = ["--dtype", "bfloat16", "--max-model-len", "8192", "--max-num-seqs", "4",
         "--kv-cache-memory-bytes", str(256 << 20),
         "--limit-mm-per-prompt", '{"image": 4, "video": 0}']


def configurations(methods: list[str], budgets: list[float], taus: list[float],
                   fastv_k: int = 2, zipvl_scopes: tuple[str, ...] = ("all",)) -> dict:
    """name -> the `vllm serve` flags of that configuration (dense not included). Names have
    no "=": they are eval's endpoint names (NAME=URL). zipvl runs once per tau and scope:
    "all" (the paper's, and the default: question text may be dropped too) and "visual" (only
    image tokens, like every other method's budget)."""
    out = {}
    for m in methods:
        if m == "zipvl":
            for scope in zipvl_scopes:
                for tau in taus:
                    name = f"zipvl tau {tau}" + ("" if scope == "all" else f" scope {scope}")
                    out[name] = ("zipvl", {"tau": tau} if scope == "all"
                                 else {"tau": tau, "scope": scope})
        else:
            for b in budgets:
                extra = {"k": fastv_k} if m == "fastv" else {}
                out[f"{m} budget {b}"] = (m, {"budget": b, **extra})
    return {name: ["--kv-sparsity", m, "--kv-sparsity-config",
                   json.dumps({**opts, "min_prompt_len": 0})]
            for name, (m, opts) in out.items()}


def run_group(k: int, group: dict, args, work: Path) -> dict:
    """Dense + the group's configurations served at once; one eval run; its eval.json."""
    out = Path(args.out) / f"group-{k}"
    specs = {"dense": (["--kv-sparsity", "none"], work / f"g{k}-dense")}
    specs.update({name: (flags, work / f"g{k}-{i}")
                  for i, (name, flags) in enumerate(group.items())})
    with ExitStack() as stack:
        servers = start_all(stack, {n: common.serve_process(args.model, SERVE + f, w, 600)
                                    for n, (f, w) in specs.items()})
        cmd = [str(common.BIN / "vllm-kvsparse"), "eval", "--dataset", args.dataset,
               "--limit", str(args.limit), "--max-tokens", str(args.max_tokens),
               "--out", str(out), "--no-progress"]
        for name, s in servers.items():
            cmd += ["--endpoint", f"{name}={s.url}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print(f"group {k}: eval {time.perf_counter() - t0:.0f} s, exit {proc.returncode}",
              flush=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
        if not (out / "eval.json").is_file():   # a dataset or argument error: nothing scored
            raise SystemExit(f"eval_matrix: group {k}: vllm-kvsparse eval wrote no results")
    return json.loads((out / "eval.json").read_text())


def row(name: str, ep: dict, flags: list[str] | None) -> dict:
    o = ep["overall"]
    return {"config": name, "flags": flags,
            "accuracy": {t: v["accuracy_relaxed"] for t, v in ep["tasks"].items()},
            "accuracy_all": o["accuracy_relaxed"], "failures": o["failures"],
            "OP": o["OP"], "OL": o["OL"], "kept_ratio": o["kept_ratio_mean"],
            "kv_blocks_freed": o["kv_blocks_freed"], "ttft_ratio": o["ttft_ratio"],
            "ttft_mean_s": o["ttft_mean_s"]}


def markdown(rows: list[dict], tasks: list[str]) -> str:
    head = ["configuration", *tasks, "all", "OL (loyalty)", "kept ratio", "TTFT ratio",
            "blocks freed", "failures"]
    return common.markdown_table(head, [
        [r["config"], *(r["accuracy"].get(t) for t in tasks), r["accuracy_all"], r["OL"],
         r["kept_ratio"], r["ttft_ratio"], r["kv_blocks_freed"], r["failures"]] for r in rows])


def merge(run_dirs: list[str], out: Path, argv: list[str]) -> str:
    """One matrix.json/matrix.md from several runs' matrix.json (same model and dataset)."""
    runs = [json.loads((Path(d) / "matrix.json").read_text()) for d in run_dirs]
    for r, d in zip(runs[1:], run_dirs[1:]):
        for key in ("dataset", "limit"):
            if r[key] != runs[0][key]:
                raise SystemExit(f"eval_matrix --merge: {d} has {key} {r[key]!r}, "
                                 f"{run_dirs[0]} has {runs[0][key]!r}")
    order = {m: i for i, m in enumerate(METHOD_NAMES)}

    def method_then_setting(row):   # flags: --kv-sparsity METHOD --kv-sparsity-config JSON
        opts = json.loads(row["flags"][3])
        return (order.get(row["flags"][1], len(order)), opts.get("scope", "all"),
                opts.get("tau", 0), opts.get("budget", 0))

    rows = {r["config"]: r for run in runs for r in run["rows"]}   # a later run wins
    rows = sorted(rows.values(), key=method_then_setting)
    tasks = list(dict.fromkeys(t for r in rows for t in r["accuracy"]))
    table = markdown([runs[0]["dense"][0], *rows], tasks)
    common.write_json(out / "matrix.json", {
        **common.meta(argv), "merged_from": [{"dir": d, "command": r["command"],
                                              "date": r["date"], "machine": r["machine"]}
                                             for d, r in zip(run_dirs, runs)],
        "model": runs[0]["model"], "dataset": runs[0]["dataset"], "limit": runs[0]["limit"],
        "dense": [d for r in runs for d in r["dense"]], "rows": rows})
    (out / "matrix.md").write_text(table + "\n")
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    # the tasks the committed model answers (tests/fixtures/tiny-qwen2vl-vqa/README.md)
    ap.add_argument("--dataset", default="synthetic:color,position,grid,count,which_picture,"
                    "long_color,long4k_color")
    ap.add_argument("--limit", type=int, default=8, help="samples per task")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--methods", default=",".join(METHOD_NAMES))
    ap.add_argument("--budgets", default="0.01,0.1,0.4")
    ap.add_argument("--taus", default="0.9,0.95,0.975,0.99")
    ap.add_argument("--zipvl-scopes", default="all,visual",
                    help="zipvl's scope per run of --taus: all (the paper's: text may be "
                         "dropped) and/or visual (image tokens only, as the other methods)")
    ap.add_argument("--fastv-k", type=int, default=2,
                    help="FastV's k (default 2, FastV's own: layers 0-1 dense, layer 1 "
                         "scores, layers 2-4 of the committed 5-layer model attend over the "
                         "kept tokens; the 3-layer model's table used k=1)")
    ap.add_argument("--parallel", type=int, default=3, help="configurations served at once")
    ap.add_argument("--quick", action="store_true",
                    help="zipvl 0.975 and random 0.1 on 4 samples of color (smoke run)")
    ap.add_argument("--work-dir", default="/tmp/kvsparse-bench/eval_matrix")
    ap.add_argument("--merge", nargs="+", metavar="RUN_DIR",
                    help="join these runs' matrix.json into one table (serves nothing)")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args()
    if args.merge:
        print(merge(args.merge, Path(args.out), sys.argv))
        return 0
    if args.quick:
        args.methods, args.budgets, args.taus = "zipvl,random", "0.1", "0.975"
        args.zipvl_scopes = "all"
        args.dataset, args.limit = "synthetic:color", 4
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; valid: {', '.join(METHOD_NAMES)}")
    scopes = tuple(s.strip() for s in args.zipvl_scopes.split(","))
    if not set(scopes) <= set(ZIPVL_SCOPES):
        ap.error(f"--zipvl-scopes {args.zipvl_scopes!r}: valid scopes are "
                 f"{', '.join(ZIPVL_SCOPES)}")
    configs = configurations(methods, [float(b) for b in args.budgets.split(",")],
                             [float(t) for t in args.taus.split(",")], args.fastv_k,
                             scopes)
    names = list(configs)
    groups = [{n: configs[n] for n in names[i:i + args.parallel]}
              for i in range(0, len(names), args.parallel)]
    meta = common.meta(sys.argv)
    print(common.cpu_line(meta["machine"]), flush=True)
    work = Path(args.work_dir)
    out = Path(args.out)
    rows, dense_rows, tasks = [], [], []
    for k, group in enumerate(groups):
        res = run_group(k, group, args, work)
        eps = res["endpoints"]
        tasks = list(dict.fromkeys([*tasks, *eps["dense"]["tasks"]]))
        dense_rows.append(row(f"dense (group {k})", eps["dense"], ["--kv-sparsity", "none"]))
        rows += [row(name, eps[name], configs[name]) for name in group]
        # written after every group, so a run cut short keeps what it measured
        table = markdown(dense_rows[:1] + rows, tasks)
        common.write_json(out / "matrix.json", {
            **meta, "model": args.model, "dataset": args.dataset, "limit": args.limit,
            "max_tokens": args.max_tokens, "groups_done": k + 1, "groups": len(groups),
            "dense": dense_rows, "rows": rows})
        (out / "matrix.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
