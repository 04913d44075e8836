"""vllm_kvsparse.evaluation.attention_map: the needle mask finds exactly the visual tokens a
square covers, and the per-layer attention shares of a real (tiny, random) Qwen2-VL add up."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_kvsparse.evaluation import attention_map, synthetic


@pytest.mark.parametrize("xy,cells", [((28, 56), {(2, 1), (2, 2), (3, 1), (3, 2)}),
                                      ((30, 60), {(r, c) for r in (2, 3, 4) for c in (1, 2, 3)})])
def test_needle_mask_marks_the_cells_a_square_covers(xy, cells):
    img = synthetic._background(np.random.default_rng(0), 224)
    synthetic._draw(img, xy, "white")
    mask = attention_map.needle_mask(img, 8, 8).reshape(8, 8)
    assert {tuple(int(v) for v in rc) for rc in np.argwhere(mask)} == cells


def test_needle_mask_ignores_the_grey_background():
    for seed in range(5):
        img = synthetic._background(np.random.default_rng(seed), 224)
        assert not attention_map.needle_mask(img, 8, 8).any()


def test_answer_attention_shares(tmp_path):
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from vllm_kvsparse import tiny_model

    tiny_model.build(str(tmp_path), tiny_model.TinyModelSpec(dtype="float32"))
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    rows = attention_map.answer_attention(model, AutoProcessor.from_pretrained(str(tmp_path)),
                                          synthetic.sample("color", 0))
    assert [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 < r["needle_share"] < r["image_share"] <= 1.0 + 1e-6
        assert r["visual_tokens"] == 64 and 4 <= r["needle_tokens"] <= 9
        assert len(r["needle_share_per_head"]) == 4       # the tiny model's heads
        assert np.mean(r["needle_share_per_head"]) == pytest.approx(r["needle_share"], rel=1e-5)
        assert r["needle_lift"] == pytest.approx(
            r["needle_share"] / r["needle_tokens"] / (r["image_share"] / 64), rel=1e-5)


def test_zipvl_drops_counts_add_up_and_tau_one_drops_nothing(tmp_path):
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from vllm_kvsparse import tiny_model

    tiny_model.build(str(tmp_path), tiny_model.TinyModelSpec(dtype="float32"))
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path))
    s = synthetic.sample("position", 0)
    full = attention_map.zipvl_drops(model, processor, s, 1.0)
    assert [r["text_dropped"] + r["visual_dropped"] for r in full] == [0, 0]
    for r in attention_map.zipvl_drops(model, processor, s, 0.5):
        assert r["visual_tokens"] == 64 and r["text_tokens"] + 64 == r["prompt_tokens"]
        assert 0 < r["text_dropped"] + r["visual_dropped"] < r["prompt_tokens"]
        # the protected first 4 and last token are never dropped
        assert r["text_dropped"] <= r["text_tokens"] - 5
        assert len(r["dropped_text"]) > 0 if r["text_dropped"] else r["dropped_text"] == ""
