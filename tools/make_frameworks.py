"""The folders the training frameworks write, built offline on the demo's base with the real libraries (peft's
save_pretrained, transformers' processor and TrainerState), laid out as each framework's own code lays them out.

What each framework writes, from its code (the commit read is named in tests/test_frameworks.py):

* LLaMA-Factory: ``output_dir/checkpoint-N/`` per save, the final adapter in ``output_dir/`` itself, the processor
  (tokenizer included) saved into both (train/callbacks.py ``SaveProcessorCallback``: on_save, on_train_end),
  ``trainer_state.json``. Added tokens force ``resize_vocab`` (model/patcher.py), which resizes the embeddings to
  ``len(tokenizer)`` padded to a multiple of 64 where the tokenizer outgrew them
  (model/model_utils/embedding.py ``resize_embedding_layer``) and puts ``embed_tokens`` and ``lm_head`` in
  modules_to_save (model/adapter.py); ``use_dora``; target_modules the full names of the language model's linear
  layers (model/model_utils/visual.py ``patch_target_modules``). Its ``image_max_pixels`` is set on the processor
  object (patcher.py ``patch_processor``), which ``save_pretrained`` does not write: the saved processor resizes as
  the base's.
* ms-swift: ``output/vN-YYYYMMDD-HHMMSS/checkpoint-N/`` (swift/utils ``add_version_to_work_dir``) with the adapter,
  ``args.json`` copied from the run folder and ``trainer_state.json``, and no tokenizer or processor beside an
  adapter (swift/trainers/mixin.py ``_save``); target_modules a regex over the language model and the vision tower,
  the aligner excluded (swift/utils/transformers_utils.py ``get_multimodal_target_regex``); the recorded base is the
  model's folder as modelscope downloaded it, ``<cache>/models/<org>/<name with dots as ___>``; args.json's
  ``model`` is what the user passed and ``new_special_tokens`` the tokens it adds to the tokenizer when it loads.
* TRL (and Unsloth, which trains through TRL's trainers): ``checkpoint-N/`` with the adapter, the processing class
  (the processor, as the script built it: TRL builds the base's when given none, sft_trainer.py) and
  ``trainer_state.json`` (transformers' Trainer ``_save``).
* A whole run to sweep (``checkpoint_sweep``): transformers' Trainer, which all but ms-swift train through, writes
  ``checkpoint-N/`` at each save with ``trainer_state.json`` (its ``log_history`` holds the eval losses so far), and
  the script's ``trainer.save_model()`` the final adapter in ``output_dir/``.
* Unsloth's (and QLoRA's) base quantized by bitsandbytes: a ``quantization_config`` in config.json as transformers
  writes it (BitsAndBytesConfig.to_dict: nf4, double quant, bfloat16 compute, lm_head and the aligner kept in full
  precision) and the weights packed as ``save_pretrained`` of the quantized model writes them: a 4-bit weight as
  uint8 pairs with its ``absmax``, ``quant_map``, nested constants and ``quant_state.bitsandbytes__nf4`` record; an
  8-bit one as int8 with its row scales ``SCB`` and ``weight_format``.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

SWIFT_RUN = "v0-20260101-120000"
LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# ms-swift's regex for Qwen2-VL with the vision tower trained (freeze_vit false): the language model's and the
# vision tower's linear layers, the aligner (model.visual.merger) excluded
SWIFT_TARGETS = (r"^((?!(model\.visual\.merger))model\.language_model(?=\.).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj"
                 r"|up_proj|down_proj)|(?!(model\.visual\.merger))model\.visual(?=\.).*\.(qkv|proj|fc1|fc2))$")


def load_base(base: Path) -> tuple[Any, Any]:
    """The demo base model (float32) and its processor."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(base)


def save_adapter(model: Any, folder: Path, recorded_base: str | None, seed: int, **lora: Any) -> Path:
    """A peft adapter (non-zero B: trained) of `model` in `folder`, recording `recorded_base` as its base."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(str(folder))
    config_file = folder / "adapter_config.json"
    record = json.loads(config_file.read_text()) | {"base_model_name_or_path": recorded_base}
    config_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return folder


def trainer_state(folder: Path, step: int, losses: dict[int, float]) -> None:
    """transformers' trainer_state.json for a run at `step`, with an eval loss at each step of `losses`."""
    from transformers import TrainerState

    history = [{"step": s, "epoch": s / 10, "eval_loss": loss} for s, loss in sorted(losses.items()) if s <= step]
    TrainerState(global_step=step, max_steps=max(losses), log_history=history).save_to_json(
        str(folder / "trainer_state.json"))


def grow_vocabulary(model: Any, tokenizer: Any, tokens: list[str], multiple: int) -> None:
    """Add `tokens` as special tokens, and resize the embeddings to the tokenizer padded to `multiple` where it
    outgrew them (LLaMA-Factory: 64, ms-swift: 128); new rows initialised without transformers' random draw."""
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple, mean_resizing=False)


def llamafactory_run(base: Path, out: Path, steps: tuple[int, ...] = (2, 4),
                     web_ui_pixels: tuple[int, int] | None = None) -> Path:
    """An LLaMA-Factory LoRA run with 20 added special tokens and DoRA: checkpoint-N/ per step, the final adapter in
    `out` itself, each with the processor and trainer_state.json; its LogCallback's trainer_log.jsonl in `out`.
    `web_ui_pixels`: (image_min_pixels, image_max_pixels) as its web UI launches a run, written into
    `out/training_args.yaml` (webui/common.py save_cmd: yaml.safe_dump of the arguments)."""
    import yaml  # type: ignore[import-untyped]  # a dependency of transformers; no stubs installed

    out.mkdir(parents=True, exist_ok=True)
    if web_ui_pixels is not None:
        arguments = {"model_name_or_path": str(base), "stage": "sft", "finetuning_type": "lora", "use_dora": True,
                     "image_min_pixels": web_ui_pixels[0], "image_max_pixels": web_ui_pixels[1],
                     "output_dir": str(out)}
        (out / "training_args.yaml").write_text(yaml.safe_dump(arguments))
    with open(out / "trainer_log.jsonl", "w") as log:  # train/callbacks.py LogCallback
        log.writelines(json.dumps({"current_steps": s, "total_steps": steps[-1], "loss": 1.0 / s}) + "\n"
                       for s in steps)
    model, processor = load_base(base)
    grow_vocabulary(model, processor.tokenizer, [f"<region_{i}>" for i in range(20)], 64)
    targets = [name for name, _ in model.named_modules() if name.endswith(LLM_LINEAR) and "visual" not in name]
    losses = {step: 2.0 / step for step in steps}
    for index, folder in enumerate([*(out / f"checkpoint-{s}" for s in steps), out]):
        save_adapter(model, folder, str(base), 10 + index, target_modules=targets, use_dora=True,
                     modules_to_save=["embed_tokens", "lm_head"])
        processor.save_pretrained(folder)
        trainer_state(folder, steps[min(index, len(steps) - 1)], losses)
    return out


def swift_checkpoint(base: Path, out: Path, *, recorded_base: str | None, model_arg: str, step: int = 2,
                     new_tokens: list[str] | None = None, embeddings: bool = True, max_pixels: int | None = None,
                     model_kwargs: dict[str, Any] | None = None) -> Path:
    """An ms-swift LoRA checkpoint `out/output/v0-.../checkpoint-N/`: adapter (ms-swift's regex over the language
    model and vision tower), args.json (its run folder's, copied), trainer_state.json; no tokenizer or processor.
    `new_tokens`: ms-swift's new_special_tokens (embeddings resized to a multiple of 128 where needed, and kept as
    modules_to_save when `embeddings`). `max_pixels`: args.json's (the template's rescale); `model_kwargs`: its
    model_kwargs (MAX_PIXELS for qwen_vl_utils)."""
    model, processor = load_base(base)
    if new_tokens:
        grow_vocabulary(model, processor.tokenizer, new_tokens, 128)
    run = out / "output" / SWIFT_RUN
    run.mkdir(parents=True)
    args = {"model": model_arg, "model_type": "qwen2_vl", "tuner_type": "lora", "new_special_tokens": new_tokens or [],
            "target_modules": ["all-linear"], "freeze_vit": False, "output_dir": str(run), "swift_version": "4.0.0",
            "max_pixels": max_pixels, "model_kwargs": model_kwargs or {}}
    (run / "args.json").write_text(json.dumps(args, indent=2))
    checkpoint = run / f"checkpoint-{step}"
    save_adapter(model, checkpoint, recorded_base, 20 + step, target_modules=SWIFT_TARGETS,
                 modules_to_save=["embed_tokens", "lm_head"] if new_tokens and embeddings else None)
    shutil.copy(run / "args.json", checkpoint / "args.json")  # swift/trainers/mixin.py _save
    trainer_state(checkpoint, step, {step: 1.0})
    return checkpoint


def trl_checkpoint(base: Path, out: Path, *, recorded_base: str, max_pixels: int, step: int = 3) -> Path:
    """A TRL SFT checkpoint `out/checkpoint-N/`: adapter, trainer_state.json, and the processor the script passed
    as processing_class, which the Trainer saves as given: here built as Qwen-VL fine-tuning scripts often build it,
    `AutoProcessor.from_pretrained(model, max_pixels=...)`, so it resizes otherwise than the base's."""
    from transformers import AutoProcessor

    model, _ = load_base(base)
    processor = AutoProcessor.from_pretrained(base, max_pixels=max_pixels)
    folder = out / f"checkpoint-{step}"
    save_adapter(model, folder, recorded_base, 30 + step, target_modules=["q_proj", "v_proj"])
    processor.save_pretrained(folder)
    trainer_state(folder, step, {step: 1.5})
    return folder


def shrunk_vocabulary_adapter(base: Path, out: Path) -> Path:
    """A script's `model.resize_token_embeddings(len(tokenizer))`, which shrinks a vocabulary padded past the
    tokenizer (Qwen's), with embed_tokens and lm_head in modules_to_save, and the tokenizer saved beside."""
    model, processor = load_base(base)
    model.resize_token_embeddings(len(processor.tokenizer))
    save_adapter(model, out, str(base), 40, target_modules=["q_proj", "v_proj"],
                 modules_to_save=["embed_tokens", "lm_head"])
    processor.save_pretrained(out)
    return out


def grown_tokenizer_without_embeddings(base: Path, out: Path) -> Path:
    """Tokens added to the tokenizer (inside the padded vocabulary: no resize), the embeddings trained but not kept:
    a LoRA on the attention alone, the grown tokenizer saved beside it."""
    model, processor = load_base(base)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<obj>", "</obj>"]})
    save_adapter(model, out, str(base), 50, target_modules=["q_proj", "v_proj"])
    processor.save_pretrained(out)
    return out


def checkpoint_sweep(base: Path, trained: Path, out: Path, steps: tuple[int, ...] = (100, 200, 300),
                     trained_at: int = 200, eval_every: int = 50) -> Path:
    """A training run's output folder as transformers' Trainer leaves it: ``checkpoint-N/`` at each of `steps` and
    the final adapter in `out` itself (the last step's), each with the processor and trainer_state.json (an eval
    loss every `eval_every` steps). The adapters are the trained adapter `trained` (a LoRA of `base`) with its
    lora_B scaled by step / `trained_at`, as though training had got that far, or past it: loaded and saved by
    peft."""
    import torch
    from peft import PeftModel

    model, processor = load_base(base)
    losses = {step: round(0.3 + abs(step - trained_at) / (2 * trained_at), 4)  # lowest where it was trained
              for step in range(eval_every, steps[-1] + 1, eval_every)}
    saves = [*((out / f"checkpoint-{step}", step) for step in steps), (out, steps[-1])]
    for folder, step in saves:
        with warnings.catch_warnings():  # transformers' deprecated is_gradient_checkpointing; peft looking for the
            warnings.simplefilter("ignore")  # training machine's base (recorded in `trained`) to compare vocabularies
            adapter = PeftModel.from_pretrained(copy.deepcopy(model), str(trained))
            with torch.no_grad():
                for name, parameter in adapter.named_parameters():
                    if "lora_B" in name:
                        parameter.mul_(step / trained_at)
            adapter.save_pretrained(str(folder))
        config_file = folder / "adapter_config.json"
        record = json.loads(config_file.read_text()) | {"base_model_name_or_path": str(base)}
        config_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        processor.save_pretrained(folder)
        trainer_state(folder, step, losses)
    return out


# ----------------------------------------------------------------------------- bases quantized by bitsandbytes

BNB_SKIP = ["lm_head", "merger"]  # kept in full precision, as Unsloth's VLM configs keep the head and the aligner


def bnb_settings(bits: int) -> dict[str, Any]:
    """The quantization_config transformers writes into config.json for a base quantized at `bits` (4: nf4 with
    double quant and bfloat16 compute, Unsloth's -bnb-4bit; 8: LLM.int8())."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16",
                                llm_int8_skip_modules=BNB_SKIP)
    return json.loads(json.dumps(config.to_dict()))  # quant_method as the string it is written as


def quantized_base(base: Path, out: Path, *, bits: int = 4, device: str = "cpu") -> Path:
    """The base saved quantized by bitsandbytes (which must be installed), as Unsloth made its -bnb-4bit
    checkpoints: loaded with a BitsAndBytesConfig onto `device`, then save_pretrained; the base's processor beside."""
    import torch
    from transformers import AutoProcessor, BitsAndBytesConfig, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        base, quantization_config=BitsAndBytesConfig.from_dict(bnb_settings(bits)), device_map={"": device},
        dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return out


def quantization_config_only(base: Path, out: Path, *, bits: int = 4) -> Path:
    """The base's full-precision weights under a config.json that carries a bitsandbytes quantization_config: the
    base a QLoRA run names, saved with its quantization settings; transformers quantizes it as it loads."""
    shutil.copytree(base, out)
    config = json.loads((out / "config.json").read_text()) | {"quantization_config": bnb_settings(bits)}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def packed_layout(base: Path, out: Path, *, bits: int = 4) -> Path:
    """Files only, where bitsandbytes is not installed: the config and the tensors of a base saved quantized, as
    bitsandbytes names, types and shapes them (each linear weight outside BNB_SKIP packed, with its constants; the
    other tensors in bfloat16), every value zero. Planning, the estimate and the refusals read no value."""
    import torch

    model, processor = load_base(base)
    linear = {f"{name}.weight" for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and not any(skip in name.split(".") for skip in BNB_SKIP)}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in linear:
            tensors |= _packed(name, tensor.shape, bits)
        else:
            tensors[name] = torch.zeros(tensor.shape, dtype=torch.bfloat16)
    model.config.quantization_config = bnb_settings(bits)
    model.save_pretrained(out, state_dict=tensors)  # the checkpoint's key names, as transformers saves them
    processor.save_pretrained(out)
    return out


def _packed(name: str, shape: Any, bits: int) -> dict[str, Any]:
    """One linear weight as bitsandbytes saves it packed: 4-bit nf4 with double quant (bnb.functional.QuantState
    as_dict(packed=True)), or 8-bit int8 with its row scales."""
    import math

    import torch

    elements = math.prod(shape)
    if bits == 8:
        module = name.removesuffix(".weight")
        return {name: torch.zeros(shape, dtype=torch.int8), f"{module}.SCB": torch.zeros(shape[0]),
                f"{module}.weight_format": torch.zeros((), dtype=torch.uint8)}
    blocks = math.ceil(elements / 64)
    state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": list(shape),
                        "nested_blocksize": 256, "nested_offset": 0.0, "nested_dtype": "float32"}).encode()
    return {name: torch.zeros(((elements + 1) // 2, 1), dtype=torch.uint8),
            f"{name}.absmax": torch.zeros(blocks, dtype=torch.uint8), f"{name}.quant_map": torch.zeros(16),
            f"{name}.nested_absmax": torch.zeros(math.ceil(blocks / 256)), f"{name}.nested_quant_map": torch.zeros(256),
            f"{name}.quant_state.bitsandbytes__nf4": torch.tensor(list(state), dtype=torch.uint8)}


def qlora_adapter(adapter: Path, quantized: Path, out: Path) -> Path:
    """A trained peft LoRA recording `quantized` as its base, as QLoRA and Unsloth save one: the adapter's files are
    the same whether the layers beneath were 4-bit or not (peft names and shapes a LoRA by the layer it adapts)."""
    shutil.copytree(adapter, out)
    config_file = out / "adapter_config.json"
    record = json.loads(config_file.read_text()) | {"base_model_name_or_path": str(quantized)}
    config_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


# ----------------------------------------------------------------------------- from another process


def main(argv: list[str] | None = None) -> None:
    """``python -m tools.make_frameworks '[["builder", {"argument": value, ...}], ...]'``: each builder of this module
    called in turn, its Path arguments made Paths; prints each folder built, one a line. The GPU suite builds here,
    in a process of its own: peft imports bitsandbytes where it is installed, and bitsandbytes' import opens a CUDA
    context, which the suite's own process must never hold."""
    import inspect
    import sys

    for name, arguments in json.loads((argv if argv is not None else sys.argv[1:])[0]):
        builder = globals()[name]
        parameters = inspect.signature(builder).parameters
        typed = {key: Path(value) if str(parameters[key].annotation).startswith("Path") and value is not None
                 else value for key, value in arguments.items()}
        print(builder(**typed), flush=True)


if __name__ == "__main__":
    main()
