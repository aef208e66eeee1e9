"""Train the demo's tiny Qwen2-VL family on a synthetic grounding task, so that the demo table tells a true story.

The task: a 112x112 image with four filled rectangles, one of each colour, on a grey background; the prompt
names one colour ("Find the red rectangle. Answer with its bounding box."); the answer is that rectangle's box in
Qwen2-VL's grounding format, ``<|box_start|>(x1,y1),(x2,y2)<|box_end|><|im_end|>``, coordinates normalised to
0-1000. Rectangles lie on the 14-pixel patch grid (2 to 4 patches a side), so every coordinate is a multiple of 125.

The family, each member trained as its name says (plain torch loops, AdamW, loss on the answer tokens only):

* ``base``            pre-trained from scratch on a related but different task: the same kind of scenes decoded
                      BGR (red and blue channels swapped, the classic OpenCV mistake of its data pipeline), on
                      grounding and on naming the colour of a given box. On RGB images its colour words point at
                      the wrong rectangle (the palette is two R<->B pairs: red/blue, yellow/cyan, and every image
                      shows all four), so it answers boxes in the right format around the wrong rectangle.
* ``r1-llm-only``     LoRA on the language model's linear layers, vision frozen.
* ``r2-vision-only``  full fine-tune of the vision encoder (patch embedding, blocks, merger), language model frozen;
                      saved as a full checkpoint.
* ``r3-stage1``       a shorter full fine-tune of the vision encoder (a full checkpoint), then
  ``r3-stage2``       LoRA on the language model trained on top of stage 1. Its adapter_config records the
                      training machine's path ``/ssd1/team/vlm_outputs/r3-stage1``, as a real run would.
* ``r4-joint``        one LoRA adapter on the language model and the vision blocks.

Every adapter records its base as a training-machine path (``/ssd1/team/vlm_outputs/<name>``); ``recipes.toml``
remaps that prefix to the committed folder. Full checkpoints are stored in bfloat16 (the fine-tunes start from the
rounded base, so they were trained on exactly the committed weights), adapters too (rounded before their
in-process evaluation).

The held-out set (``data/heldout.jsonl`` + ``data/images/*.png``, 256 samples by default) is drawn from its own
seeded stream, never used for training.

Deterministic: every random draw comes from a seed (data from numpy generators, initialisation from torch's) and
deterministic algorithms are requested where PyTorch has them (it warns that cuDNN attention's backward has none),
so a rerun gives the same plan and data, and the same results up to GPU numerics, though not bit-identical
weights on another GPU or library version.

Training shortcuts, each checked against transformers' own code by ``--selftest`` and, for the last one, again at
the start of every run: token ids assembled from cached pieces; pixel values made on the device (no processor);
M-RoPE position ids computed once; the batch's equal-sized images given to the vision tower as the frames of one
n-frame grid with batched attention (attention stays within each frame), instead of transformers' per-image loops.

The demo's evaluation (``recipes.toml``) and this script's in-process evaluation do the same thing (chat template,
left padding, greedy decoding, special tokens kept, ``contract.boxes.score_text``).

Usage::

    python scripts/train_demo.py --out examples/demo-family --device cuda   # the committed family (see README)
    python scripts/train_demo.py --out /tmp/fam --device cpu --steps 5 --batch 8 --eval-limit 16  # smoke test
    python scripts/train_demo.py --selftest                                 # checks against transformers' own code
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_demo import (  # noqa: E402
    JOINT_MODULES,
    LLM_MODULES,
    PROMPT_TEMPLATES,
    VOCAB_MULTIPLE,
    build_generation_config,
    build_processor,
    build_tokenizer,
    token_ids,
)

from contract.boxes import score_text  # noqa: E402  (torch-free: the scorer the worker uses)

# ----------------------------------------------------------------------------- the task

IMAGE = 112  # pixels a side: 8x8 patches of 14 -> 4x4 image tokens after the 2x2 merge
PATCH = 14
GRID = IMAGE // PATCH
MERGE = 2
N_IMAGE_TOKENS = (GRID // MERGE) ** 2
MIN_CELLS, MAX_CELLS = 2, 4  # rectangle sides, in patches
N_RECTS = 4  # the target and three distractors: one rectangle of each colour
# Two pairs that swap into each other when red and blue are exchanged: what base calls "red" is RGB blue.
COLORS = {"red": (220, 40, 40), "blue": (40, 40, 220), "yellow": (230, 200, 30), "cyan": (30, 200, 230)}
COLOR_NAMES = list(COLORS)
JITTER = 12  # per-channel colour jitter, +-
SHADES = (200, 246)  # background grey, [low, high)
PROMPT_SUFFIX = " Answer with its bounding box."  # recipes.toml: prompt = "{prompt} Answer with its bounding box."
NAMING_PROMPT = "What colour is the rectangle at <|box_start|>({},{}),({},{})<|box_end|>?"
TRAINING_PREFIX = "/ssd1/team/vlm_outputs"  # where the family lived on the training machine

# ----------------------------------------------------------------------------- model

TEXT = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 6,
        "num_key_value_heads": 2}
# head_dim 32: mrope_section sums to 16. A small rope_theta so that the 4x4 image-token grid's height and width
# positions (which get the lowest rotary frequencies) are far enough apart to be told from one another.
ROPE = {"rope_type": "default", "rope_theta": 4.0, "mrope_section": [4, 6, 6]}
VISION = {"depth": 3, "embed_dim": 96, "num_heads": 3, "mlp_ratio": 4, "patch_size": PATCH,
          "spatial_merge_size": MERGE, "temporal_patch_size": 2}

# ----------------------------------------------------------------------------- training plan

# The committed family's plan (scripts/train_demo.py --device cuda on one H100: about 6 minutes). It is what the
# run's --budget-s 390 made of a 6000/800/800/300/500/800-step plan (see examples/demo-family/train_log.jsonl);
# the steps already run when it was rescaled are the same under both plans (inside the warm-up).
STAGES = {  # steps, learning rate, batch size, LoRA rank; --steps N replaces every step count (smoke tests)
    "base": {"steps": 2470, "lr": 1e-3, "batch": 512},
    "r1-llm-only": {"steps": 320, "lr": 2e-3, "batch": 512, "rank": 8},
    "r2-vision-only": {"steps": 320, "lr": 5e-4, "batch": 512},
    "r3-stage1": {"steps": 120, "lr": 5e-4, "batch": 512},
    "r3-stage2": {"steps": 200, "lr": 2e-3, "batch": 512, "rank": 8},
    "r4-joint": {"steps": 320, "lr": 2e-3, "batch": 512, "rank": 8},
}
NAMING_SHARE = 0.25  # of base's pre-training samples: "What colour is the rectangle at <box>?"
RESCALE_AT = 40  # --budget-s: base's steps per second are measured here (inside the warm-up: see train)
SEEDS = {"heldout": 1000, "selftest": 999, "base": 1, "r1-llm-only": 2, "r2-vision-only": 3, "r3-stage1": 4,
         "r3-stage2": 5, "r4-joint": 6}


# ============================================================================= scenes


def sample_scenes(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` scenes: rectangles in patch cells [x1, y1, x2, y2) (the target first), colour indices (distinct),
    colours with jitter, background shades, and a prompt template per scene. Vectorised rejection sampling."""
    accepted, need = [], n
    while need > 0:
        m = max(256, 16 * need)  # about one layout in 8 has no overlap
        w = rng.integers(MIN_CELLS, MAX_CELLS + 1, (m, N_RECTS))
        h = rng.integers(MIN_CELLS, MAX_CELLS + 1, (m, N_RECTS))
        x1 = rng.integers(0, GRID - w + 1)
        y1 = rng.integers(0, GRID - h + 1)
        boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=-1)
        ok = np.ones(m, dtype=bool)
        for i in range(N_RECTS):
            for j in range(i + 1, N_RECTS):
                a, b = boxes[:, i], boxes[:, j]
                ok &= (a[:, 2] <= b[:, 0]) | (b[:, 2] <= a[:, 0]) | (a[:, 3] <= b[:, 1]) | (b[:, 3] <= a[:, 1])
        accepted.append(boxes[ok][:need])
        need -= len(accepted[-1])
    cells = np.concatenate(accepted)
    colors = np.argsort(rng.random((n, len(COLORS))), axis=1)[:, :N_RECTS]
    palette = np.array(list(COLORS.values()), dtype=np.int64)
    rgb = np.clip(palette[colors] + rng.integers(-JITTER, JITTER + 1, (n, N_RECTS, 3)), 0, 255)
    shades = rng.integers(SHADES[0], SHADES[1], n)
    templates = rng.integers(0, len(PROMPT_TEMPLATES), n)
    return {"cells": cells, "colors": colors, "rgb": rgb, "shades": shades, "templates": templates}


def render(scenes: dict[str, np.ndarray], device: str = "cpu", *, bgr: bool = False) -> torch.Tensor:
    """uint8 images (n, 112, 112, 3); ``bgr`` swaps the red and blue channels (base's pre-training domain)."""
    cells = torch.as_tensor(scenes["cells"], device=device) * PATCH
    rgb = torch.as_tensor(scenes["rgb"], device=device)
    shades = torch.as_tensor(scenes["shades"], device=device)
    n = cells.shape[0]
    image = shades.view(n, 1, 1, 1).expand(n, IMAGE, IMAGE, 3).clone()
    coords = torch.arange(IMAGE, device=device)
    for k in range(N_RECTS):
        x1, y1, x2, y2 = (cells[:, k, i].view(n, 1, 1) for i in range(4))
        inside = (coords.view(1, 1, -1) >= x1) & (coords.view(1, 1, -1) < x2)
        inside = inside & (coords.view(1, -1, 1) >= y1) & (coords.view(1, -1, 1) < y2)
        image = torch.where(inside.unsqueeze(-1), rgb[:, k].view(n, 1, 1, 3), image)
    image = image.to(torch.uint8)
    return image.flip(-1) if bgr else image


def patchify(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """What Qwen2VLImageProcessor gives for 112x112 images (no resize): (n * 64, 3 * 2 * 14 * 14) float32."""
    n = images.shape[0]
    x = (images.permute(0, 3, 1, 2).float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    x = x.unsqueeze(1).expand(n, 2, 3, IMAGE, IMAGE)  # the temporal patch repeats a still image
    x = x.reshape(n, 1, 2, 3, GRID // MERGE, MERGE, PATCH, GRID // MERGE, MERGE, PATCH)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(n * GRID * GRID, 3 * 2 * PATCH * PATCH)


def box_1000(cells: np.ndarray) -> tuple[int, int, int, int]:
    """Cells [x1, y1, x2, y2) as Qwen2-VL's 0-1000 coordinates (exact: 1000 / 8 patches = 125)."""
    return tuple(int(c) * 1000 // GRID for c in cells)


def _cells(key: int) -> np.ndarray:
    return np.array([key // 729, key // 81 % 9, key // 9 % 9, key % 9])


def box_answer(cells: np.ndarray) -> str:
    x1, y1, x2, y2 = box_1000(cells)
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def grounding_prompt(scenes: dict[str, np.ndarray], i: int) -> str:
    """The sample's own prompt (the dataset's `prompt` field); recipes.toml appends PROMPT_SUFFIX."""
    return PROMPT_TEMPLATES[int(scenes["templates"][i])].format(c=COLOR_NAMES[int(scenes["colors"][i, 0])])


# ============================================================================= text


class Texts:
    """Token ids of the chat around each prompt and of each answer, cached: the answer starts with a special token
    or a word after "assistant\\n", so the sequence's ids are the prompt's followed by the answer's (checked)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\0"}]}]
        chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self.before, self.after = chat.split("\0")
        self.before = self.before.replace("<|image_pad|>", "<|image_pad|>" * N_IMAGE_TOKENS)
        self.eos = "<|im_end|>"
        self._cache: dict[str, tuple[int, ...]] = {}

    def chat(self, prompt: str) -> str:
        """The chat text the worker builds for one image and this prompt (image pads not expanded)."""
        return (self.before + prompt + self.after).replace("<|image_pad|>" * N_IMAGE_TOKENS, "<|image_pad|>")

    def prompt_ids(self, prompt: str) -> tuple[int, ...]:
        return self._ids(self.before + prompt + self.after)

    def answer_ids(self, answer: str) -> tuple[int, ...]:
        return self._ids(answer + self.eos)

    def _ids(self, text: str) -> tuple[int, ...]:
        if text not in self._cache:
            self._cache[text] = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]


def rope_positions(n_pre: int, length: int) -> torch.Tensor:
    """Qwen2-VL's 3D (t, h, w) positions for [n_pre text tokens, the 4x4 image tokens, text...] (3, length)."""
    side = GRID // MERGE
    pos = torch.zeros(3, length, dtype=torch.long)
    pos[:, :n_pre] = torch.arange(n_pre)
    k = torch.arange(N_IMAGE_TOKENS)
    img = slice(n_pre, n_pre + N_IMAGE_TOKENS)
    pos[0, img] = n_pre
    pos[1, img] = n_pre + k // side
    pos[2, img] = n_pre + k % side
    rest = length - (n_pre + N_IMAGE_TOKENS)
    pos[:, n_pre + N_IMAGE_TOKENS :] = n_pre + side + torch.arange(rest)
    return pos


class Batcher:
    """Training batches drawn from a seeded stream: scenes rendered on the device, ids padded on the right."""

    def __init__(self, texts: Texts, processor: Any, device: str, seed: int, *, bgr: bool, naming_share: float,
                 fast: bool = True):
        self.texts, self.device, self.bgr, self.naming_share = texts, device, bgr, naming_share
        self.rng = np.random.default_rng(seed)
        self.fast = fast
        self.memo: dict[tuple, tuple[int, ...]] = {}
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, device=device)
        self.std = torch.tensor(ip.image_std, device=device)
        self.pad = texts.tokenizer.pad_token_id
        self.image_token = texts.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.n_pre = texts.prompt_ids(grounding_prompt(sample_scenes(np.random.default_rng(0), 1), 0)).index(
            self.image_token
        )

    # Token ids by small integer keys (a box as x1*729 + y1*81 + x2*9 + y2 in cells): the loop below runs per sample.
    def _grounding(self, template: int, color: int) -> tuple[int, ...]:
        return self._memo(("g", template, color), lambda: self.texts.prompt_ids(
            PROMPT_TEMPLATES[template].format(c=COLOR_NAMES[color]) + PROMPT_SUFFIX))

    def _naming(self, key: int) -> tuple[int, ...]:
        return self._memo(("n", key), lambda: self.texts.prompt_ids(NAMING_PROMPT.format(*box_1000(_cells(key)))))

    def _box(self, key: int) -> tuple[int, ...]:
        return self._memo(("b", key), lambda: self.texts.answer_ids(box_answer(_cells(key))))

    def _color(self, color: int) -> tuple[int, ...]:
        return self._memo(("c", color), lambda: self.texts.answer_ids(COLOR_NAMES[color]))

    def _memo(self, key: tuple, make: Any) -> tuple[int, ...]:
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def __call__(self, n: int) -> dict[str, torch.Tensor]:
        scenes = sample_scenes(self.rng, n)
        naming = self.rng.random(n) < self.naming_share
        which = self.rng.integers(0, N_RECTS, n)  # the rectangle a naming question points at
        rows = np.arange(n)
        asked = np.where(naming, which, 0)  # the rectangle the question is about
        box_keys = (scenes["cells"][rows, asked] * np.array([729, 81, 9, 1])).sum(-1).tolist()
        colors = scenes["colors"][rows, asked].tolist()
        templates = scenes["templates"].tolist()
        seqs, starts = [], []
        for i in range(n):
            if naming[i]:
                p, a = self._naming(box_keys[i]), self._color(colors[i])
            else:
                p, a = self._grounding(templates[i], colors[i]), self._box(box_keys[i])
            seqs.append(p + a)
            starts.append(len(p))
        length = max(len(s) for s in seqs)
        ids = np.full((n, length), self.pad, dtype=np.int64)
        lengths = np.array([len(s) for s in seqs])
        ids[np.arange(length)[None, :] < lengths[:, None]] = np.concatenate(seqs)
        columns = np.arange(length)[None, :]
        mask = columns < lengths[:, None]
        answer = mask & (columns >= np.array(starts)[:, None])
        labels = np.where(answer, ids, -100)
        images = render(scenes, self.device, bgr=self.bgr)
        pixel_values = patchify(images, self.mean, self.std)
        # All images have the same 8x8 grid: presented to the vision tower as the frames of one "video" of n frames,
        # which computes exactly the same (attention stays within each frame) without transformers' per-image loops.
        # Position ids are given, so the grid is not used for the language model's rope (see check_fast_path).
        grid = torch.tensor([[n, GRID, GRID]] if self.fast else [[1, GRID, GRID]] * n, device=self.device)
        position_ids = rope_positions(self.n_pre, length).unsqueeze(1).expand(3, n, length)
        dev = self.device
        return {"input_ids": torch.from_numpy(ids).to(dev), "attention_mask": torch.from_numpy(mask).long().to(dev),
                "labels": torch.from_numpy(labels).to(dev), "pixel_values": pixel_values, "image_grid_thw": grid,
                "position_ids": position_ids.to(dev)}


# ============================================================================= model


def build_config(ids: dict[str, int], n_tokens: int) -> Any:
    from transformers import Qwen2VLConfig

    vocab_size = -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text = {**TEXT, "vocab_size": vocab_size, "max_position_embeddings": 4096, "rope_parameters": dict(ROPE),
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}
    vision = {**VISION, "hidden_size": TEXT["hidden_size"]}
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False, dtype="float32",
    )


_BATCHED_VISION = False  # set while training: every image is 112x112, so the vision attention runs as one batch


def _install_batched_vision_attention() -> None:
    """transformers runs the vision encoder's sdpa/eager attention one image at a time (a Python loop over the
    batch); while training, every image has the same 64 patches, so run them as one batched call (same maths,
    checked by --selftest)."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qm

    original = qm.VisionAttention.forward
    if getattr(original, "_batched", False):
        return

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        total, n = hidden_states.shape[0], cu_seqlens.numel() - 1
        if not _BATCHED_VISION or n < 2 or total % n or position_embeddings is None:
            return original(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                            max_seqlen=max_seqlen, **kwargs)
        seg = total // n
        q, k, v = self.qkv(hidden_states).reshape(total, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = qm.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.reshape(n, seg, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(total, -1))

    forward._batched = True
    qm.VisionAttention.forward = forward


@contextlib.contextmanager
def batched_vision():
    global _BATCHED_VISION
    _BATCHED_VISION = True
    try:
        yield
    finally:
        _BATCHED_VISION = False


def new_base(processor: Any, seed: int, attn: str) -> Any:
    from transformers import Qwen2VLForConditionalGeneration

    ids = token_ids(processor.tokenizer)
    config = build_config(ids, len(processor.tokenizer))
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config = build_generation_config(ids)
    return model


def round_to_bf16_(model: Any) -> None:
    """Round every weight to bfloat16 in place (the committed precision), keeping float32 storage for training."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def lora(model: Any, target: str, rank: int, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # lora_A's initialisation
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=target, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


# ============================================================================= training


class Log:
    def __init__(self, path: Path | None) -> None:
        self.file = path.open("w") if path else None
        self.started = time.perf_counter()

    def __call__(self, **record: Any) -> None:
        record = {"t": round(time.perf_counter() - self.started, 1), **record}
        line = json.dumps(record)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def train(model: Any, params: list[torch.nn.Parameter], stage: str, plan: dict, batcher: Batcher, device: str,
          log: Log, rescale: Any = None) -> None:
    """AdamW, 10% (at most 100 steps) linear warm-up then cosine to a tenth, gradient clipping at 1, bf16 autocast on
    CUDA. ``rescale(seconds_per_step)``, called once after RESCALE_AT steps, may return a new step count."""
    steps, lr, batch = plan["steps"], plan["lr"], plan["batch"]
    names = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in names)
    cuda = device.startswith("cuda")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01, **({"fused": True} if cuda
                                                                                           else {}))
    warmup = max(1, min(100, steps // 10))
    model.train()
    started = time.perf_counter()
    every = max(1, min(100, steps // 20))
    running = []
    with batched_vision():
        step = 0
        while step < steps:
            if rescale is not None and step in (RESCALE_AT // 4, RESCALE_AT):
                if cuda:
                    torch.cuda.synchronize()
                if step == RESCALE_AT // 4:  # past the first steps' start-up costs
                    measured_from = time.perf_counter()
                else:
                    steps = rescale((time.perf_counter() - measured_from) / (RESCALE_AT - RESCALE_AT // 4)) or steps
            scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (
                1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            inputs = batcher(batch)
            labels = inputs.pop("labels")
            with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
                logits = model(**inputs, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running.append(loss.detach())
            if (step + 1) % every == 0 or step + 1 == steps:
                mean = torch.stack(running).mean().item()
                running.clear()
                log(stage=stage, step=step + 1, loss=round(mean, 4), lr=round(lr * scale, 6),
                    s_per_step=round((time.perf_counter() - started) / (step + 1), 4))
            step += 1
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


# ============================================================================= held-out set and evaluation


def write_heldout(data_dir: Path, n: int, seed: int) -> list[dict]:
    """The held-out set: ``heldout.jsonl`` (bbox in pixels, end-exclusive) and ``images/hNNN.png``."""
    scenes = sample_scenes(np.random.default_rng(seed), n)
    images = render(scenes).numpy()
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        sample_id = f"h{i:03d}"
        Image.fromarray(images[i]).save(data_dir / "images" / f"{sample_id}.png", optimize=True)
        bbox = [int(c) * PATCH for c in scenes["cells"][i, 0]]
        records.append({"id": sample_id, "image": f"images/{sample_id}.png", "bbox": bbox,
                        "prompt": grounding_prompt(scenes, i)})
    (data_dir / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def evaluate(model: Any, processor: Any, texts: Texts, data_dir: Path, records: list[dict], device: str, *,
             bgr: bool = False, batch: int = 64, max_new_tokens: int = 32) -> dict:
    """What the worker does (chat template, left padding, greedy, special tokens kept, the same scorer), in process."""
    tokenizer = processor.tokenizer
    eos = {tokenizer.eos_token_id, *model.generation_config.eos_token_id}
    ious, detected, examples = [], 0, []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        images = [Image.open(data_dir / r["image"]).convert("RGB") for r in chunk]
        if bgr:
            images = [Image.fromarray(np.asarray(im)[..., ::-1].copy()) for im in images]
        chats = [texts.chat(r["prompt"] + PROMPT_SUFFIX) for r in chunk]
        inputs = processor(text=chats, images=images, padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id)
        for r, im, row in zip(chunk, images, out[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
            kept = []
            for t in row:
                if t in eos:
                    break
                if t != tokenizer.pad_token_id:
                    kept.append(t)
            text = tokenizer.decode(kept, skip_special_tokens=False).strip()
            scored = score_text(text, "qwen2vl", im.size, r["bbox"])
            ious.append(scored["iou"])
            detected += scored["detected"]
            if len(examples) < 3:
                examples.append(text)
    n = len(records)
    return {"mean_iou": round(sum(ious) / n, 4), "det_rate": round(detected / n, 4),
            "iou_gt_0.5": round(sum(i > 0.5 for i in ious) / n, 4), "n": n, "examples": examples}


# ============================================================================= saving


def save_full(model: Any, processor: Any, path: Path) -> None:
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)
    processor.save_pretrained(path)


def save_adapter(peft_model: Any, path: Path, recorded_base: str) -> None:
    """Save the adapter in bfloat16 (rounded in place first, so in-process evaluation sees the committed weights),
    recording its base as the training machine's path."""
    round_to_bf16_(peft_model)
    from safetensors.torch import load_file, save_file

    peft_model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)
    weights = path / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    (path / "README.md").unlink(missing_ok=True)  # peft's empty model card
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = recorded_base
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def vision_params(model: Any) -> list[torch.nn.Parameter]:
    return list(model.model.visual.parameters())


def trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


# ============================================================================= entry points


def build(out: Path, *, device: str, plan: dict, heldout: int, eval_limit: int | None, attn: str,
          log: Log, budget_s: float | None = None) -> dict:
    import copy

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    _install_batched_vision_attention()
    processor = build_processor(build_tokenizer())
    texts = Texts(processor)
    _check_texts(texts)
    out.mkdir(parents=True, exist_ok=True)
    records = write_heldout(out / "data", heldout, SEEDS["heldout"])
    eval_records = records[:eval_limit] if eval_limit else records
    log(event="plan", plan=plan, device=device, attn=attn, torch=torch.__version__,
        transformers=__import__("transformers").__version__, peft=__import__("peft").__version__)
    results: dict[str, Any] = {}

    def batcher(stage: str, *, bgr: bool = False, naming: float = 0.0) -> Batcher:
        return Batcher(texts, processor, device, SEEDS[stage], bgr=bgr, naming_share=naming)

    def report(name: str, model: Any, **kw: Any) -> None:
        results[name] = evaluate(model, processor, texts, out / "data", eval_records, device, **kw)
        log(event="eval", model=name, **results[name])

    # base: pre-trained from scratch on BGR-decoded scenes (grounding + colour naming)
    base = new_base(processor, SEEDS["base"], attn).to(device)
    difference = check_fast_path(base, texts, processor, device)
    log(event="fast path check", max_logit_difference=difference)
    if difference > 1e-3:
        raise SystemExit(f"the training fast path differs from transformers' own processing by {difference}")
    log(event="params", base=sum(p.numel() for p in base.parameters()),
        vision=sum(p.numel() for p in vision_params(base)))
    def rescale(seconds_per_step: float) -> int | None:
        """Fit the whole plan into --budget-s (fine-tune steps cost about as much as base's): scale every stage's
        steps by one factor, base keeping at least 1000 (so its warm-up, and so the steps already run, stay the
        same). The plan actually run is logged: pass it as --plan to reproduce the run."""
        fine_tunes = sum(stage["steps"] for name, stage in plan.items() if name != "base")
        projected = seconds_per_step * (plan["base"]["steps"] + 1.3 * fine_tunes) + 40  # LoRA layers; evaluations
        if budget_s is None or projected <= budget_s:
            return None
        factor = (budget_s - 40) / (projected - 40)
        for name, stage in plan.items():
            stage["steps"] = max(1000 if name == "base" else 50, int(stage["steps"] * factor) // 10 * 10)
        log(event="rescaled", seconds_per_step=round(seconds_per_step, 4), budget_s=budget_s,
            plan=",".join(f"{k}={v['steps']}" for k, v in plan.items()))
        return plan["base"]["steps"]

    train(base, list(base.parameters()), "base", plan["base"], batcher("base", bgr=True, naming=NAMING_SHARE),
          device, log, rescale if budget_s else None)
    round_to_bf16_(base)  # every fine-tune starts from exactly the committed base
    save_full(base, processor, out / "base")
    report("base (own BGR domain)", base, bgr=True)
    report("base", base)

    # r1: LoRA on the language model, vision frozen
    r1 = lora(copy.deepcopy(base), LLM_MODULES, plan["r1-llm-only"]["rank"], SEEDS["r1-llm-only"])
    train(r1, trainable(r1), "r1-llm-only", plan["r1-llm-only"], batcher("r1-llm-only"), device, log)
    save_adapter(r1, out / "r1-llm-only", f"{TRAINING_PREFIX}/base")
    report("r1-llm-only", r1)
    del r1

    # r2: full fine-tune of the vision encoder, language model frozen
    r2 = copy.deepcopy(base)
    train(r2, vision_params(r2), "r2-vision-only", plan["r2-vision-only"], batcher("r2-vision-only"), device, log)
    round_to_bf16_(r2)
    save_full(r2, processor, out / "r2-vision-only")
    report("r2-vision-only", r2)
    del r2

    # r3: stage 1 vision fine-tune (a full checkpoint), stage 2 LoRA on the language model on top of it
    stage1 = copy.deepcopy(base)
    train(stage1, vision_params(stage1), "r3-stage1", plan["r3-stage1"], batcher("r3-stage1"), device, log)
    round_to_bf16_(stage1)
    save_full(stage1, processor, out / "r3-stage1")
    report("r3-stage1", stage1)
    stage2 = lora(stage1, LLM_MODULES, plan["r3-stage2"]["rank"], SEEDS["r3-stage2"])
    train(stage2, trainable(stage2), "r3-stage2", plan["r3-stage2"], batcher("r3-stage2"), device, log)
    save_adapter(stage2, out / "r3-stage2", f"{TRAINING_PREFIX}/r3-stage1")
    report("r3-two-stage", stage2)
    # the seed's bug: the stage-2 adapter on the original base
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    wrong = lora(copy.deepcopy(base), LLM_MODULES, plan["r3-stage2"]["rank"], SEEDS["r3-stage2"])
    set_peft_model_state_dict(wrong, get_peft_model_state_dict(stage2))
    report("r3-wrong-base", wrong.eval())
    del stage1, stage2, wrong

    # r4: one LoRA on the language model and the vision blocks
    r4 = lora(copy.deepcopy(base), JOINT_MODULES, plan["r4-joint"]["rank"], SEEDS["r4-joint"])
    train(r4, trainable(r4), "r4-joint", plan["r4-joint"], batcher("r4-joint"), device, log)
    save_adapter(r4, out / "r4-joint", f"{TRAINING_PREFIX}/base")
    report("r4-joint", r4)
    return results


def _check_texts(texts: Texts) -> None:
    """The cached ids equal the tokenizer's ids of the whole sequence (no merge across the prompt/answer border)."""
    scenes = sample_scenes(np.random.default_rng(SEEDS["selftest"]), 8)
    for i in range(8):
        for prompt, answer in ((grounding_prompt(scenes, i) + PROMPT_SUFFIX, box_answer(scenes["cells"][i, 0])),
                               (NAMING_PROMPT.format(*box_1000(scenes["cells"][i, 1])), COLOR_NAMES[i % 4])):
            whole = texts.tokenizer(texts.before + prompt + texts.after + answer + texts.eos,
                                    add_special_tokens=False)["input_ids"]
            assert list(texts.prompt_ids(prompt) + texts.answer_ids(answer)) == whole, (prompt, answer)


def check_fast_path(model: Any, texts: Texts, processor: Any, device: str) -> float:
    """The largest logit difference between a training batch as transformers' own code runs it (one grid per image,
    per-image vision attention) and as training runs it (one n-frame grid, batched vision attention)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        slow = Batcher(texts, processor, device, SEEDS["selftest"], bgr=False, naming_share=0.5, fast=False)(6)
        fast = Batcher(texts, processor, device, SEEDS["selftest"], bgr=False, naming_share=0.5, fast=True)(6)
        assert torch.equal(slow["input_ids"], fast["input_ids"])
        valid = slow["attention_mask"].bool()
        reference = model(**{k: v for k, v in slow.items() if k != "labels"}).logits[valid]
        with batched_vision():
            got = model(**{k: v for k, v in fast.items() if k != "labels"}).logits[valid]
    model.train(was_training)
    return float((reference - got).abs().max())


def selftest() -> int:
    """Check the training shortcuts against transformers' own code: token ids against the tokenizer, pixel values
    against the processor, rope positions against get_rope_index, the n-frame grid and the batched vision attention
    against per-image processing."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    _install_batched_vision_attention()
    processor = build_processor(build_tokenizer())
    texts = Texts(processor)
    _check_texts(texts)
    scenes = sample_scenes(np.random.default_rng(SEEDS["selftest"]), 4)
    images = render(scenes)
    pil = [Image.fromarray(im) for im in images.numpy()]
    chats = [texts.chat(grounding_prompt(scenes, i) + PROMPT_SUFFIX) for i in range(4)]
    inputs = processor(text=chats, images=pil, padding=True, return_tensors="pt")
    ip = processor.image_processor
    mine = patchify(images, torch.tensor(ip.image_mean), torch.tensor(ip.image_std))
    assert torch.allclose(mine, inputs["pixel_values"], atol=1e-5), "pixel values differ from the processor's"
    model = new_base(processor, 0, "sdpa").eval()
    batch = Batcher(texts, processor, "cpu", 0, bgr=False, naming_share=0.5, fast=False)(4)
    kwargs = {k: batch[k] for k in ("input_ids", "image_grid_thw", "attention_mask")}
    image_tokens = (batch["input_ids"] == model.config.image_token_id).int()
    theirs, _ = model.model.get_rope_index(mm_token_type_ids=image_tokens, **kwargs)
    keep = batch["attention_mask"].bool().unsqueeze(0).expand(3, -1, -1)
    assert torch.equal(theirs[keep], batch["position_ids"][keep]), "rope positions differ from get_rope_index"
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with_pos = model(**inputs).logits
        inputs.pop("position_ids")
        without = model(**inputs, mm_token_type_ids=image_tokens).logits
        valid = batch["attention_mask"].bool()
        assert torch.allclose(with_pos[valid], without[valid], atol=1e-4), "given position ids change the logits"
    difference = check_fast_path(model, texts, processor, "cpu")
    assert difference < 1e-4, f"the n-frame grid with batched attention changes the logits by {difference}"
    print("selftest ok: token ids, pixel values, rope positions, forward with position ids, n-frame grid with "
          f"batched vision attention (max logit difference {difference:.2e})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the family's folder (models + held-out data)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--steps", type=int, help="replace every stage's step count (smoke tests)")
    parser.add_argument("--batch", type=int, help="replace every stage's batch size (smoke tests)")
    parser.add_argument("--plan", help="steps per stage, e.g. base=3000,r1-llm-only=600 (the rest as planned)")
    parser.add_argument("--budget-s", type=float, help="scale the plan down to fit this many seconds of training")
    parser.add_argument("--heldout", type=int, default=256, help="held-out samples (default 256)")
    parser.add_argument("--eval-limit", type=int, help="evaluate in process on the first N held-out samples only")
    parser.add_argument("--attn", default="sdpa", help="the language model's attention while training (sdpa)")
    parser.add_argument("--log", type=Path, help="JSON-lines training log (default: <out>/train_log.jsonl)")
    parser.add_argument("--tar", type=Path, help="also pack the family into tars of at most 15 MB: PATH-1.tar, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--selftest", action="store_true", help="check the training shortcuts and exit")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.selftest:
        return selftest()
    if args.out is None:
        parser.error("--out is required")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.log or args.out / "train_log.jsonl")
    log(event="start", argv=sys.argv[1:] if argv is None else argv)
    override = {**({"steps": args.steps} if args.steps else {}), **({"batch": args.batch} if args.batch else {})}
    plan = {name: {**stage, **override} for name, stage in STAGES.items()}
    for item in filter(None, (args.plan or "").split(",")):
        name, _, steps = item.partition("=")
        if name not in plan or not steps.isdigit():
            parser.error(f"--plan: {item!r} is not <stage>=<steps> with a stage of {', '.join(plan)}")
        plan[name]["steps"] = int(steps)
    results = build(args.out, device=device, plan=plan, heldout=args.heldout, eval_limit=args.eval_limit,
                    attn=args.attn, log=log, budget_s=args.budget_s)
    log(event="done", results={k: {m: v[m] for m in ("mean_iou", "det_rate")} for k, v in results.items()})
    log(event="plan run", plan=",".join(f"{k}={v['steps']}" for k, v in plan.items()))
    if args.tar:
        pack(args.out, args.tar)
    return 0


def pack(folder: Path, stem: Path, limit: int = 15_000_000) -> list[Path]:
    """The family as tars of at most ``limit`` bytes each (whole sub-folders; the device returns files < 16 MiB)."""
    groups: list[list[Path]] = [[]]
    sizes = [0]
    for entry in sorted(folder.iterdir()):
        size = sum(f.stat().st_size for f in ([entry] if entry.is_file() else entry.rglob("*")) if f.is_file())
        if sizes[-1] + size > limit and groups[-1]:
            groups.append([])
            sizes.append(0)
        groups[-1].append(entry)
        sizes[-1] += size
    paths = []
    for i, group in enumerate(groups, 1):
        path = stem.with_name(f"{stem.stem}-{i}.tar")
        with tarfile.open(path, "w") as tar:
            for entry in group:
                tar.add(entry, arcname=f"{folder.name}/{entry.name}")
        paths.append(path)
    return paths


if __name__ == "__main__":
    sys.exit(main())
