"""benchmarks/tiny_model_accuracy.py on the committed trained model (transformers, no vLLM): the
answer word it reads is the one greedy decoding gives, and the per-colour attribute is right."""

from __future__ import annotations

import pytest
from helpers import REPO, load_benchmark

from vllm_kvsparse.evaluation import synthetic
from vllm_kvsparse.evaluation.dataset import user_content

MODEL = REPO / "tests" / "fixtures" / "tiny-qwen2vl-vqa"


@pytest.fixture(scope="module")
def acc():
    return load_benchmark("tiny_model_accuracy")


@pytest.fixture(scope="module")
def trained():
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    return (Qwen2VLForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(MODEL))


def _image(*colours):
    import numpy as np

    img = synthetic._background(np.random.default_rng(0), 224)
    for i, c in enumerate(colours):
        synthetic._draw(img, (i * 84, 0), c)
    return img


@pytest.mark.parametrize("colours, expected", [(("blue",), "blue"), (("white", "white"), "white"),
                                               (("red", "green"), None), ((), None)])
def test_square_colour_is_the_one_colour_drawn(acc, colours, expected):
    s = synthetic.Sample("x", "count", "?", ["one"], images=[_image(*colours)])
    assert acc.square_colour(s) == expected


@pytest.mark.parametrize("task", ["color", "which_picture"])   # a word, a two-token digit
def test_answer_word_is_what_greedy_decoding_answers(acc, trained, task):
    import torch

    model, processor = trained
    samples = synthetic.generate([task], 4)
    words = acc.answer_words(model, processor, samples)
    assert all(w in synthetic.COLORS or w in "1234" for w in words) and all(words)
    for s, w in zip(samples, words):   # free-running greedy decoding, no teacher forcing
        n = len(s.pil_images())
        enc = processor(text=[processor.apply_chat_template(
            [{"role": "user", "content": user_content(s.question, [{"type": "image"}] * n)}], add_generation_prompt=True,
            tokenize=False)], images=s.pil_images(), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        text = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:],
                                          skip_special_tokens=True)
        assert text.startswith(f"{synthetic.LEAD_IN} {w}"), (text, w)
