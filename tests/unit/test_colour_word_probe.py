"""benchmarks/colour_word_probe.py's pure helpers: the token it reads for each square is the one
under the square, and its probe separates what is separable and not what is not."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import load_benchmark

from vllm_kvsparse.evaluation import synthetic


@pytest.fixture(scope="module")
def probe():
    return load_benchmark("colour_word_probe")


def test_square_cells_name_each_pictures_square_and_its_token(probe):
    for i in range(12):
        sample = synthetic.sample("multi_image", i, 0, "train")
        cells = probe.square_cells(sample)
        images = sample.pil_images()
        assert len(cells) == len(images)
        assert len({c for c, _ in cells}) == len(cells)          # a different colour each
        asked = next(n for n in synthetic.COLORS if f" {n} square" in sample.question)
        assert [c for c, _ in cells].index(asked) + 1 == int(sample.answers[1])
        for (colour, cell), img in zip(cells, images):
            per_row = img.size[0] // synthetic.CELL
            row, col = divmod(cell, per_row)
            half = synthetic.CELL // 2
            centre = np.asarray(img)[row * synthetic.CELL + half, col * synthetic.CELL + half]
            assert tuple(centre) == synthetic.COLORS[colour]   # the token lies on the square


def test_linear_probe_reads_a_linear_label_and_not_noise(probe):
    import torch

    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (500,), generator=g)
    x = torch.randn(500, 32, generator=g)
    x[:, :4] += 3 * torch.nn.functional.one_hot(label, 4)   # each class its own direction
    noise = torch.randint(0, 4, (500,), generator=g)
    assert probe.linear_probe(x, label) > 0.9
    assert probe.linear_probe(x, noise) < 0.45
