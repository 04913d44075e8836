"""`vllm-kvsparse train-tiny OUT_DIR`: train a tiny Qwen2-VL on the synthetic suite, on CPU.

The model starts as `tiny_model.build` makes it (same tokenizer, chat template, processor and
directory layout), is trained in float32 with AdamW and a warmup + cosine schedule on prompts
rendered exactly as vLLM renders an OpenAI chat request (the chat template, system prompt
included), with the loss on the answer and <|im_end|> only, and is saved in bfloat16: a
checkpoint `vllm serve` loads like any other. Deterministic given --seed and --threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict

from vllm_kvsparse.evaluation import synthetic
from vllm_kvsparse.evaluation.dataset import user_content

DEFAULT_MIX = "color:1,position:2,count:2,multi_image:2"


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, w = part.partition(":")
        if name.strip() not in synthetic.TASKS:
            raise ValueError(f"unknown task {name!r} in --mix; tasks: {', '.join(synthetic.TASKS)}")
        mix[name.strip()] = float(w or 1)
    return mix


def _batch(processor, samples, with_answer: bool = True):
    """Tokenised batch; labels are -100 except the answer and <|im_end|>."""
    import torch

    texts, images, n_answer = [], [], []
    for s in samples:
        imgs = s.pil_images()
        # The same content list `eval` sends, with {"type": "image"} for each image_url part:
        # the chat template renders both as <|vision_start|><|image_pad|><|vision_end|>.
        content = user_content(s.question, [{"type": "image"} for _ in imgs])
        prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                               add_generation_prompt=True, tokenize=False)
        if with_answer:
            answer = s.answers[0] + "<|im_end|>"
            n_answer.append(len(processor.tokenizer.encode(answer)))
            prompt += answer
        texts.append(prompt)
        images.extend(imgs)
    processor.tokenizer.padding_side = "right"
    enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    if with_answer:
        labels = torch.full_like(enc["input_ids"], -100)
        lengths = enc["attention_mask"].sum(1)
        for i, (n, k) in enumerate(zip(lengths.tolist(), n_answer)):
            labels[i, n - k:n] = enc["input_ids"][i, n - k:n]
        enc["labels"] = labels
    return enc


def teacher_forced_answers(model, processor, samples, batch_size: int = 8):
    """Per sample, teacher-forced: (sample, expected answer tokens (lead-in, word, <|im_end|>),
    the model's argmax at each of them)."""
    import torch

    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            enc = _batch(processor, chunk)
            labels = enc.pop("labels")
            predicted = model(**enc).logits.argmax(-1)
            for j, sample in enumerate(chunk):
                pos = (labels[j] != -100).nonzero()[:, 0]
                yield sample, labels[j, pos], predicted[j, pos - 1]


def answer_accuracy(model, processor, samples, batch_size: int = 8) -> float:
    """Teacher-forced: is every answer token (lead-in, word, <|im_end|>) the argmax."""
    import torch

    right = sum(int(torch.equal(predicted, expected)) for _, expected, predicted
                in teacher_forced_answers(model, processor, samples, batch_size))
    return right / max(len(samples), 1)


def train(out_dir: str, *, steps: int, batch_size: int, lr: float, warmup: int, mix: dict,
          seed: int, threads: int, spec=None, eval_every: int = 0, eval_n: int = 16,
          long_batch_size: int = 2, init: str | None = None, mixed_batches: bool = False,
          freeze_vision: bool = False, add_layer: list[int] | None = None,
          train_layers: list[int] | None = None, progress: bool = True, log=print) -> dict:
    import numpy as np
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from vllm_kvsparse import tiny_model

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    spec = spec or tiny_model.TinyModelSpec()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if init:   # continue from a checkpoint train-tiny wrote (its spec, not the flags)
            source = init
            for k, at in enumerate(add_layer or []):   # each grown layer its own draw
                source = tiny_model.add_layer(source, os.path.join(tmp, f"grown{k}"), at,
                                              seed + k)
            with open(os.path.join(source, "tiny_model_spec.json")) as f:
                spec = tiny_model.TinyModelSpec(**json.load(f))
            tmp = source
        else:
            tiny_model.build(tmp, _replace(spec, dtype="float32", seed=seed))
        model = Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(tmp)
        model.train()
        # The vision encoder's backward (full attention over 4,096 patches per 896-px image)
        # is most of a long prompt's step.
        if freeze_vision:
            model.model.visual.requires_grad_(False)
        if train_layers is not None:   # only these decoder layers learn; the rest keep
            model.requires_grad_(False)  # exactly what they answered before
            for i in train_layers:
                model.model.language_model.layers[i].requires_grad_(True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                weight_decay=0.01, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5
            * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
        tasks, weights = list(mix), np.array(list(mix.values()), dtype=float)
        rng = np.random.default_rng([seed, 7])
        counters = {t: 0 for t in tasks}
        held_out = {t: synthetic.generate([t], eval_n // 2 if t in synthetic.LONG_TASKS
                                          else eval_n, seed, "test") for t in tasks}
        history = []
        bar = _bar(steps, progress)
        stopped_at = None
        stop = _StopOnSignal()
        for step in range(steps):
            if stop.requested:
                stopped_at = step
                log(f"stopped by SIGINT/SIGTERM after {step} steps; saving the model")
                break
            task, batch = _draw_batch(rng, tasks, weights, counters, seed, batch_size,
                                      long_batch_size, mixed_batches)
            enc = _batch(processor, batch)
            loss = model(**enc).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            history.append({"step": step + 1, "task": task, "loss": round(loss.item(), 4)})
            bar.set_postfix(task=task, loss=f"{loss.item():.3f}")
            bar.update(1)
            if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
                model.eval()
                acc = {t: answer_accuracy(model, processor, held_out[t]) for t in tasks}
                model.train()
                history[-1]["held_out_answer_accuracy"] = acc
                log(f"step {step + 1}: " + " ".join(f"{t}={a:.2f}" for t, a in acc.items()))
        bar.close()
        stop.restore()
        model.eval()
        model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
        for name in os.listdir(tmp):
            if not name.endswith(".safetensors") and name not in ("config.json",
                                                                  "model.safetensors.index.json"):
                src = os.path.join(tmp, name)
                if os.path.isfile(src):
                    shutil.copy(src, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "tiny_model_spec.json"), "w") as f:
        json.dump(asdict(_replace(spec, dtype="bfloat16", seed=seed)), f, indent=1,
                  sort_keys=True)
    info = {"init": init, "add_layer": add_layer, "steps": steps,
            "mixed_batches": mixed_batches, "freeze_vision": freeze_vision,
            "train_layers": train_layers,
            "stopped_at_step": stopped_at, "batch_size": batch_size,
            "long_batch_size": long_batch_size, "lr": lr, "warmup": warmup, "mix": mix,
            "seed": seed, "threads": threads, "train_seconds": round(time.perf_counter()
                                                                     - t_start, 1),
            "history": history}
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _draw_batch(rng, tasks, weights, counters, seed, batch_size, long_batch_size, mixed):
    """The next training batch: a task drawn by weight, then that many of its next samples
    (`counters` tracks how far into each task's stream training is). With `mixed`, a short
    task's draw becomes a batch of short tasks drawn per sample: each update serves all of them,
    so learning one task does not undo another the way alternating one-task batches can.
    Returns (label, samples); the label joins the mixed tasks with "+"."""
    task = tasks[int(rng.choice(len(tasks), p=weights / weights.sum()))]
    if mixed and task not in synthetic.LONG_TASKS:
        short = [i for i, t in enumerate(tasks) if t not in synthetic.LONG_TASKS]
        picks = [tasks[i] for i in rng.choice(short, size=batch_size,
                                               p=weights[short] / weights[short].sum())]
    else:
        picks = [task] * (long_batch_size if task in synthetic.LONG_TASKS else batch_size)
    batch = []
    for t in picks:
        batch.append(synthetic.sample(t, counters[t], seed, "train"))
        counters[t] += 1
    return "+".join(sorted(set(picks))), batch


class _StopOnSignal:
    """SIGINT / SIGTERM during training: finish the current step, then save what was trained
    (training.json records "stopped_at_step"); a second signal stops at once."""

    def __init__(self):
        import signal
        self.requested = False
        self._old = {sig: signal.signal(sig, self._handle)
                     for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _replace(spec, **kw):
    import dataclasses
    return dataclasses.replace(spec, **kw)


def _bar(total: int, enabled: bool):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc="train-tiny", unit="step", disable=not enabled)
    except ImportError:  # tqdm is in the [bench] extra
        class _Null:
            def update(self, *a): pass
            def set_postfix(self, **k): pass
            def close(self): pass
        return _Null()


def add_parser(sub) -> argparse.ArgumentParser:
    from vllm_kvsparse import tiny_model

    p = sub.add_parser("train-tiny", help="train a tiny Qwen2-VL on the synthetic visual-QA "
                       "suite (CPU); docs/eval.md")
    tiny_model.add_arguments(p)
    p.set_defaults(max_pixels=896 * 896, func=main)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--long-batch-size", type=int, default=2,
                   help="batch size of the long (1,024-token) tasks (default 2)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--mix", default=DEFAULT_MIX,
                   help=f"task:weight,... sampled per batch (default {DEFAULT_MIX})")
    p.add_argument("--mixed-batches", action="store_true",
                   help="draw the short tasks per sample, so a batch mixes them (default: one "
                        "task per batch); long tasks keep their own batches")
    p.add_argument("--freeze-vision", action="store_true",
                   help="train the language model only (the vision encoder's backward is most "
                        "of a long prompt's step)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine more threads wait "
                        "on each other; results depend on it)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="held-out answer accuracy (teacher-forced) every N steps (0: never)")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="continue training a checkpoint train-tiny wrote (its architecture; "
                        "the model flags are ignored)")
    p.add_argument("--add-layer", default=None, metavar="AT[,AT...]",
                   help="with --init: insert a new decoder layer at index AT first, "
                        "initialised to the identity (the model answers as before); AT = the "
                        "layer count appends it; 3,4 inserts at 3, then at 4 of the grown model")
    p.add_argument("--train-layers", default=None, metavar="L,L...",
                   help="train only these decoder layers (indices after --add-layer); the "
                        "vision encoder, embeddings, other layers and head stay frozen")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_indices(flag: str, text: str) -> list[int]:
    """'3,4' -> [3, 4] (in the given order), or a ValueError naming the flag and its value."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text}: expected a layer index or comma-separated indices "
                         "(3,4)") from None


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'3,4' -> [3, 4]; each index must name one of the model's `num_layers` layers."""
    layers = sorted(set(parse_indices("--train-layers", text)))
    if not all(0 <= i < num_layers for i in layers):
        raise ValueError(f"--train-layers {text}: expected comma-separated layer indices in "
                         f"0..{num_layers - 1}")
    return layers


def main(args: argparse.Namespace) -> int:
    import sys

    from vllm_kvsparse import tiny_model

    try:
        spec = tiny_model.spec_from_args(args)
        spec.validate()
        mix = parse_mix(args.mix)
        if args.init and os.path.realpath(args.init) == os.path.realpath(args.out_dir):
            raise ValueError(f"--init {args.init} is OUT_DIR; write the new model elsewhere")
        if args.init and not os.path.isfile(os.path.join(args.init, "tiny_model_spec.json")):
            raise ValueError(f"--init {args.init}: not a train-tiny checkpoint (no "
                             "tiny_model_spec.json)")
        if args.add_layer is not None and not args.init:
            raise ValueError(f"--add-layer {args.add_layer} needs --init (a trained checkpoint "
                             "to grow); a new model takes --layers")
        add_layer = (None if args.add_layer is None
                     else parse_indices("--add-layer", args.add_layer))
        num_layers = (tiny_model.grown_layer_count(args.init, add_layer or []) if args.init
                      else spec.layers)   # the checkpoint's layers, plus the grown ones
        train_layers = (None if args.train_layers is None
                        else parse_layers(args.train_layers, num_layers))
    except ValueError as e:
        print(f"vllm-kvsparse train-tiny: error: {e}", file=sys.stderr)
        return 2
    info = train(args.out_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                 warmup=args.warmup, mix=mix, long_batch_size=args.long_batch_size,
                 seed=args.seed, threads=args.threads, spec=spec, eval_every=args.eval_every,
                 init=args.init, mixed_batches=args.mixed_batches,
                 freeze_vision=args.freeze_vision, add_layer=add_layer,
                 train_layers=train_layers, progress=not args.no_progress,
                 log=lambda m: print(m, file=sys.stderr))
    done = info["stopped_at_step"] or args.steps
    print(f"trained tiny Qwen2-VL written to {args.out_dir} ({done} steps, "
          f"{info['train_seconds']}s)")
    return 0
