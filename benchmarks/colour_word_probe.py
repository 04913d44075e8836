"""Where a `train-tiny` checkpoint keeps what `multi_image` needs, by linear probes on its
residual stream: "Which picture has the red square?" needs (1) each square's picture index at
the square's tokens and (2) the question's colour, to pick the square. Per decoder layer's output
(before the final norm), on `multi_image` training samples, a linear probe (RMS-normalised
features, 80/20 split, held-out accuracy) for:

  square -> picture   a square's picture index, at the token under the square's centre
  word -> colour      the question's colour word, at that word's own position
  answer -> colour    the question's colour, at the position that predicts the answer digit

and, at the last layer, "word -> colour" and "answer -> colour" again with the five colour
words' input-embedding rows scaled by --scales (how much of the word a larger embedding row
carries through the frozen layers; a diagnostic, not a training recipe).

    python benchmarks/colour_word_probe.py --out /tmp/probe            # the committed model

About 3.5 min with --threads 1 on an AMD EPYC (600 samples). Output: a table and
OUT/probe.json. Chance: square -> picture ~0.35 (2-4 pictures), the colour probes 0.2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vllm_kvsparse.evaluation import synthetic  # noqa: E402
from vllm_kvsparse.evaluation.train import _batch  # noqa: E402

MODEL = common.REPO / "tests" / "fixtures" / "tiny-qwen2vl-vqa"


def square_cells(sample) -> list[tuple[str, int]]:
    """Per picture: (the square's colour, the index of the merged token under its centre)."""
    import numpy as np

    out = []
    for img in sample.pil_images():
        pixels = np.asarray(img).astype(int)
        colour, mask = max(((c, (np.abs(pixels - rgb).sum(-1) == 0))
                            for c, rgb in synthetic.COLORS.items()), key=lambda cm: cm[1].sum())
        ys, xs = np.nonzero(mask)
        per_row = pixels.shape[1] // synthetic.CELL
        out.append((colour, int(ys.mean()) // synthetic.CELL * per_row
                    + int(xs.mean()) // synthetic.CELL))
    return out


def linear_probe(x, y, seed: int = 0) -> float:
    """Held-out accuracy of a linear classifier on RMS-normalised features (last 20 %)."""
    import torch

    torch.manual_seed(seed)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    split = int(len(y) * 0.8)
    net = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(800):
        loss = torch.nn.functional.cross_entropy(net(x[:split]), y[:split])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (net(x[split:]).argmax(-1) == y[split:]).float().mean().item()


def collect(model, batches, samples, colour_ids: list[int], image_token_id: int):
    """Per layer: residuals at the squares, the colour word (the last of `colour_ids`, the
    colour words' tokens, before the answer) and the answer position."""
    import torch

    layers = model.model.language_model.layers
    outputs: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(
        lambda m, a, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, layer in enumerate(layers)]
    squares, words, answers = ([[] for _ in layers] for _ in range(3))
    k = 0
    with torch.no_grad():
        for enc, labels in batches:
            model(**enc)
            for j in range(len(labels)):
                sample, cells = samples[k]
                k += 1
                pos = (labels[j] != -100).nonzero()[:, 0]
                ids = enc["input_ids"][j]
                # labels: the lead-in, the digit, ".", <|im_end|>
                answer_at = int(pos[-3]) - 1
                word_at = int(torch.isin(ids[:pos[0]], torch.tensor(colour_ids))
                              .nonzero()[-1, 0])
                images = (ids == image_token_id).nonzero()[:, 0]
                per_image = len(images) // len(cells)
                for i in range(len(layers)):
                    h = outputs[i][j]
                    words[i].append(h[word_at])
                    answers[i].append(h[answer_at])
                    squares[i].extend(h[images[per_image * n + cell]]
                                      for n, (_, cell) in enumerate(cells))
    for hook in hooks:
        hook.remove()
    stack = lambda rows: [torch.stack(r) for r in rows]  # noqa: E731
    return stack(squares), stack(words), stack(answers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--n", type=int, default=600, help="multi_image training samples")
    ap.add_argument("--scales", default="1,30,100")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.model)
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.model,
                                                            dtype=torch.float32).eval()
    tok = processor.tokenizer
    names = list(synthetic.COLORS)
    raw = [synthetic.sample("multi_image", i, 0, "train") for i in range(args.n)]
    samples = [(s, square_cells(s)) for s in raw]
    asked = torch.tensor([next(c for c, n in enumerate(names) if f" {n} square" in s.question)
                          for s in raw])
    picture = torch.tensor([n for _, cells in samples for n in range(len(cells))])
    batches = []
    for i in range(0, len(raw), 8):
        enc = _batch(processor, raw[i:i + 8])
        batches.append((enc, enc.pop("labels")))
    rows_ids = [tok.encode(" " + c)[0] for c in names]
    squares, words, answers = collect(model, batches, samples, rows_ids,
                                      model.config.image_token_id)
    per_layer = [{"layer": i, "square_picture": linear_probe(squares[i], picture),
                  "word_colour": linear_probe(words[i], asked),
                  "answer_colour": linear_probe(answers[i], asked)}
                 for i in range(len(squares))]

    emb = model.model.language_model.embed_tokens.weight
    original = emb.data[rows_ids].clone()
    scaled = []
    for scale in (float(s) for s in args.scales.split(",")):
        emb.data[rows_ids] = original * scale
        _, words_s, answers_s = collect(model, batches, samples, rows_ids,
                                        model.config.image_token_id)
        scaled.append({"scale": scale, "word_colour": linear_probe(words_s[-1], asked),
                       "answer_colour": linear_probe(answers_s[-1], asked)})
    emb.data[rows_ids] = original

    meta = common.meta(sys.argv)
    common.write_json(Path(args.out) / "probe.json",
                      {**meta, "model": args.model, "n": args.n, "per_layer": per_layer,
                       "colour_rows_norm": original.norm(dim=1).tolist(),
                       "scaled_colour_rows": scaled})
    print(common.cpu_line(meta["machine"]))
    print(common.markdown_table(
        ["layer output", "square -> picture", "word -> colour", "answer -> colour"],
        [[r["layer"], round(r["square_picture"], 2), round(r["word_colour"], 2),
          round(r["answer_colour"], 2)] for r in per_layer]))
    print(common.markdown_table(
        ["colour rows x", "word -> colour (last layer)", "answer -> colour (last layer)"],
        [[r["scale"], round(r["word_colour"], 2), round(r["answer_colour"], 2)]
         for r in scaled]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
