"""`vllm-kvsparse eval` without a server: answer matching, EffiVLM-Bench's OP/OG/OL/OE against
hand-computed values, the JSONL format's errors, the synthetic suite's determinism and the
report on a dead endpoint."""

import json
import math

import numpy as np
import pytest

from vllm_kvsparse.evaluation import cli as ecli
from vllm_kvsparse.evaluation import dataset as ds
from vllm_kvsparse.evaluation import metrics as mt
from vllm_kvsparse.evaluation import synthetic


def test_exact_and_relaxed_match():
    assert mt.exact_match(" red\n", ["red"]) and not mt.exact_match("Red", ["red"])
    assert mt.relaxed_match("Red.", ["red"]) and mt.relaxed_match("the red square", ["red"])
    assert mt.relaxed_match("Two", ["2"]) and mt.relaxed_match("2", ["two"])
    assert not mt.relaxed_match("reddish", ["red"]) and not mt.relaxed_match("", ["red"])
    assert not mt.relaxed_match("blue red", ["red"])


def test_op_og_hand_computed():
    acc = {"dense": {"a": 0.8, "b": 0.5}, "c": {"a": 0.4, "b": 0.5}}
    ov = mt.overall(acc, "dense")
    assert ov["dense"]["OP"] == pytest.approx(1.0) and ov["dense"]["OG"] == pytest.approx(0.0)
    # ratios 0.5 and 1.0: OP = sqrt((0.25 + 1) / 2); OG = std / mean = 0.25 / 0.75
    assert ov["c"]["OP"] == pytest.approx(math.sqrt(0.625))
    assert ov["c"]["OG"] == pytest.approx(1 / 3)
    assert ov["c"]["ratios"] == pytest.approx({"a": 0.5, "b": 1.0})


def test_op_skips_tasks_the_reference_fails():
    ov = mt.overall({"ref": {"a": 0.0, "b": 0.5}, "c": {"a": 0.3, "b": 0.25}}, "ref")
    assert ov["c"]["OP"] == pytest.approx(0.5) and ov["c"]["skipped_tasks"] == ["a"]
    assert mt.overall({"ref": {"a": 0.0}, "c": {"a": 1.0}}, "ref")["c"]["OP"] is None


def test_ol_and_oe_hand_computed():
    # Red.=red (yes), blue/green (no), failed request (no), two=2 (yes): 2 of 4
    assert mt.loyalty(["Red.", "blue", None, "two"], ["red", "green", "blue", "2"]) == 0.5
    assert mt.loyalty([None], [None]) == 0.0 and mt.loyalty([], []) is None
    # OE = mean(2/1, 3/6) = 1.25
    assert mt.efficiency({"a": 1.0, "b": 6.0}, {"a": 2.0, "b": 3.0}) == pytest.approx(1.25)
    assert mt.efficiency({"a": None}, {"a": 2.0}) is None


def _row(task, pred, answers, t=1.0):
    ok = pred is not None
    return {"id": "x", "task": task, "prediction": pred, "ok": ok, "error": None if ok else "e",
            "exact": ok and mt.exact_match(pred, answers),
            "relaxed": ok and mt.relaxed_match(pred, answers), "ttft_s": t if ok else None,
            "e2e_s": t if ok else None}


def _endpoint(rows, error=None, kept=None, seen=None, freed=None):
    tasks = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        chunk = [r for r in rows if r["task"] == task]
        tasks[task] = ecli._task_summary(chunk, 1.0, {
            "kept_ratio_mean": kept / seen if kept is not None else None,
            "prompt_tokens_seen": seen, "prompt_tokens_kept": kept, "kv_blocks_freed": freed,
            "metrics_error": None})
    return {"url": "u", "model": "m", "error": error, "tasks": tasks, "samples": rows}


def test_summarize_end_to_end_numbers_and_dead_endpoint():
    dense = _endpoint([_row("a", "red", ["red"]), _row("a", "blue", ["blue"]),
                       _row("b", "2", ["2"]), _row("b", "1", ["2"])])
    sparse = _endpoint([_row("a", "red", ["red"], 0.5), _row("a", "red", ["blue"], 0.5),
                        _row("b", "1", ["2"], 0.5), _row("b", None, ["2"])],
                       kept=30, seen=100, freed=4)
    dead = _endpoint([_row("a", None, ["red"]), _row("a", None, ["blue"]),
                      _row("b", None, ["2"]), _row("b", None, ["2"])], error="unreachable")
    eps = {"dense": dense, "sparse": sparse, "dead": dead}
    head = ecli.summarize(eps)
    assert head["reference"] == "dense"
    s = sparse["overall"]
    # task accuracies: dense a=1, b=0.5; sparse a=0.5, b=0 -> ratios 0.5, 0
    assert s["OP"] == pytest.approx(math.sqrt(0.125)) and s["OG"] == pytest.approx(1.0)
    assert s["OL"] == pytest.approx(0.25)  # red=red; red!=blue; 1!=2; failure vs 1
    assert s["OE"] == pytest.approx(2.0)  # per task: 2/1 and 2/1 (mean time of answered requests)
    assert s["failures"] == 1 and s["accuracy_relaxed"] == 0.25
    assert s["kept_ratio_mean"] == pytest.approx(0.3) and s["kv_blocks_freed"] == 8
    d = dead["overall"]
    assert d["failures"] == 4 and d["accuracy_relaxed"] is None and d["OL"] is None
    md = ecli.markdown({"dataset": "x", **head, "endpoints": eps})
    assert "dead: unreachable" in md and "| sparse |" in md


def test_jsonl_format_and_errors(tmp_path):
    (tmp_path / "img.png").write_bytes(b"\x89PNG fake")
    good = {"id": "q1", "images": ["img.png", "https://example.com/a.jpg"],
            "question": "<image> and <image>: which?", "answers": ["left"], "task": "t"}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + json.dumps({"question": "q?", "answer": 3}) + "\n")
    a, b = ds.load(str(p))
    assert a.task == "t" and a.answers == ["left"] and b.id == "3" and b.answers == ["3"]
    msgs = ds.messages(a)[0]["content"]
    assert [c["type"] for c in msgs] == ["image_url", "text", "image_url", "text"]
    assert msgs[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert msgs[2]["image_url"]["url"] == "https://example.com/a.jpg"
    assert [c["type"] for c in ds.messages(b)[0]["content"]] == ["text"]
    for line, msg in [("{not json", "d.jsonl:2: not valid JSON"),
                      ('{"question": "q"}', "d.jsonl:2: 'answers'"),
                      ('{"question": "q", "answers": ["a"], "images": ["nope.png"]}',
                       "d.jsonl:2: image file 'nope.png' not found"),
                      ('{"question": "<image>", "answers": ["a"]}', "1 <image> placeholders")]:
        p.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(ds.DatasetError, match=msg.replace("(", r"\(")):
            ds.load(str(p))


def test_synthetic_suite_is_deterministic_and_answers_are_words():
    from vllm_kvsparse.bench.workload import png_data_url
    from vllm_kvsparse.tiny_model import WORDS

    for task in synthetic.TASKS:
        a, b = synthetic.sample(task, 5, seed=1), synthetic.sample(task, 5, seed=1)
        assert (a.question, a.answers) == (b.question, b.answers)
        if task in synthetic.SHORT_TASKS:
            assert [png_data_url(i) for i in a.pil_images()] == \
                [png_data_url(i) for i in b.pil_images()]
        lead_in, word = a.answers
        assert word in WORDS and lead_in == f"{synthetic.LEAD_IN} {word}."
        assert mt.relaxed_match("the answer is " + word, a.answers)
    train = {synthetic.sample("color", i, 0, "train").question + str(
        synthetic.sample("color", i, 0, "train").pil_images()[0].tobytes()[:2000])
        for i in range(3)}
    test = {synthetic.sample("color", i, 0, "test").question + str(
        synthetic.sample("color", i, 0, "test").pil_images()[0].tobytes()[:2000])
        for i in range(3)}
    assert not train & test
    assert synthetic.parse_tasks("short,color") == list(synthetic.SHORT_TASKS)
    with pytest.raises(ValueError, match="unknown synthetic task 'nope'"):
        synthetic.parse_tasks("nope")
    counts = {synthetic.sample("multi_image", i).question.count("<image>") for i in range(30)}
    assert counts == {2, 3, 4}


def test_synthetic_squares_sit_on_the_token_grid():
    """A square covers exactly 2x2 visual tokens; `position`'s squares are two token columns
    apart at least (left: columns 0-2 of 8, right: 5-7), `grid`'s also two rows, the asked
    colour in the named cell; adding a task keeps every other
    task's samples (each task is seeded by its own id)."""
    from vllm_kvsparse.evaluation.attention_map import needle_mask

    assert set(synthetic._TASK_IDS) == set(synthetic.TASKS)
    assert len(set(synthetic._TASK_IDS.values())) == len(synthetic.TASKS)
    for i in range(10):
        (img,) = synthetic.sample("color", i).pil_images()
        assert needle_mask(img, 8, 8).sum() == 4
        s = synthetic.sample("position", i)
        cols = sorted({int(c) for c in
                       np.argwhere(needle_mask(s.pil_images()[0], 8, 8).reshape(8, 8))[:, 1]})
        assert len(cols) == 4 and cols[1] <= 2 and cols[2] >= 5, cols
        s = synthetic.sample("grid", i)
        (img,) = s.pil_images()
        mask = needle_mask(img, 8, 8).reshape(8, 8)
        assert mask.sum() == 16 and not mask[3:5].any() and not mask[:, 3:5].any()
        row, col = s.question.rstrip("?").split()[-2:]
        answer = np.argwhere((np.asarray(img) == synthetic.COLORS[s.answers[1]]).all(-1))
        assert len(answer) == synthetic.SQUARE ** 2
        assert ((answer[:, 0] >= 112) == (row == "bottom")).all()
        assert ((answer[:, 1] >= 112) == (col == "right")).all()
        (img,) = synthetic.sample("long_color", i).pil_images()
        assert needle_mask(img, 32, 32).sum() == 4
        s = synthetic.sample("which_picture", i)
        per_picture = [int(needle_mask(img, 8, 8).sum()) for img in s.pil_images()]
        assert sorted(per_picture)[-2:] == [0, 4] and s.answers[1] == str(
            per_picture.index(4) + 1), (per_picture, s.answers)
        s = synthetic.sample("count_color", i)
        (img,) = s.pil_images()
        asked = s.question.split()[2]
        n = synthetic.COUNT_WORDS.index(s.answers[1]) + 1
        pixels = np.asarray(img).reshape(-1, 3)
        squares = int(needle_mask(img, 8, 8).sum()) // 4
        assert (pixels == synthetic.COLORS[asked]).all(-1).sum() == n * synthetic.SQUARE ** 2
        assert n + 1 <= squares <= n + 2, (s.question, s.answers, squares)
