"""The requests a run sends: synthetic images drawn with PIL (deterministic from the seed) or a
JSONL file of prompts with image paths/URLs. Every endpoint gets the identical list, and the
same arrival schedule."""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import random
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PROMPT = "Describe the image in detail."


@dataclass
class BenchRequest:
    index: int
    prompt: str
    images: list[str] = field(default_factory=list)  # URLs: data:, http(s):, file paths resolved
    max_tokens: int = 64

    def messages(self) -> list[dict]:
        content: list[dict] = [{"type": "image_url", "image_url": {"url": u}} for u in self.images]
        content.append({"type": "text", "text": self.prompt})
        return [{"role": "user", "content": content}]


class WorkloadError(ValueError):
    """A problem with the workload file; the message names the line."""


def synthetic_image(width: int, height: int, seed: int):
    """A picture of random filled shapes on a random background (PIL image)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    color = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    img = Image.new("RGB", (width, height), color())
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = x0 + rng.randrange(1, width // 2 + 2)
        y1 = y0 + rng.randrange(1, height // 2 + 2)
        shape = rng.choice(("rectangle", "ellipse", "line"))
        if shape == "rectangle":
            draw.rectangle([x0, y0, x1, y1], fill=color())
        elif shape == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=color())
        else:
            draw.line([x0, y0, x1, y1], fill=color(), width=rng.randrange(1, 8))
    return img


def rectangle_image(size=(448, 448), seed: int = 0):
    """Six random filled rectangles on a random background (PIL image): the tests' and the
    engine benchmarks' picture. Distinct seeds give distinct images, so no multimodal cache
    serves a repeat."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randrange(1, size[0] // 2 + 2), y0 + rng.randrange(1, size[1] // 2 + 2)
        draw.rectangle([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def png_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def synthetic(num_requests: int, images_per_prompt: int, width: int, height: int,
              max_tokens: int, seed: int, prompt: str = DEFAULT_PROMPT) -> list[BenchRequest]:
    """`num_requests` requests, each with its own `images_per_prompt` distinct images (distinct
    so that no prefix or multimodal cache turns the run into a cache benchmark)."""
    reqs = []
    for i in range(num_requests):
        urls = [png_data_url(synthetic_image(width, height, seed * 1_000_003 + i * 101 + j))
                for j in range(images_per_prompt)]
        reqs.append(BenchRequest(i, prompt, urls, max_tokens))
    return reqs


def _image_url(ref: str, base: Path) -> str:
    if ref.startswith(("http://", "https://", "data:")):
        return ref
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
    if not path.is_absolute():
        path = base / path
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def from_jsonl(path: str, default_max_tokens: int,
               num_requests: int | None = None) -> list[BenchRequest]:
    """Lines of {"prompt": str, "images": [path-or-url, ...], "max_tokens": int}. Relative
    paths are relative to the file's directory; local files are sent as base64 data URLs.
    With `num_requests`, the lines are cycled or cut to that many requests."""
    base = Path(path).resolve().parent
    items: list[tuple[str, list[str], int]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise WorkloadError(f"{where}: expected an object with a string \"prompt\"")
            images = obj.get("images", [])
            if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
                raise WorkloadError(f"{where}: \"images\" must be a list of paths or URLs")
            mt = obj.get("max_tokens", default_max_tokens)
            if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
                raise WorkloadError(f"{where}: max_tokens={mt!r} is invalid; valid range is "
                                    "integers >= 1")
            try:
                urls = [_image_url(x, base) for x in images]
            except OSError as e:
                raise WorkloadError(f"{where}: cannot read image: {e}") from None
            items.append((obj["prompt"], urls, mt))
    if not items:
        raise WorkloadError(f"{path}: no requests in the file")
    n = len(items) if num_requests is None else num_requests
    return [BenchRequest(i, *items[i % len(items)]) for i in range(n)]


def arrival_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: all 0 for an infinite rate, else a Poisson process
    (exponential gaps with mean 1/rate) from a seeded generator."""
    if request_rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out
