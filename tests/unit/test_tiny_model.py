"""The embedded tiny Qwen2-VL: options honoured, same bytes on every rebuild, clear errors."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

CLI = Path(sys.executable).parent / "vllm-kvsparse"


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def build(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), "tiny-model", str(out), *args], capture_output=True,
                          text=True, timeout=300)


def test_rebuild_is_byte_identical_and_options_are_honoured(tmp_path):
    args = ["--layers", "1", "--hidden-size", "256", "--num-heads", "2", "--num-kv-heads", "1",
            "--max-pixels", str(224 * 224), "--qk-scale", "3", "--rope-theta", "1000",
            "--mrope-section", "4,4,56"]
    first, second = build(tmp_path / "a", *args), build(tmp_path / "b", *args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    names = set(digest(tmp_path / "a"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "processor_config.json", "generation_config.json"} <= names
    text = json.loads((tmp_path / "a" / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == 1 and text["num_attention_heads"] == 2
    assert text["hidden_size"] // text["num_attention_heads"] == 128  # head_dim 128
    assert text["rope_parameters"]["rope_theta"] == 1000
    assert text["rope_parameters"]["mrope_section"] == [4, 4, 56]
    proc = json.loads((tmp_path / "a" / "processor_config.json").read_text())
    assert "50176" in json.dumps(proc)  # max_pixels = 224 * 224


def test_bad_head_dim_is_one_line_error(tmp_path):
    out = build(tmp_path / "c", "--hidden-size", "256", "--num-heads", "8")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "vllm-kvsparse tiny-model: error: head_dim = hidden_size / num_heads = 256/8 "
        "must be 64 or 128")


def test_bad_mrope_section_is_one_line_error(tmp_path):
    out = build(tmp_path / "d", "--mrope-section", "2,2,20")  # head_dim 64: must sum to 32
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "vllm-kvsparse tiny-model: error: mrope_section=(2, 2, 20) must be three positive "
        "integers summing to head_dim / 2 = 32")
    out = build(tmp_path / "e", "--mrope-section", "2,2")
    assert out.returncode == 2 and "expected three integers T,H,W" in out.stderr
