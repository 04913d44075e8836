"""Build a tiny random-weight Qwen2-VL model directory, offline and deterministically.

The result is a complete Hugging Face model directory (config, safetensors weights, byte-level
BPE tokenizer trained locally, chat template, image/video processor) that vLLM serves like a
real Qwen2-VL checkpoint. Same options -> same bytes. Used by the tests (2 layers), the
README's demo and the benchmarks (more layers, long prompts).

    vllm-kvsparse tiny-model OUT_DIR [--layers 2] [--hidden-size 256] [--num-heads 4] ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2's pre-tokenizer regex (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                     r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2-VL-Instruct's chat template: an image becomes <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = ("the a an image picture photo shows describe what is in this of and to with color red "
         "green blue black white cat dog car tree sky house person man woman child table chair "
         "window door road there are two three one on left right top bottom center small large "
         "big bright dark background system user assistant you helpful answer question please "
         "text number 0 1 2 3 4 5 6 7 8 9 . , ? ! :").split()


@dataclass(frozen=True)
class TinyModelSpec:
    layers: int = 2
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vision_depth: int = 2
    max_pixels: int = 448 * 448          # a 448x448 image -> 256 image tokens
    max_position_embeddings: int = 32768
    qk_scale: float = 1.0                # >1 sharpens attention (peaked model for sparsity tests)
    # M-RoPE base. Qwen2-VL's 1e6 leaves the width section (the lowest frequencies) nearly flat
    # across a small image grid, so left and right look alike to every query; at base 10 the
    # synthetic `position` task is learnable (tests/fixtures/tiny-qwen2vl-vqa/README.md).
    rope_theta: float = 1000000.0
    # M-RoPE's split of the head's rotary frequencies into (temporal, height, width) sections,
    # highest frequencies first; None = Qwen2-VL's proportions (16, 24, 24 of 64 at head_dim
    # 128). A wide width section spans high frequencies (which tell left from right inside an
    # image) and near-zero ones (which let a query match a key by content whatever their
    # distance, e.g. a square in any of several pictures), which no single base gives the
    # default narrow width section.
    mrope_section: tuple[int, int, int] | None = None
    dtype: str = "bfloat16"
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mrope_sections(self) -> list[int]:
        hd = self.head_dim
        return list(self.mrope_section or (hd // 8, 3 * hd // 16, 3 * hd // 16))

    def validate(self) -> None:
        if self.hidden_size % self.num_heads or self.head_dim not in (64, 128):
            raise ValueError(f"head_dim = hidden_size / num_heads = "
                             f"{self.hidden_size}/{self.num_heads} must be 64 or 128")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.layers < 1 or self.qk_scale <= 0 or self.rope_theta <= 1:
            raise ValueError("layers must be >= 1, qk_scale > 0 and rope_theta > 1")
        sections = self.mrope_sections
        if len(sections) != 3 or min(sections) < 1 or sum(sections) != self.head_dim // 2:
            raise ValueError(f"mrope_section={self.mrope_section} must be three positive "
                             f"integers summing to head_dim / 2 = {self.head_dim // 2}")


def _corpus(n: int = 4000, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))


def build_tokenizer():
    """A byte-level BPE (vocab ~1000) trained locally, wrapped as Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
              for m in model["merges"]]  # transformers 5 wants tuples
    hf_tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
                            eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            errors="replace", model_max_length=32768)
    hf_tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    hf_tok.eos_token = "<|im_end|>"  # as in Qwen2-VL-Instruct
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build(out_dir: str, spec: TinyModelSpec = TinyModelSpec()) -> str:
    """Write the model directory and return its path."""
    import torch
    from transformers import (GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    spec.validate()
    torch.manual_seed(spec.seed)
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=((len(tok) + 63) // 64) * 64, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
        use_sliding_window=False, max_window_layers=spec.layers,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                         "mrope_section": spec.mrope_sections})
    vision_config = dict(depth=spec.vision_depth, embed_dim=128, hidden_size=spec.hidden_size,
                         mlp_ratio=2, num_heads=4, in_channels=3, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    model = Qwen2VLForConditionalGeneration(config)
    if spec.qk_scale != 1.0:
        _sharpen_attention(model, spec.qk_scale)
    model = model.to(getattr(torch, spec.dtype)).eval()

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=ids["<|endoftext|>"],
                     eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                     pad_token_id=ids["<|endoftext|>"], do_sample=False).save_pretrained(out_dir)
    vision_kw = dict(min_pixels=56 * 56, max_pixels=spec.max_pixels, patch_size=14,
                     temporal_patch_size=2, merge_size=2)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**vision_kw), tokenizer=tok,
                     video_processor=Qwen2VLVideoProcessor(**vision_kw),
                     chat_template=CHAT_TEMPLATE).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "tiny_model_spec.json"), "w") as f:
        json.dump(asdict(spec), f, indent=1, sort_keys=True)
    return out_dir


def grown_layer_count(model_dir: str, ats: list[int]) -> int:
    """The model's decoder layer count after a new layer is inserted at each index of `ats` in
    turn; each must be in 0..the count at that point (the count itself appends)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        return _check_growth(json.load(f)["text_config"]["num_hidden_layers"], ats)


def _check_growth(n: int, ats: list[int]) -> int:
    """`grown_layer_count` on a model of `n` layers: raises on the first index out of range."""
    for at in ats:
        if not 0 <= at <= n:
            raise ValueError(f"--add-layer {','.join(map(str, ats))}: {at} must be in 0..{n} "
                             f"(the model has {n} layers at that point)")
        n += 1
    return n


def add_layer(src_dir: str, out_dir: str, at: int, seed: int = 0) -> str:
    """Copy a model directory with one more decoder layer inserted at index `at`, initialised
    to the identity: its output projections (o_proj, down_proj) and biases are zero, so the
    model answers exactly as before, and its q/k/v/gate/up are N(0, 0.02), so its attention
    starts near-uniform and gets a gradient on every key (a trained head that puts ~0 weight
    on some tokens gets ~0 gradient there and does not learn to look at them)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    with open(os.path.join(src_dir, "config.json")) as f:
        config = json.load(f)
    text = config["text_config"]
    n = text["num_hidden_layers"]
    _check_growth(n, [at])
    # everything but the weights, which are written below
    shutil.copytree(src_dir, out_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(os.path.join(src_dir, "model.safetensors"))
    out, template = {}, {}
    for name, w in weights.items():
        if name.startswith("model.layers."):
            i, rest = name.split(".", 3)[2:]
            out[f"model.layers.{int(i) + (int(i) >= at)}.{rest}"] = w
            if i == "0":
                template[rest] = w
        else:
            out[name] = w
    gen = torch.Generator().manual_seed(seed)
    for rest, w in template.items():
        if "layernorm" in rest:
            new = torch.ones_like(w)
        elif rest.endswith("bias") or rest.startswith(("self_attn.o_proj", "mlp.down_proj")):
            new = torch.zeros_like(w)
        else:
            new = (torch.randn(w.shape, generator=gen) * 0.02).to(w.dtype)
        out[f"model.layers.{at}.{rest}"] = new
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    text.update(num_hidden_layers=n + 1, max_window_layers=n + 1,
                layer_types=["full_attention"] * (n + 1))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    spec_path = os.path.join(out_dir, "tiny_model_spec.json")
    if os.path.isfile(spec_path):
        with open(spec_path) as f:
            spec = json.load(f)
        spec["layers"] = n + 1
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=1, sort_keys=True)
    return out_dir


def _sharpen_attention(model, qk_scale: float) -> None:
    """Scale the language model's q and k projections so logits grow by qk_scale**2 in the
    deepest layer, less in shallower ones: attention becomes peaked, by a different amount per
    layer, which is what ZipVL's adaptive budget reacts to."""
    import torch

    layers = model.model.language_model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            s = qk_scale ** ((i + 1) / len(layers))
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(s)
                if proj.bias is not None:
                    proj.bias.mul_(s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TinyModelSpec()
    parser.add_argument("out_dir", help="directory to write the model into")
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--hidden-size", type=int, default=d.hidden_size)
    parser.add_argument("--num-heads", type=int, default=d.num_heads)
    parser.add_argument("--num-kv-heads", type=int, default=d.num_kv_heads)
    parser.add_argument("--intermediate-size", type=int, default=d.intermediate_size)
    parser.add_argument("--vision-depth", type=int, default=d.vision_depth)
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels,
                        help="image resolution cap (448*448 -> 256 tokens per image)")
    parser.add_argument("--max-position-embeddings", type=int,
                        default=d.max_position_embeddings)
    parser.add_argument("--qk-scale", type=float, default=d.qk_scale,
                        help=">1 makes attention peaked (for sparsity tests and benchmarks)")
    parser.add_argument("--rope-theta", type=float, default=d.rope_theta,
                        help="M-RoPE base (Qwen2-VL's 1e6 by default)")
    parser.add_argument("--mrope-section", type=_sections, default=None, metavar="T,H,W",
                        help="M-RoPE (temporal, height, width) frequency sections, summing to "
                        "head_dim / 2 (default: Qwen2-VL's proportions, 8,12,12 at head_dim 64)")
    parser.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seed", type=int, default=d.seed)


def spec_from_args(args: argparse.Namespace) -> TinyModelSpec:
    return TinyModelSpec(
        layers=args.layers, hidden_size=args.hidden_size, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, intermediate_size=args.intermediate_size,
        vision_depth=args.vision_depth, max_pixels=args.max_pixels,
        max_position_embeddings=args.max_position_embeddings, qk_scale=args.qk_scale,
        rope_theta=args.rope_theta, mrope_section=args.mrope_section, dtype=args.dtype,
        seed=args.seed)


def _sections(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mrope-section {text!r}: expected three integers "
                                         "T,H,W, e.g. 2,2,28") from None
    return t, h, w
