"""What differs between model families on the worker's side, read from the processor (never from a family name):
the text a sample's prompt becomes, how one batch goes through the processor, and the size of the image the model
saw after the processor's resize (which a box in input pixels, Qwen2.5-VL's, refers to)."""

from __future__ import annotations

from typing import Any

from contract.boxes import Size
from worker.errors import WorkerError
from worker.loading.default_dtype import preparing_inputs


def prompt_text(processor: Any, prompt: str) -> str:
    """The processor's text for one image and `prompt`: its chat template's user turn and generation prompt
    (Qwen, InternVL, Gemma 3, ...), or, for a processor without a chat template, the prompt alone: such processors
    place the image themselves (PaliGemma's puts its image tokens, BOS and the trailing newline around it;
    Florence-2's its image tokens, BOS and EOS, after expanding a task token such as <OD>)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not getattr(processor, "image_token", None):
        raise WorkerError("config", f"{type(processor).__name__} has no chat template and no image token: evalorch "
                                    "cannot tell where the image goes in the prompt; save a chat template with it")
    return prompt


_BYTES_PER_TOKEN = 64  # far more than any tokenizer's longest token: a text longer than this many bytes a token is
# over the limit without being tokenized (a 50 MB prompt would take gigabytes to tokenize)


def prompt_too_long(processor: Any, text: str, limit: int) -> str | None:
    """Why the chat text `text` (prompt_text's) is over `limit` tokens, or None. One sample's over-long prompt would
    make its whole batch's attention that long (a 100 KB prompt asked for 32 GB), so it is that sample's error."""
    size = len(text.encode())
    if size > limit * _BYTES_PER_TOKEN:
        return (f"prompt: {size} bytes, more than max_prompt_tokens ({limit}) tokens can hold; shorten it, or raise "
                "max_prompt_tokens")
    tokenizer = getattr(processor, "tokenizer", processor)
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if count > limit:
        return (f"prompt: {count} tokens with its chat template, more than max_prompt_tokens ({limit}); shorten "
                "it, or raise max_prompt_tokens")
    return None


def encode(processor: Any, texts: list[str], images: list[Any]) -> Any:
    """One processor call for a batch, each text with its one image (nested, so that every processor reads the
    images per sample: Gemma 3's would put a flat list all in one sample)."""
    with preparing_inputs():  # the prefetch thread calls it while the main thread may be building the model
        inputs = processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt")
    inputs.pop("labels", None)  # PaliGemma's processor adds training labels; generate must not get them
    return inputs


def input_sizes(processor: Any, inputs: Any, images: list[Any]) -> list[Size | None]:
    """The (width, height) of each image as the model saw it, from the processor's actual output: Qwen's patch
    grid (image_grid_thw x patch size); InternVL's tile grid (the image is resized onto columns x rows tiles); one
    fixed-size picture per image (PaliGemma, Gemma 3, LLaVA: pixel_values' shape). None where the output does not
    say (a processor of another kind): a format in input pixels then fails the sample with that reason."""
    grid = inputs.get("image_grid_thw")
    image_processor = getattr(processor, "image_processor", None)
    if grid is not None:
        patch = int(getattr(image_processor, "patch_size", 14))
        return [(int(w) * patch, int(h) * patch) for _, h, w in grid.tolist()]
    if getattr(image_processor, "crop_to_patches", False):
        return [_tiled_size(image_processor, image) for image in images]
    pixels = inputs.get("pixel_values")
    if pixels is not None and pixels.dim() == 4 and pixels.shape[0] == len(images):
        return [(int(pixels.shape[-1]), int(pixels.shape[-2])) for _ in images]
    return [None for _ in images]


def _tiled_size(image_processor: Any, image: Any) -> Size | None:
    """InternVL / GOT-OCR2: the image is resized to columns x rows tiles of `size`, chosen by the processor's own
    rule (get_optimal_tiled_canvas), then cut into those tiles (plus a thumbnail of the whole)."""
    try:
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
    except ImportError:  # a transformers that keeps the rule elsewhere: the size is then unknown, never guessed
        return None
    size = image_processor.size
    tile_h, tile_w = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    if image_processor.max_patches <= 1:
        return (tile_w, tile_h)
    width, height = image.size
    columns, rows = get_optimal_tiled_canvas((height, width), (tile_h, tile_w), image_processor.min_patches,
                                             image_processor.max_patches)
    return (columns * tile_w, rows * tile_h)
