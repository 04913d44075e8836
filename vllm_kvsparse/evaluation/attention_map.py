"""Where does a model look when it answers? For a checkpoint and a synthetic task: per layer, the
share of the answer word's attention that lands on the images and on the needle (the visual
tokens a square covers), and the needle's "lift": mean attention per needle token / mean per
visual token (1 = no preference, > 1 = the model looks at the square). Transformers' eager
attention, teacher-forced on the expected answer, at the position that predicts the answer word.

    python -m vllm_kvsparse.evaluation.attention_map tests/fixtures/tiny-qwen2vl-vqa --task color

Why it matters: the KV methods keep the tokens attention points at. If a model pools the
whole image uniformly (lift ~1), a method's score on it says little about keeping needles.

`--zipvl-tau TAU` also reports, per layer, the prompt tokens ZipVL's selection (scope "all",
its defaults) drops when fed this dense run's attention: how many of the text tokens (the
question among them) and of the visual tokens, and the dropped text. Exact for layer 0; for
deeper layers an approximation (under ZipVL their input is the sparse prefill's, not dense).
"""

from __future__ import annotations

import argparse
import json


def needle_mask(image, grid_h: int, grid_w: int):
    """bool[grid_h * grid_w]: the merged visual tokens whose cell holds a square's pixel (the
    suite's backgrounds are grey 90..165; squares are coloured, black or white)."""
    import numpy as np

    from vllm_kvsparse.evaluation.synthetic import CELL

    a = np.asarray(image.convert("RGB").resize((grid_w * CELL, grid_h * CELL)), dtype=np.int16)
    odd = (a.max(-1) - a.min(-1) > 30) | (a.max(-1) < 60) | (a.min(-1) > 200)
    return odd.reshape(grid_h, CELL, grid_w, CELL).any(axis=(1, 3)).reshape(-1)


def answer_attention(model, processor, sample) -> list[dict]:
    """Per layer: image share, needle share and needle lift (mean over heads), and the needle
    share of each head."""
    import numpy as np
    import torch

    from vllm_kvsparse.evaluation.train import _batch

    enc = _batch(processor, [sample])
    labels = enc.pop("labels")[0]
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    ids = enc["input_ids"][0]
    image_pos = (ids == model.config.image_token_id).nonzero()[:, 0]
    merge = model.config.vision_config.spatial_merge_size
    masks = [needle_mask(img, int(h) // merge, int(w) // merge)
             for img, (_, h, w) in zip(sample.pil_images(), enc["image_grid_thw"].tolist())]
    needle = torch.from_numpy(np.concatenate(masks))
    answer = (labels != -100).nonzero()[:, 0]
    n_lead = len(processor.tokenizer.encode(sample.answers[0].rsplit(" ", 1)[0]))
    query = answer[n_lead] - 1            # the position whose logits predict the answer word
    rows = []
    for layer, att in enumerate(out.attentions):
        heads = att[0, :, query, image_pos].float()          # [heads, visual tokens]
        a = heads.mean(0)                                    # heads averaged
        per_token = a.sum() / len(a)
        rows.append({"layer": layer, "image_share": a.sum().item(),
                     "needle_share": a[needle].sum().item(),
                     # one head can do what the mean hides (e.g. which square it picks)
                     "needle_share_per_head": heads[:, needle].sum(1).tolist(),
                     "needle_tokens": int(needle.sum()), "visual_tokens": len(a),
                     "needle_lift": (a[needle].mean() / per_token).item()
                     if needle.any() else None})
    return rows


def zipvl_drops(model, processor, sample, tau: float) -> list[dict]:
    """Per layer, what ZipVL (scope "all", default probes and additions) would drop from the
    prompt given this dense run's head-averaged attention: text/visual counts and the dropped
    text, decoded."""
    import torch

    from vllm_kvsparse import zipvl
    from vllm_kvsparse.evaluation.train import _batch

    enc = _batch(processor, [sample])
    labels = enc.pop("labels")[0]
    n = int((labels != -100).nonzero()[0, 0])          # the prompt: what the prefill sees
    ids = enc["input_ids"][0, :n]
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    visual = ids == model.config.image_token_id
    probes = zipvl.default_probe_indices(n)
    rows = []
    for layer, att in enumerate(out.attentions):
        accumulated = att[0, :, :n, :n].float().mean(0)[probes].sum(0)     # Eq. 6
        normalized = zipvl.normalize_by_visibility(accumulated, probes)   # Eq. 8
        kept, _ = zipvl.select_from_scores(accumulated, normalized, len(probes), tau=tau)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[kept] = True
        rows.append({"layer": layer, "prompt_tokens": n,
                     "text_tokens": int((~visual).sum()),
                     "text_dropped": int((~keep & ~visual).sum()),
                     "visual_tokens": int(visual.sum()),
                     "visual_dropped": int((~keep & visual).sum()),
                     "dropped_text": processor.tokenizer.decode(ids[~keep & ~visual])})
    return rows


def main() -> int:
    import numpy as np
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from vllm_kvsparse.evaluation import synthetic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--task", default="color", choices=synthetic.TASKS)
    ap.add_argument("-n", type=int, default=8, help="held-out samples")
    ap.add_argument("--json", help="also write the per-sample rows here")
    ap.add_argument("--per-head", action="store_true", help="also each head's needle share")
    ap.add_argument("--zipvl-tau", type=float,
                    help="also what ZipVL (scope all) at this tau drops, per layer")
    args = ap.parse_args()
    if args.zipvl_tau is not None and not 0 < args.zipvl_tau <= 1:
        ap.error(f"--zipvl-tau {args.zipvl_tau} is invalid; valid values are in (0, 1]")
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(args.model)
    per_sample = [answer_attention(model, processor, s)
                  for s in synthetic.generate([args.task], args.n)]
    print(f"{args.model}, task {args.task}, {args.n} held-out samples (mean):")
    print("| layer | image share | needle share | needle tokens / visual | needle lift |")
    print("|---|---|---|---|---|")
    for layer in range(len(per_sample[0])):
        rs = [s[layer] for s in per_sample]
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        lifts = [r["needle_lift"] for r in rs if r["needle_lift"] is not None]
        print(f"| {layer} | {mean('image_share'):.3f} | {mean('needle_share'):.3f} | "
              f"{mean('needle_tokens'):.1f} / {mean('visual_tokens'):.0f} | "
              f"{sum(lifts) / max(len(lifts), 1):.2f} |")
    if args.per_head:
        print("\n| layer | needle share per head |\n|---|---|")
        for layer in range(len(per_sample[0])):
            shares = np.mean([s[layer]["needle_share_per_head"] for s in per_sample], axis=0)
            print(f"| {layer} | " + " ".join(f"{x:.3f}" for x in shares) + " |")
    drops = None
    if args.zipvl_tau is not None:
        drops = [zipvl_drops(model, processor, s, args.zipvl_tau)
                 for s in synthetic.generate([args.task], args.n)]
        print(f"\nZipVL tau {args.zipvl_tau}, scope all, on the dense attention (mean per "
              "sample; layer 0 exact):")
        print("| layer | text tokens dropped | visual tokens dropped "
              "| first sample's dropped text |")
        print("|---|---|---|---|")
        for layer in range(len(drops[0])):
            rs = [d[layer] for d in drops]
            mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
            print(f"| {layer} | {mean('text_dropped'):.1f} / {mean('text_tokens'):.0f} | "
                  f"{mean('visual_dropped'):.1f} / {mean('visual_tokens'):.0f} | "
                  f"{rs[0]['dropped_text']!r} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "task": args.task, "samples": per_sample,
                       "zipvl_drops": drops}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
