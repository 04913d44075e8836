"""`vllm-kvsparse train-tiny` runs: a few steps on a 1-layer model, twice, give the same bf16
checkpoint bytes in tiny_model.build's layout (the committed model is made by the same code
with more steps; docs/eval.md)."""

import hashlib
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from vllm_kvsparse.tiny_model import TinyModelSpec


def _train(out, *extra, ok=True):
    cmd = [sys.executable, "-m", "vllm_kvsparse.cli", "train-tiny", str(out), "--layers", "1",
           "--vision-depth", "1", "--steps", "3", "--batch-size", "2", "--threads", "1",
           "--mix", "color:1,multi_image:1", "--eval-every", "3", "--seed", "3", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def test_train_tiny_few_steps_deterministic(tmp_path):
    proc = _train(tmp_path / "a")
    _train(tmp_path / "b")
    assert "train-tiny" in proc.stderr and "step 3: color=" in proc.stderr  # bar + eval line
    digest = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest()
              for d in "ab"]
    assert digest[0] == digest[1]
    a = tmp_path / "a"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "processor_config.json", "training.json"):
        assert (a / name).is_file(), name
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 1
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    spec = json.loads((a / "tiny_model_spec.json").read_text())
    assert spec["dtype"] == "bfloat16" and spec["seed"] == 3
    assert TinyModelSpec(**spec).max_pixels == 896 * 896
    info = json.loads((a / "training.json").read_text())
    assert info["steps"] == 3 and len(info["history"]) == 3
    assert set(info["history"][-1]["held_out_answer_accuracy"]) == {"color", "multi_image"}


def test_train_tiny_continues_from_a_checkpoint(tmp_path):
    _train(tmp_path / "a")
    # --init takes the checkpoint's architecture (not --layers) and its weights
    # (and --mixed-batches: every batch draws its tasks per sample from the short ones;
    # --freeze-vision: the vision encoder's weights stay as they were)
    _train(tmp_path / "c", "--init", str(tmp_path / "a"), "--layers", "2", "--rope-theta", "50",
           "--mixed-batches", "--mix", "color:1,position:1,long_color:1", "--freeze-vision")
    spec = json.loads((tmp_path / "c" / "tiny_model_spec.json").read_text())
    assert spec == json.loads((tmp_path / "a" / "tiny_model_spec.json").read_text())
    info = json.loads((tmp_path / "c" / "training.json").read_text())
    assert info["init"] == str(tmp_path / "a") and len(info["history"]) == 3
    assert info["mixed_batches"] is True and info["freeze_vision"] is True
    for row in info["history"]:   # a short batch names the tasks it mixed; long ones their own
        assert row["task"] == "long_color" or set(row["task"].split("+")) <= {"color", "position"}
    a, c = ((tmp_path / d / "model.safetensors").read_bytes() for d in "ac")
    assert a != c and len(a) == len(c)
    wa, wc = (load_file(tmp_path / d / "model.safetensors") for d in "ac")
    vision = [k for k in wa if k.startswith(("visual.", "model.visual."))]
    assert vision and all(torch.equal(wa[k], wc[k]) for k in vision)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if k not in vision)
    err = _train(tmp_path / "a", "--init", str(tmp_path / "a"), ok=False).stderr
    assert "is OUT_DIR; write the new model elsewhere" in err.strip().splitlines()[-1]


def _logits(model_dir, samples):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from vllm_kvsparse.evaluation.train import _batch

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    enc = _batch(AutoProcessor.from_pretrained(model_dir), samples)
    with torch.no_grad():
        return model.eval()(**enc).logits


def test_add_layer_keeps_the_answers_and_trains(tmp_path):
    from vllm_kvsparse import tiny_model
    from vllm_kvsparse.evaluation import synthetic

    _train(tmp_path / "a")
    samples = synthetic.generate(["color", "position"], 2, 0, "test")
    before = _logits(tmp_path / "a", samples)
    for at in (0, 1):   # before the trained layer and after it: an identity either way
        grown = tiny_model.add_layer(str(tmp_path / "a"), str(tmp_path / f"g{at}"), at)
        cfg = json.loads((tmp_path / f"g{at}" / "config.json").read_text())["text_config"]
        assert cfg["num_hidden_layers"] == 2 and len(cfg["layer_types"]) == 2
        w = load_file(tmp_path / f"g{at}" / "model.safetensors")
        assert torch.count_nonzero(w[f"model.layers.{at}.self_attn.o_proj.weight"]) == 0
        assert torch.count_nonzero(w[f"model.layers.{at}.self_attn.q_proj.weight"]) > 0
        assert torch.equal(_logits(grown, samples), before)
    # train-tiny --add-layer: the same growth, then training; the spec says 2 layers now
    _train(tmp_path / "c", "--init", str(tmp_path / "a"), "--add-layer", "1")
    spec = json.loads((tmp_path / "c" / "tiny_model_spec.json").read_text())
    assert spec["layers"] == 2
    info = json.loads((tmp_path / "c" / "training.json").read_text())
    assert info["add_layer"] == [1] and info["init"] == str(tmp_path / "a")
    # two layers grown in one go (1, then 2 of the grown model), and trained
    _train(tmp_path / "f", "--init", str(tmp_path / "a"), "--add-layer", "1,2",
           "--train-layers", "1,2")
    assert json.loads((tmp_path / "f" / "tiny_model_spec.json").read_text())["layers"] == 3
    # --train-layers: only the grown layer learns, every other weight keeps its bytes
    _train(tmp_path / "e", "--init", str(tmp_path / "g1"), "--train-layers", "1")
    wg, we = (load_file(tmp_path / d / "model.safetensors") for d in ("g1", "e"))
    changed = {k for k in wg if not torch.equal(wg[k], we[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), changed
    assert json.loads((tmp_path / "e" / "training.json").read_text())["train_layers"] == [1]
    for extra, msg in ((["--init", str(tmp_path / "a"), "--add-layer", "2"],
                        "--add-layer 2: 2 must be in 0..1"),
                       (["--add-layer", "0"], "--add-layer 0 needs --init"),
                       (["--init", str(tmp_path / "a"), "--add-layer", "1", "--train-layers",
                         "2"], "--train-layers 2: expected comma-separated layer indices in "
                               "0..1"),
                       (["--train-layers", "x"], "--train-layers x: expected"),
                       (["--init", str(tmp_path / "a"), "--add-layer", "1,3"],
                        "--add-layer 1,3: 3 must be in 0..2")):
        err = _train(tmp_path / "d", *extra, ok=False).stderr.strip().splitlines()[-1]
        assert msg in err, err
