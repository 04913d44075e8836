"""Held-out accuracy of a `train-tiny` checkpoint on many samples, in transformers (no vLLM):
per task, the answer word's argmax after the teacher-forced lead-in (what greedy decoding
answers whenever the lead-in comes out right, as it does on a dense server), with the
confusions and, where the squares of a sample share one colour, the accuracy per colour.

    python benchmarks/tiny_model_accuracy.py --out /tmp/acc                       # committed model
    python benchmarks/tiny_model_accuracy.py --model DIR --tasks count,position --n 512 --out /tmp/acc

About 2 s per 128 short samples on 2 EPYC cores, so a training stage can be judged on 256
samples per task instead of train-tiny's 16 (one answer of 16 moves a task by 0.06, which is
more than the differences between stages). The served check stays `vllm-kvsparse eval`
against `vllm serve` (docs/eval.md); this one is for training. Output: a table and OUT/accuracy.json.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vllm_kvsparse.evaluation import synthetic  # noqa: E402
from vllm_kvsparse.evaluation.train import teacher_forced_answers  # noqa: E402

MODEL = common.REPO / "tests" / "fixtures" / "tiny-qwen2vl-vqa"
DEFAULT_TASKS = "color,position,count,which_picture,long_color,long4k_color"


def square_colour(sample) -> str | None:
    """The colour of the sample's squares when they all share one (None otherwise)."""
    import numpy as np

    found = set()
    for img in sample.pil_images():
        pixels = np.asarray(img).reshape(-1, 3)
        found |= {c for c, rgb in synthetic.COLORS.items() if (pixels == rgb).all(1).any()}
    return found.pop() if len(found) == 1 else None


def answer_words(model, processor, samples, batch_size: int = 16) -> list[str]:
    """Each sample's predicted answer word: the argmax at each of the expected word's tokens
    (a digit is two: a space and the digit), with the lead-in before it teacher-forced."""
    lead_in = processor.tokenizer.encode(synthetic.LEAD_IN)
    out = []
    for s, _, predicted in teacher_forced_answers(model, processor, samples, batch_size):
        word = processor.tokenizer.encode(f"{synthetic.LEAD_IN} {s.answers[-1]}")
        assert word[:len(lead_in)] == lead_in, "the lead-in tokenizes alone"
        out.append(processor.tokenizer.decode(predicted[len(lead_in):len(word)]).strip())
    return out


def evaluate(model, processor, task: str, n: int, seed: int) -> dict:
    samples = synthetic.generate([task], n, seed, "test")
    predicted = answer_words(model, processor, samples)
    errors = collections.Counter()
    per_colour = collections.defaultdict(lambda: [0, 0])   # colour -> [right, seen]
    for s, p in zip(samples, predicted):
        right = p == s.answers[-1]
        if not right:
            errors[f"{s.answers[-1]} -> {p}"] += 1
        colour = square_colour(s)
        if colour is not None:
            per_colour[colour][0] += right
            per_colour[colour][1] += 1
    return {"task": task, "n": n, "accuracy": (n - sum(errors.values())) / n,
            "errors": dict(errors.most_common()),
            "per_colour": {c: {"accuracy": r / t, "n": t} for c, (r, t) in
                           sorted(per_colour.items())}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--n", type=int, default=256, help="held-out samples per short task")
    ap.add_argument("--long-n", type=int, default=64, help="held-out samples per long task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tasks = synthetic.parse_tasks(args.tasks)

    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.model)
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.model,
                                                            dtype=torch.float32).eval()
    results = [evaluate(model, processor, t,
                        args.long_n if t in synthetic.LONG_TASKS else args.n, args.seed)
               for t in tasks]
    rows = [[r["task"], r["n"], round(r["accuracy"], 3),
             " ".join(f"{c} {v['accuracy']:.2f}" for c, v in r["per_colour"].items()) or "-",
             ", ".join(f"{k} x{v}" for k, v in list(r["errors"].items())[:3]) or "-"]
            for r in results]
    table = common.markdown_table(["task", "n", "accuracy", "per square colour",
                                   "most frequent errors"], rows)
    meta = common.meta(sys.argv)
    common.write_json(Path(args.out) / "accuracy.json",
                      {**meta, "model": args.model, "seed": args.seed, "results": results})
    print(common.cpu_line(meta["machine"]))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
