"""Tiny offline checkpoints of every model family evalorch is tested on, each with a LoRA adapter, and a grounding
set whose images every family's processor resizes.

    python -m tools.make_families --out families [--families qwen2_5_vl,internvl] [--samples N]

Families (config.json model_type): qwen2_vl, qwen2_5_vl, qwen3_vl (Qwen's chat template and smart_resize, patch 14
or 16), internvl (tiles of a fixed size: columns x rows chosen by aspect ratio, plus a thumbnail), paligemma (no
chat template: the processor places the image, one fixed-size picture), gemma3 (chat template, one fixed-size
picture, pooled image tokens) and florence2 (an encoder-decoder; no chat template, task tokens, <loc_N> bins).
Each is built as tools/make_demo.py builds the demo: a config, a processor and a tokenizer made on the spot (the
demo's byte-level BPE for the Qwen-tokenizer families and BART, a byte-fallback Gemma tokenizer for the Gemma
ones), random weights, and a LoRA adapter (init_lora_weights=False: non-zero B) on the language model's q/v
projections.

`family_parts(name, shape)` gives a family's config, processor and generation config at any shape: the tests use
the tiny one here, benchmarks/gpu_families.py the 2B-7B ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ROOT = Path(__file__).resolve().parent.parent

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "paligemma", "gemma3", "florence2")
# Sizes (width, height) no processor here keeps as they are: not multiples of 28 (Qwen2/2.5), 32 (Qwen3) or the
# fixed tiles/pictures of InternVL, PaliGemma and Gemma 3; wide, tall and near-square, for InternVL's grids.
IMAGE_SIZES = [(100, 75), (130, 90), (75, 110), (150, 61)]
LORA_TARGET = r".*language_model\.(?:(?:encoder|decoder)\.)?layers\.\d+\.self_attn\.(q_proj|v_proj)"
VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class Shape:
    """A language model and a vision tower's sizes, and the processor's image sizes (tiny unless said)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int | None = None  # None: the tokenizer's size rounded up to VOCAB_MULTIPLE
    tie: bool = False
    vision: dict[str, Any] = field(default_factory=lambda: {"hidden": 32, "layers": 2, "heads": 2,
                                                              "intermediate": 64})
    image: dict[str, Any] = field(default_factory=dict)  # processor settings: see each family's defaults below


@dataclass
class Parts:
    """What a family's checkpoint is made of, before any weight exists."""

    config: Any
    processor: Any
    generation: Any
    model_class: type[PreTrainedModel]


# ----------------------------------------------------------------------------- tokenizers


def qwen_tokenizer(extra: dict[str, str] | None = None, specials: list[str] | None = None) -> Any:
    """make_demo's byte-level BPE as a Qwen2Tokenizer, with `specials` appended (or Qwen2-VL's) and `extra` named
    special tokens (an attribute each, as InternVL's processor reads them: tokenizer.start_image_token)."""
    from transformers import Qwen2Tokenizer

    from tools.make_demo import SPECIAL_TOKENS, build_tokenizer, trained_bpe

    if specials is None and extra is None:
        return build_tokenizer()
    vocab, merges = trained_bpe()
    specials = specials or SPECIAL_TOKENS
    vocab.update({tok: len(vocab) + i for i, tok in enumerate(specials)})
    tokenizer = Qwen2Tokenizer(vocab=vocab,
                               merges=merges,  # type: ignore[arg-type]  # BPE pairs; transformers annotates list[str]
                               unk_token=None,  # type: ignore[arg-type]  # none: transformers accepts None, annotates str
                               eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=extra,
                               padding_side="left", model_max_length=4096)
    tokenizer.add_tokens(specials, special_tokens=True)
    return tokenizer


def gemma_tokenizer(extra: dict[str, str]) -> Any:
    """A Gemma tokenizer made on the spot: its special tokens, the 256 byte-fallback tokens and single characters
    (no merges: text becomes characters or bytes), plus `extra` named special tokens (image, boi, eoi)."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", *extra.values()]
    vocab = {token: index for index, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'\"()[]{}<>_-":
        vocab.setdefault(char, len(vocab))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], extra_special_tokens=extra, padding_side="left",
                               model_max_length=4096)
    tokenizer.add_tokens(specials, special_tokens=True)
    return tokenizer


def _vocab(shape: Shape, tokenizer: Any) -> int:
    return shape.vocab or -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _text(shape: Shape, tokenizer: Any, eos: str, **extra: Any) -> dict[str, Any]:
    ids = tokenizer.convert_tokens_to_ids
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    return {"vocab_size": _vocab(shape, tokenizer), "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
            "max_position_embeddings": 32768, "bos_token_id": bos, "eos_token_id": ids(eos),
            "pad_token_id": tokenizer.pad_token_id, **extra}


def _generation(tokenizer: Any, eos: list[str], **extra: Any) -> Any:
    from transformers import GenerationConfig

    ids = [tokenizer.convert_tokens_to_ids(token) for token in eos]
    return GenerationConfig(eos_token_id=ids, pad_token_id=tokenizer.pad_token_id, do_sample=False, **extra)


def _mrope(head_dim: int) -> list[int]:
    """An mrope_section that sums to head_dim / 2 in Qwen's proportions (16, 24, 24 of 64)."""
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
    section[0] += head_dim // 2 - sum(section)
    return section


# ----------------------------------------------------------------------------- the families


class _QwenIds(TypedDict):
    """The special tokens' ids a Qwen-VL config names (typed per key: they are splatted into the config)."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int


def _qwen_ids(tokenizer: Any) -> _QwenIds:
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def _qwen2_vl(shape: Shape) -> Parts:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from tools.make_demo import CHAT_TEMPLATE

    tokenizer = qwen_tokenizer()
    head_dim = shape.hidden // shape.heads
    text = _text(shape, tokenizer, "<|im_end|>", rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                   "mrope_section": _mrope(head_dim)})
    vision = {"depth": shape.vision["layers"], "embed_dim": shape.vision["hidden"], "num_heads": shape.vision["heads"],
              "mlp_ratio": shape.vision["intermediate"] // shape.vision["hidden"], "hidden_size": shape.hidden,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie,
                           **_qwen_ids(tokenizer))
    image = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 32, **shape.image}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**image), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    return Parts(config, processor, _generation(tokenizer, ["<|im_end|>", "<|endoftext|>"]),
                 Qwen2VLForConditionalGeneration)


def _qwen2_5_vl(shape: Shape) -> Parts:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from tools.make_demo import CHAT_TEMPLATE

    tokenizer = qwen_tokenizer()
    head_dim = shape.hidden // shape.heads
    text = _text(shape, tokenizer, "<|im_end|>", rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                   "mrope_section": _mrope(head_dim)})
    depth = shape.vision["layers"]
    vision = {"depth": depth, "hidden_size": shape.vision["hidden"], "intermediate_size": shape.vision["intermediate"],
              "num_heads": shape.vision["heads"], "out_hidden_size": shape.hidden, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": shape.vision.get("full", [depth - 1])}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie,
                              **_qwen_ids(tokenizer))
    image = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 32, **shape.image}
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**image), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    return Parts(config, processor, _generation(tokenizer, ["<|im_end|>", "<|endoftext|>"]),
                 Qwen2_5_VLForConditionalGeneration)


def _qwen3_vl(shape: Shape) -> Parts:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    from tools.make_demo import CHAT_TEMPLATE

    tokenizer = qwen_tokenizer()
    head_dim = shape.hidden // shape.heads
    text = _text(shape, tokenizer, "<|im_end|>", head_dim=head_dim, rope_parameters={
        "rope_type": "default", "rope_theta": 5e6, "mrope_section": _mrope(head_dim), "mrope_interleaved": True})
    depth = shape.vision["layers"]
    vision = {"depth": depth, "hidden_size": shape.vision["hidden"], "intermediate_size": shape.vision["intermediate"],
              "num_heads": shape.vision["heads"], "out_hidden_size": shape.hidden, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
              "deepstack_visual_indexes": shape.vision.get("deepstack", [depth - 1])}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie,
                           **_qwen_ids(tokenizer))
    image = {"patch_size": 16, "size": {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 32}, **shape.image}
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**image), tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    return Parts(config, processor, _generation(tokenizer, ["<|im_end|>", "<|endoftext|>"]),
                 Qwen3VLForConditionalGeneration)


INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
                     "<ref>", "</ref>", "<box>", "</box>"]
INTERNVL_CHAT = (  # InternVL's chat template, Qwen-style turns, <IMG_CONTEXT> where the image goes
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _internvl(shape: Shape) -> Parts:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = qwen_tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}, INTERNVL_SPECIALS)
    tokenizer.chat_template = INTERNVL_CHAT
    image = {"size": {"height": 56, "width": 56}, "crop_to_patches": True, "min_patches": 1, "max_patches": 6,
             **shape.image}
    tile = image["size"]["height"]
    seq = (tile // 14) ** 2 // 4  # pixel shuffle at downsample_ratio 0.5: a quarter of the patches
    vision = {"hidden_size": shape.vision["hidden"], "num_hidden_layers": shape.vision["layers"],
              "num_attention_heads": shape.vision["heads"], "intermediate_size": shape.vision["intermediate"],
              "image_size": [tile, tile], "patch_size": [14, 14]}
    config = InternVLConfig(vision_config=vision, text_config={"model_type": "qwen2", **_text(
        shape, tokenizer, "<|im_end|>")}, image_token_id=tokenizer.context_image_token_id, image_seq_length=seq,
        downsample_ratio=0.5, tie_word_embeddings=shape.tie)
    processor = InternVLProcessor(image_processor=GotOcr2ImageProcessor(**image), tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=seq,
                                  chat_template=INTERNVL_CHAT)
    return Parts(config, processor, _generation(tokenizer, ["<|im_end|>", "<|endoftext|>"]),
                 InternVLForConditionalGeneration)


def _siglip(shape: Shape, size: int) -> dict[str, Any]:
    return {"hidden_size": shape.vision["hidden"], "intermediate_size": shape.vision["intermediate"],
            "num_hidden_layers": shape.vision["layers"], "num_attention_heads": shape.vision["heads"],
            "image_size": size, "patch_size": 14}


def _paligemma(shape: Shape) -> Parts:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tokenizer = gemma_tokenizer({"image_token": "<image>"})
    size = shape.image.get("size", 56)
    tokens = (size // 14) ** 2
    # image_seq_length is saved with it: PaliGemma's processor reads it
    image_processor = SiglipImageProcessor(size={"height": size, "width": size}, image_seq_length=tokens)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <locNNNN> & co.
    vocab = _vocab(shape, tokenizer)
    head_dim = shape.hidden // shape.heads
    text = {**_text(shape, tokenizer, "<eos>"), "model_type": "gemma", "vocab_size": vocab, "head_dim": head_dim,
            "num_image_tokens": tokens}
    config = PaliGemmaConfig(vision_config={"model_type": "siglip_vision_model", **_siglip(shape, size),
                                            "projection_dim": shape.hidden},
                             text_config=text, image_token_index=tokenizer.image_token_id, vocab_size=vocab,
                             projection_dim=shape.hidden, hidden_size=shape.hidden, tie_word_embeddings=shape.tie)
    return Parts(config, processor, _generation(tokenizer, ["<eos>"]), PaliGemmaForConditionalGeneration)


GEMMA3_CHAT = (  # Gemma 3's turns; <start_of_image> where the image goes (the processor expands it)
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<start_of_image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _gemma3(shape: Shape) -> Parts:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tokenizer = gemma_tokenizer({"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                 "eoi_token": "<end_of_image>"})
    tokenizer.chat_template = GEMMA3_CHAT
    size = shape.image.get("size", 56)
    tokens = shape.image.get("tokens", 4)  # (size / 14)^2 patches average-pooled to this many (a square)
    head_dim = shape.hidden // shape.heads
    text = {**_text(shape, tokenizer, "<end_of_turn>"), "head_dim": head_dim, "sliding_window": 512,
            "query_pre_attn_scalar": head_dim}
    config = Gemma3Config(text_config=text, vision_config=_siglip(shape, size), mm_tokens_per_image=tokens,
                          boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                          image_token_index=tokenizer.image_token_id, tie_word_embeddings=shape.tie)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": size, "width": size}),
                                tokenizer=tokenizer, image_seq_length=tokens, chat_template=GEMMA3_CHAT)
    return Parts(config, processor, _generation(tokenizer, ["<end_of_turn>", "<eos>"]),
                 Gemma3ForConditionalGeneration)


def _florence2(shape: Shape) -> Parts:
    """Florence-2: a DaViT vision tower and a BART encoder-decoder; no chat template (its processor expands task
    tokens such as <OD> and places the image tokens itself), 1000 <loc_N> bins added to the tokenizer."""
    from transformers import (
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    from tools.make_demo import trained_bpe

    vocab, merges = trained_bpe()
    words = {token: index for index, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<image>"])}
    for token in vocab:
        words.setdefault(token, len(words))
    tokenizer = BartTokenizer(vocab=words,
                              merges=merges,  # type: ignore[arg-type]  # BPE pairs; transformers annotates list[str]
                              extra_special_tokens={"image_token": "<image>"}, model_max_length=4096)
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(1000)])
    size = shape.image.get("size", 64)
    image_processor = CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                         crop_size={"height": size, "width": size},
                                         image_seq_length=(size // 8) ** 2 + 1)  # stride 4 then 2: 8x8 each, + pooled
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    text = {"model_type": "bart", "vocab_size": _vocab(shape, tokenizer), "d_model": shape.hidden,
            "encoder_layers": shape.layers, "decoder_layers": shape.layers, "encoder_attention_heads": shape.heads,
            "decoder_attention_heads": shape.heads, "encoder_ffn_dim": shape.intermediate,
            "decoder_ffn_dim": shape.intermediate, "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "decoder_start_token_id": tokenizer.eos_token_id}
    hidden = shape.vision["hidden"]
    vision = {"depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
              "patch_prenorm": [False, True], "embed_dim": [hidden // 2, hidden], "num_heads": [2, 4],
              "num_groups": [2, 4], "window_size": 4, "projection_dim": shape.hidden, "max_position_embeddings": 50}
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id)
    generation = _generation(tokenizer, ["</s>"], bos_token_id=tokenizer.bos_token_id,
                             decoder_start_token_id=tokenizer.eos_token_id)  # as Florence-2's own: </s> starts
    return Parts(config, processor, generation, Florence2ForConditionalGeneration)


BUILDERS: dict[str, Callable[[Shape], Parts]] = {
    "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "internvl": _internvl,
    "paligemma": _paligemma, "gemma3": _gemma3, "florence2": _florence2,
}


def family_parts(name: str, shape: Shape | None = None) -> Parts:
    """A family's config, processor and generation config (no weights), at `shape` (tiny by default)."""
    return BUILDERS[name](shape or Shape())


# ----------------------------------------------------------------------------- checkpoints


def build_family(name: str, out: Path, *, seed: int = 0) -> dict[str, Path]:
    """`out/<name>/base` (random weights, float32) and `out/<name>/lora` (an adapter on it); their paths."""
    import torch

    parts = family_parts(name)
    torch.manual_seed(seed)
    model = parts.model_class(parts.config)
    model = model.to(torch.float32).eval()  # type: ignore[arg-type]  # transformers' to() is @wraps-typed, as unbound
    model.generation_config = parts.generation
    base = out / name / "base"
    model.save_pretrained(base)
    parts.processor.save_pretrained(base)
    lora = save_lora(model, out / name / "lora", base, seed + 1)
    return {"base": base, "lora": lora}


def save_lora(model: Any, path: Path, base: Path, seed: int, target: str = LORA_TARGET) -> Path:
    """A LoRA adapter (r=8, non-zero B) on `target` of a copy of `model`, recording `base` as its base."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(str(path), save_embedding_layers=False)
    config_file = path / "adapter_config.json"
    record = json.loads(config_file.read_text())
    record["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def build_dataset(folder: Path, samples: int = 4) -> Path:
    """`samples` images of IMAGE_SIZES in turn, one red rectangle each (tools/synthetic.py)."""
    from tools.synthetic import red_rectangles

    return red_rectangles(folder, samples, IMAGE_SIZES)


def build_families(out: Path, names: tuple[str, ...] = FAMILIES, *, samples: int = 4,
                   seed: int = 0) -> dict[str, Any]:
    """Every family in `names` under `out/<name>/`, and the dataset under `out/data/`."""
    out = Path(out).resolve()
    built = {name: build_family(name, out, seed=seed) for name in names}
    return {"families": built, "dataset": build_dataset(out / "data", samples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of: {', '.join(FAMILIES)}")
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    built = build_families(args.out, tuple(n.strip() for n in args.families.split(",") if n.strip()),
                           samples=args.samples)
    print(f"built in {time.perf_counter() - started:.1f}s")
    for name, paths in built["families"].items():
        print(f"  {name:12s} {paths['base']}  (+ {paths['lora'].name})")
    print(f"  dataset {built['dataset']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
