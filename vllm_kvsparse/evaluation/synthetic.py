"""A synthetic visual-QA suite, generated from a seed: the answer to every question needs a few
specific visual tokens (a small coloured square on a noisy grey background), and in several
tasks the question decides which ones.

Tasks (answers are single words of the tiny model's tokenizer, tiny_model.WORDS, after a fixed
lead-in, "The answer is red."; the word alone is accepted too):

  color         one 224x224 image (64 visual tokens), one 56-px square: "What color is the square?"
  position      two squares, one in each half: "What color is the square on the left/right?"
  grid          four squares, one near each corner (a 2x2 grid of cells): "What color is the
                square in the top left?" (top/bottom x left/right: the question names the cell)
  count         1-3 squares of one colour: "How many squares are there?" -> one / two / three
  count_color   1-3 squares of one colour and 1-2 of another: "How many red squares are there?"
                (the question's colour decides which squares count, as in multi_image)
  multi_image   2-4 images of 224x224, each with a square of a different colour:
                "Which picture has the red square?" -> 1 .. 4
  which_picture 2-4 images of 224x224, one square in one of them: "Which picture has the
                square?" -> 1 .. 4 (multi_image's first hop alone: which picture a square is in)
  long_color    one 896x896 image (1,024 visual tokens), one 56-px square (4 tokens of 1,024)
  long_multi    four 448x448 images (4 x 256 = 1,024 visual tokens), "Which picture ..." -> 1-4
  long4k_color  four 896x896 images (4,096 visual tokens), one square in one of them

`multi_image`, `count_color` and `long_multi` need the question's colour to choose among several
squares; the committed tiny model does not answer them (docs/eval.md: open research tasks).

Why the lead-in: the eviction methods prefill densely and evict afterwards, so a one-word answer
would be the first generated token, decided before anything is evicted. After the lead-in the
word is generated over the evicted cache, so those methods' budgets show in the accuracy.

Images are separated by text markers ("Picture 1: <image>Picture 2: <image>...") where a task has
several: the question text holds one "<image>" per image, the JSONL convention docs/eval.md
describes. Same (seed, split, task, index) -> same sample, bytes included; "train" and "test"
splits never share a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

COLORS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 50, 225),
          "black": (10, 10, 10), "white": (245, 245, 245)}
LEAD_IN = "The answer is"
COUNT_WORDS = ("one", "two", "three")
SQUARE = 56
TASKS = ("color", "position", "grid", "count", "multi_image", "which_picture", "count_color",
         "long_color", "long_multi", "long4k_color")
SHORT_TASKS = ("color", "position", "grid", "count", "multi_image", "which_picture",
               "count_color")
LONG_TASKS = ("long_color", "long_multi", "long4k_color")
_SPLITS = {"train": 0, "test": 1}
# Each task's stream of samples is seeded by its own id, so adding a task never changes the
# others' samples (id 0 was a diagnostic task, "side", used while training the committed model).
_TASK_IDS = {"color": 1, "position": 2, "count": 3, "multi_image": 4, "long_color": 5,
             "long_multi": 6, "long4k_color": 7, "which_picture": 8, "count_color": 9, "grid": 10}


@dataclass
class Sample:
    """One question. `images` are URLs/paths (a JSONL dataset) or PIL images (synthetic);
    `question` holds one "<image>" per image where they are interleaved with text, or none
    (then every image comes before the text)."""
    id: str
    task: str
    question: str
    answers: list[str]
    images: list = field(default_factory=list)
    render: Callable[[], list] | None = None  # synthetic: draws the images on demand

    def pil_images(self) -> list:
        return self.render() if self.render is not None else list(self.images)


def _background(rng, size: int):
    """Noisy grey: 7-px cells of grey 90..165, so PNGs stay small and no cell is coloured."""
    import numpy as np
    from PIL import Image

    cells = rng.integers(90, 166, size=((size + 6) // 7, (size + 6) // 7), dtype=np.uint8)
    grey = np.kron(cells, np.ones((7, 7), dtype=np.uint8))[:size, :size]
    return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")


def _draw(img, xy, color: str) -> None:
    from PIL import ImageDraw

    x, y = xy
    ImageDraw.Draw(img).rectangle([x, y, x + SQUARE - 1, y + SQUARE - 1], fill=COLORS[color])


CELL = 28  # one visual token: Qwen2-VL's 14-px patches, merged 2x2


def _spots(rng, n: int, x_range, y_range) -> list[tuple[int, int]]:
    """n non-overlapping square corners (with a gap) inside the ranges, on the visual-token
    grid: a square covers exactly 2x2 tokens."""
    out: list[tuple[int, int]] = []
    while len(out) < n:
        p = (CELL * int(rng.integers(-(-x_range[0] // CELL), x_range[1] // CELL + 1)),
             CELL * int(rng.integers(-(-y_range[0] // CELL), y_range[1] // CELL + 1)))
        if all(abs(p[0] - q[0]) > SQUARE + 8 or abs(p[1] - q[1]) > SQUARE + 8 for q in out):
            out.append(p)
    return out


def _pictures(n: int) -> str:
    return "".join(f"Picture {i + 1}: <image>" for i in range(n))


def _make(task: str, rng) -> tuple[str, list[str], Callable[[], list]]:
    """(question, answers, render) for one sample; all randomness is drawn here, eagerly, so
    render() is pure."""
    names = list(COLORS)
    if task in ("color", "long_color"):
        size = 224 if task == "color" else 896
        c = names[int(rng.integers(len(names)))]
        xy = _spots(rng, 1, (0, size - SQUARE), (0, size - SQUARE))[0]
        bg = int(rng.integers(1 << 31))

        def render():
            import numpy as np
            img = _background(np.random.default_rng(bg), size)
            _draw(img, xy, c)
            return [img]
        return "What color is the square?", [c], render
    if task == "position":
        c1, c2 = (names[i] for i in rng.permutation(len(names))[:2])
        # token columns 0-2 and 5-7 of 8: two columns apart at least
        left = _spots(rng, 1, (0, 28), (0, 224 - SQUARE))[0]
        right = _spots(rng, 1, (140, 224 - SQUARE), (0, 224 - SQUARE))[0]
        side = "left" if rng.integers(2) == 0 else "right"
        bg = int(rng.integers(1 << 31))

        def render():
            import numpy as np
            img = _background(np.random.default_rng(bg), 224)
            _draw(img, left, c1)
            _draw(img, right, c2)
            return [img]
        return (f"What color is the square on the {side}?", [c1 if side == "left" else c2],
                render)
    if task == "grid":
        # as `position`, in both axes: token rows/columns 0-2 and 5-7 of 8, so the four cells'
        # squares are two tokens apart at least
        colors = [names[i] for i in rng.permutation(len(names))[:4]]
        near, far = (0, 28), (140, 224 - SQUARE)
        cells = [(row, col) for row in ("top", "bottom") for col in ("left", "right")]
        spots = [_spots(rng, 1, far if col == "right" else near,
                        far if row == "bottom" else near)[0] for row, col in cells]
        asked = int(rng.integers(4))
        bg = int(rng.integers(1 << 31))

        def render():
            import numpy as np
            img = _background(np.random.default_rng(bg), 224)
            for xy, c in zip(spots, colors):
                _draw(img, xy, c)
            return [img]
        return (f"What color is the square in the {' '.join(cells[asked])}?", [colors[asked]],
                render)
    if task == "count":
        n = int(rng.integers(1, 4))
        c = names[int(rng.integers(len(names)))]
        spots = _spots(rng, n, (0, 224 - SQUARE), (0, 224 - SQUARE))
        bg = int(rng.integers(1 << 31))

        def render():
            import numpy as np
            img = _background(np.random.default_rng(bg), 224)
            for xy in spots:
                _draw(img, xy, c)
            return [img]
        return "How many squares are there?", [COUNT_WORDS[n - 1]], render
    if task == "count_color":
        n, others = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        c, d = (names[i] for i in rng.permutation(len(names))[:2])
        # up to 5 squares: cells of a 3x3 lattice (token columns/rows 0, 3, 6), where `_spots`'
        # rejection sampling could paint itself into a corner
        spots = [(3 * CELL * (k % 3), 3 * CELL * (k // 3))
                 for k in rng.permutation(9)[:n + others].tolist()]
        bg = int(rng.integers(1 << 31))

        def render():
            import numpy as np
            img = _background(np.random.default_rng(bg), 224)
            for i, xy in enumerate(spots):
                _draw(img, xy, c if i < n else d)
            return [img]
        return f"How many {c} squares are there?", [COUNT_WORDS[n - 1]], render
    if task in ("multi_image", "which_picture", "long_multi", "long4k_color"):
        n, size = {"multi_image": (int(rng.integers(2, 5)), 224),
                   "which_picture": (int(rng.integers(2, 5)), 224), "long_multi": (4, 448),
                   "long4k_color": (4, 896)}[task]
        colors = [names[i] for i in rng.permutation(len(names))[:n]]
        if task in ("long4k_color", "which_picture"):  # one square, in picture `holder`
            colors = [names[int(rng.integers(len(names)))]]
            holder = int(rng.integers(n))
        spots = [_spots(rng, 1, (0, size - SQUARE), (0, size - SQUARE))[0] for _ in range(n)]
        bgs = [int(rng.integers(1 << 31)) for _ in range(n)]
        target = int(rng.integers(n))

        def render():
            import numpy as np
            imgs = [_background(np.random.default_rng(b), size) for b in bgs]
            if task in ("long4k_color", "which_picture"):
                _draw(imgs[holder], spots[holder], colors[0])
            else:
                for img, xy, c in zip(imgs, spots, colors):
                    _draw(img, xy, c)
            return imgs
        if task == "long4k_color":
            return _pictures(n) + "What color is the square?", [colors[0]], render
        if task == "which_picture":
            return _pictures(n) + "Which picture has the square?", [str(holder + 1)], render
        return (_pictures(n) + f"Which picture has the {colors[target]} square?",
                [str(target + 1)], render)
    raise ValueError(f"unknown synthetic task {task!r}; tasks: {', '.join(TASKS)}")


def sample(task: str, index: int, seed: int = 0, split: str = "test") -> Sample:
    import numpy as np

    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; tasks: {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, _SPLITS[split], _TASK_IDS[task], index])
    question, (word,), render = _make(task, rng)
    return Sample(id=f"{task}-{split}-{seed}-{index}", task=task, question=question,
                  answers=[f"{LEAD_IN} {word}.", word], render=render)


def generate(tasks, n: int, seed: int = 0, split: str = "test") -> list[Sample]:
    """n samples of each task, in task order."""
    return [sample(t, i, seed, split) for t in tasks for i in range(n)]


def parse_tasks(spec: str) -> list[str]:
    """"color,position" / "all" / "short" / "long" -> task names (raises ValueError)."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        group = {"all": TASKS, "short": SHORT_TASKS, "long": LONG_TASKS}.get(part)
        if group:
            out.extend(group)
        elif part in TASKS:
            out.append(part)
        else:
            raise ValueError(f"unknown synthetic task {part!r}; tasks: {', '.join(TASKS)} "
                             "(or all, short, long)")
    return list(dict.fromkeys(out))
