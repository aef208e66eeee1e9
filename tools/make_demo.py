"""Build a tiny, offline Qwen2-VL model family and a synthetic grounding dataset.

The family mirrors a real fine-tuning project on a grounding task
("find the red rectangle" -> bounding box):

* ``base``            the pre-trained model (a full checkpoint).
* ``r1-llm-only``     recipe 1: LoRA adapter on the language model's linear layers only.
* ``r2-vision-only``  recipe 2: full fine-tune of the vision tower (a full checkpoint).
* ``r3-stage1``       recipe 3, stage 1: full fine-tune of the vision tower (a full checkpoint).
* ``r3-stage2``       recipe 3, stage 2: LoRA on the language model, trained on top of ``r3-stage1``.
                      Its ``base_model_name_or_path`` points at a path of the training machine
                      (``/ssd1/team/vlm_outputs/r3-stage1``) that the orchestrator must remap.
* ``r4-joint``        recipe 4: one LoRA adapter on the language model and the vision blocks.

The dataset (``data/grounding.jsonl`` + ``data/images/*.png``) has one record per image:
``{"id", "image" (relative to the jsonl), "bbox" [x1, y1, x2, y2] in pixels, end-exclusive,
"prompt"}``.  Image sizes are multiples of 28 inside the processor's pixel bounds, so the
processor does not resize them (a 112x112 image gives 8x8 patches -> 16 image tokens).

"Training" is simulated: full fine-tunes add seeded noise to the vision weights and LoRA
adapters use ``init_lora_weights=False`` so that ``lora_B`` is non-zero.  Everything is built
from configs (no Hugging Face Hub access): a byte-level BPE tokenizer is trained on a small
synthetic corpus and wrapped as a ``Qwen2Tokenizer`` with Qwen2-VL's special tokens appended
after the BPE vocabulary, as in the real tokenizer.

Usage::

    python -m tools.make_demo --out demo [--samples N] [--seed S]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.utils import logging as hf_logging

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
BPE_VOCAB_SIZE = 480  # 256 byte symbols + merges; the special tokens come after
VOCAB_MULTIPLE = 64  # the embedding is padded past len(tokenizer), like the real model

# Qwen2-VL's chat template (with its default system prompt).
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

# Image processor bounds: images that are multiples of 28 inside these are not resized.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 32
IMAGE_SIZES = [(112, 112), (112, 84), (140, 112), (84, 140)]  # (width, height)

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
PROMPT_TEMPLATES = [
    "Find the {c} rectangle.",
    "Locate the {c} rectangle in the image.",
    "Where is the {c} box?",
    "Give the bounding box of the {c} rectangle.",
]

LLM_MODULES = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION_MODULES = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
JOINT_MODULES = f"(?:{LLM_MODULES})|(?:{VISION_MODULES})"
MODEL_NAMES = ("base", "r1-llm-only", "r2-vision-only", "r3-stage1", "r3-stage2", "r4-joint")
R3_STAGE1_TRAINING_PATH = "/ssd1/team/vlm_outputs/r3-stage1"
VISION_NOISE_STD = 0.02


# ----------------------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """Small synthetic corpus: prompts, chat words, colours, digits and box syntax."""
    lines = [t.format(c=c) for t in PROMPT_TEMPLATES for c in COLORS]
    lines += [
        "system user assistant You are a helpful assistant.",
        "The rectangle is at (12,34),(56,78). The box is here. Answer with its bounding box.",
        "(0,0),(1000,1000) (250,500),(750,999) (101,202),(303,404)",
        "image picture video shape square circle triangle object left right top bottom",
        " ".join(str(i) for i in range(200)),
        "0123456789 ( ) , . ? : [ ] { } \" '",
        "The answer is the bounding box of the target object with its coordinates.",
        "What colour is the shape? Describe the scene, count the objects and point to them.",
        "white black gray pink brown cyan magenta background foreground large small inside outside",
    ]
    return lines * 20


def trained_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE's vocab and merges, trained once per process (seconds on a busy CPU): every tokenizer of the demo
    and of tools/make_families.py's Qwen-tokenizer families shares them. A fresh copy each call."""
    vocab, merges = _cached_bpe()
    return dict(vocab), list(merges)


@functools.lru_cache(maxsize=1)
def _cached_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return _train_bpe()


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with Qwen2's pre-tokenization; return its vocab and merges."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def build_tokenizer() -> Qwen2Tokenizer:
    """A tiny Qwen2 tokenizer: trained BPE + Qwen2-VL special tokens + chat template.

    The special tokens get the ids right after the BPE vocabulary, in Qwen2's order
    (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...).
    """
    vocab, merges = trained_bpe()
    vocab.update({tok: len(vocab) + i for i, tok in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # BPE's (a, b) pairs, which transformers annotates as list[str]
        unk_token=None,  # type: ignore[arg-type]  # no unknown token: transformers accepts None, annotates str
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS,
        padding_side="left",
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor:
    """Qwen2-VL processor with small pixel bounds (112x112 -> 64 patches -> 16 tokens)."""
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor()
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    """Ids of Qwen2-VL's special tokens in ``tokenizer``."""
    convert = tokenizer.convert_tokens_to_ids
    return {t: convert(t) for t in SPECIAL_TOKENS}  # type: ignore[misc]  # transformers: a str's id as int | list[int]


# ----------------------------------------------------------------------------- model


def build_config(ids: dict[str, int], n_tokens: int) -> Qwen2VLConfig:
    """A tiny Qwen2-VL config; head_dim 16 so mrope_section [2, 3, 3] sums to 16 / 2."""
    vocab_size = -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_generation_config(ids: dict[str, int]) -> GenerationConfig:
    """Greedy generation stopping at ``<|im_end|>`` or ``<|endoftext|>``."""
    return GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )


def build_base_model(config: Qwen2VLConfig, gen: GenerationConfig, seed: int) -> Qwen2VLForConditionalGeneration:
    """Randomly initialised tiny Qwen2-VL in float32 and eval mode."""
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model = model.to(torch.float32).eval()  # type: ignore[arg-type]  # transformers' to() is @wraps-typed, as unbound
    model.generation_config = gen
    return model


def perturb_vision(model: Qwen2VLForConditionalGeneration, seed: int) -> Qwen2VLForConditionalGeneration:
    """Copy of ``model`` whose vision tower got seeded Gaussian noise (a fake full fine-tune)."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tuned.model.visual.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * VISION_NOISE_STD)
    return tuned


def save_full(model: Qwen2VLForConditionalGeneration, processor: Qwen2VLProcessor, path: Path) -> Path:
    """Save a full checkpoint (safetensors) with its processor and generation config."""
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- adapters


def save_lora(
    model: Qwen2VLForConditionalGeneration,
    path: Path,
    *,
    target: str,
    seed: int,
    base_path: str,
) -> Path:
    """Create a LoRA adapter (r=8, alpha=16, non-zero B) on a copy of ``model`` and save it."""
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=target,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
    cfg_file = path / "adapter_config.json"
    adapter_cfg = json.loads(cfg_file.read_text())
    adapter_cfg["base_model_name_or_path"] = base_path
    cfg_file.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------- dataset


def _place(rng: random.Random, size: tuple[int, int], taken: list[list[int]]) -> list[int] | None:
    """A random box [x1, y1, x2, y2] (end-exclusive) clear of ``taken``, or None if none was found."""
    width, height = size
    for _ in range(100):
        w, h = rng.randint(14, width // 2), rng.randint(14, height // 2)
        x1, y1 = rng.randint(0, width - w), rng.randint(0, height - h)
        box = [x1, y1, x1 + w, y1 + h]
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return box
    return None


def make_sample(rng: random.Random, index: int, image_dir: Path) -> dict[str, Any]:
    """Draw one image (target + 1-2 distractors of other colours) and return its jsonl record."""
    size = IMAGE_SIZES[index % len(IMAGE_SIZES)]
    names = rng.sample(sorted(COLORS), 1 + rng.randint(1, 2))
    shade = rng.randint(225, 250)
    image = Image.new("RGB", size, (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    boxes: list[list[int]] = []
    for name in names:
        box = _place(rng, size, boxes)
        if box is not None:  # always found for the target (drawn first on an empty image)
            boxes.append(box)
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=COLORS[name])
    sample_id = f"s{index:03d}"
    image.save(image_dir / f"{sample_id}.png")
    prompt = rng.choice(PROMPT_TEMPLATES).format(c=names[0])
    return {"id": sample_id, "image": f"images/{sample_id}.png", "bbox": boxes[0], "prompt": prompt}


def build_dataset(data_dir: Path, n_samples: int, seed: int) -> Path:
    """Write ``grounding.jsonl`` and ``images/*.png``; bboxes are pixel [x1, y1, x2, y2]."""
    image_dir = data_dir / "images"
    image_dir.mkdir(parents=True)
    rng = random.Random(seed)
    records = [make_sample(rng, i, image_dir) for i in range(n_samples)]
    path = data_dir / "grounding.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- entry points


def _clean(out: Path) -> None:
    """Remove what a previous build left in ``out``."""
    for name in ("models", "data"):
        if (out / name).exists():
            shutil.rmtree(out / name)


def build_models(models_dir: Path, seed: int) -> dict[str, Path]:
    """Build and save the whole model family; return ``{name: path}``."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    ids = token_ids(tokenizer)
    base = build_base_model(build_config(ids, len(tokenizer)), build_generation_config(ids), seed)
    stage1 = perturb_vision(base, seed + 3)
    paths = {name: models_dir / name for name in MODEL_NAMES}
    base_path = str(paths["base"])
    save_full(base, processor, paths["base"])
    save_lora(base, paths["r1-llm-only"], target=LLM_MODULES, seed=seed + 1, base_path=base_path)
    save_full(perturb_vision(base, seed + 2), processor, paths["r2-vision-only"])
    save_full(stage1, processor, paths["r3-stage1"])
    save_lora(stage1, paths["r3-stage2"], target=LLM_MODULES, seed=seed + 4, base_path=R3_STAGE1_TRAINING_PATH)
    save_lora(base, paths["r4-joint"], target=JOINT_MODULES, seed=seed + 5, base_path=base_path)
    return paths


def build_demo(out: Path, *, n_samples: int = 24, seed: int = 0) -> dict[str, Any]:
    """Build the demo under ``out``; return ``{"models": {name: path}, "dataset": path}``."""
    out = Path(out).resolve()
    _clean(out)
    models_dir = out / "models"
    models_dir.mkdir(parents=True)
    model_paths = build_models(models_dir, seed)
    dataset = build_dataset(out / "data", n_samples, seed)
    return {"models": model_paths, "dataset": dataset}


def main(argv: list[str] | None = None) -> int:
    """CLI: build the demo and print a short summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced if it exists)")
    parser.add_argument("--samples", type=int, default=24, help="number of dataset samples")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    result = build_demo(args.out, n_samples=args.samples, seed=args.seed)
    print(f"built demo in {time.perf_counter() - start:.1f}s under {args.out.resolve()}")
    for name, path in result["models"].items():
        print(f"  model {name:15s} {path}")
    print(f"  dataset {result['dataset']} ({args.samples} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
