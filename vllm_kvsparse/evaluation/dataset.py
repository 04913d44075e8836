"""Datasets for `vllm-kvsparse eval`: `synthetic:TASKS[@SEED]` or a JSONL file, one sample a line:

    {"id": "q1", "task": "chartqa", "images": ["img/1.png", "https://.../2.jpg"],
     "question": "What is the highest value?", "answers": ["42", "42.0"]}

`images` (optional, or `image`: one) are file paths (relative to the JSONL file's folder,
sent inline as data: URLs), http(s) URLs or data: URLs; a `question` with "<image>"
placeholders gets the images at those places, one each, otherwise the images come first.
`answers` (or `answer`: one) are the accepted answers; `id` defaults to the line number and
`task` to "default". A malformed line stops the load with an error naming the file and line.
"""

from __future__ import annotations

import base64
import json
import mimetypes
from pathlib import Path

from vllm_kvsparse.evaluation import synthetic
from vllm_kvsparse.evaluation.synthetic import Sample


class DatasetError(ValueError):
    """A problem with the dataset; the message names the line."""


def load(spec: str, limit: int | None = None, seed: int = 0) -> list[Sample]:
    """`synthetic:color,position` (limit per task, default 50) or a JSONL path (first `limit`
    samples)."""
    if spec.startswith("synthetic:"):
        body = spec[len("synthetic:"):]
        if "@" in body:
            body, s = body.rsplit("@", 1)
            seed = int(s)
        try:
            tasks = synthetic.parse_tasks(body)
        except ValueError as e:
            raise DatasetError(str(e)) from None
        return synthetic.generate(tasks, limit or 50, seed, "test")
    return load_jsonl(Path(spec), limit)


def load_jsonl(path: Path, limit: int | None = None) -> list[Sample]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file (or use synthetic:TASKS)")
    out: list[Sample] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            out.append(_parse_line(line, lineno, path))
    if not out:
        raise DatasetError(f"{path}: no samples")
    return out


def _parse_line(line: str, lineno: int, path: Path) -> Sample:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: 'question' must be a non-empty string")
    answers = obj.get("answers", [obj["answer"]] if "answer" in obj else None)
    if isinstance(answers, str):
        answers = [answers]
    if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise DatasetError(f"{where}: 'answers' must be a non-empty list of strings "
                           "(or 'answer': a string)")
    images = obj.get("images", [obj["image"]] if "image" in obj else [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(u, str) for u in images):
        raise DatasetError(f"{where}: 'images' must be a list of paths or URLs")
    n_slots = question.count("<image>")
    if n_slots and n_slots != len(images):
        raise DatasetError(f"{where}: the question has {n_slots} <image> placeholders but "
                           f"{len(images)} images")
    urls = []
    for u in images:
        if u.startswith(("http://", "https://", "data:")):
            urls.append(u)
            continue
        p = Path(u) if Path(u).is_absolute() else path.parent / u
        if not p.is_file():
            raise DatasetError(f"{where}: image file {u!r} not found (looked at {p})")
        urls.append(p)
    return Sample(id=str(obj.get("id", lineno)), task=str(obj.get("task", "default")),
                  question=question, answers=[str(a) for a in answers], images=urls)


def user_content(question: str, image_parts: list[dict]) -> list[dict]:
    """OpenAI chat content: the image parts at the question's "<image>" places, else first."""
    pieces = question.split("<image>")
    if len(pieces) == 1:
        return [*image_parts, {"type": "text", "text": question}]
    content: list[dict] = []
    for i, piece in enumerate(pieces):
        if piece:
            content.append({"type": "text", "text": piece})
        if i < len(pieces) - 1:
            content.append(image_parts[i])
    return content


def image_urls(s: Sample) -> list[str]:
    """URLs to send: synthetic images and local files as PNG/inline data: URLs."""
    from vllm_kvsparse.bench.workload import png_data_url

    if s.render is not None:
        return [png_data_url(img) for img in s.render()]
    out = []
    for u in s.images:
        if isinstance(u, Path):
            mime = mimetypes.guess_type(u.name)[0] or "image/png"
            out.append(f"data:{mime};base64," + base64.b64encode(u.read_bytes()).decode())
        else:
            out.append(u)
    return out


def messages(s: Sample) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls(s)]
    return [{"role": "user", "content": user_content(s.question, parts)}]
