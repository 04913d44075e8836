"""The `vllm-kvsparse` command.

    vllm-kvsparse tiny-model OUT_DIR [options]   build the embedded tiny Qwen2-VL model
    vllm-kvsparse bench --endpoint NAME=URL ...  compare endpoints (dense vs zipvl), docs/bench.md
    vllm-kvsparse eval --endpoint NAME=URL ...   accuracy and EffiVLM-Bench metrics, docs/eval.md
    vllm-kvsparse train-tiny OUT_DIR             train the tiny model on the synthetic suite
"""

from __future__ import annotations

import argparse
import sys
import time


def _tiny_model(args: argparse.Namespace) -> int:
    from vllm_kvsparse import tiny_model

    try:
        spec = tiny_model.spec_from_args(args)
        spec.validate()
    except ValueError as e:
        print(f"vllm-kvsparse tiny-model: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    path = tiny_model.build(args.out_dir, spec)
    print(f"tiny Qwen2-VL ({spec.layers} layers, hidden {spec.hidden_size}, head_dim "
          f"{spec.head_dim}) written to {path} in {time.perf_counter() - t0:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-kvsparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from vllm_kvsparse import tiny_model

    p = sub.add_parser("tiny-model", help="build the embedded tiny Qwen2-VL model directory")
    tiny_model.add_arguments(p)
    p.set_defaults(func=_tiny_model)
    from vllm_kvsparse.bench import cli as bench_cli

    bench_cli.add_parser(sub)
    from vllm_kvsparse.evaluation import cli as eval_cli
    from vllm_kvsparse.evaluation import train as eval_train

    eval_cli.add_parser(sub)
    eval_train.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
