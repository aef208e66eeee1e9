"""A training run's checkpoints, each evaluated as a recipe of its own.

A recipe whose `model` is a training output folder and that sets `checkpoints` becomes one recipe per checkpoint,
named `<recipe>@<step>` (`<recipe>@final` for the model at the folder's root), where the recipe file is loaded
(recipes.py): lineage, workers, fingerprints, resume, gates, reports, MLflow and history all see plain recipes.
What the trainers write:

* transformers' Trainer, which LLaMA-Factory, TRL, Unsloth and axolotl train through: ``output_dir/checkpoint-N/``
  at each save (N the global step; trainer_utils.PREFIX_CHECKPOINT_DIR), and the final model in ``output_dir/``
  where the script saves it there (``trainer.save_model()``), each with a ``trainer_state.json``. axolotl writes
  adapter_config.json and config.json into ``output_dir/`` before training starts (train.py save_initial_configs):
  the root is a final model only once its weights are there.
* ms-swift: ``output/vN-YYYYMMDD-HHMMSS/checkpoint-N/`` (swift/utils add_version_to_work_dir), nothing to load at
  the run folder's root. A `model` naming ``output/`` itself resolves to its one run folder that holds checkpoints;
  with several, the recipe must name one.

Each checkpoint's own trainer_state.json gives the trainer's eval losses up to it (its log_history entries with an
`eval_loss`), which the row records beside what evalorch measures (contract/run_row.py TrainedCheckpoint).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from contract.checkpoint import ADAPTER_CONFIG, CONFIG, CheckpointError, present, read_json_object, weight_files
from contract.recipe import FINAL, Checkpoints, Recipe, checkpoint_name
from contract.run_row import TrainedCheckpoint

CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")
SWIFT_RUN_FOLDER = re.compile(r"^v\d+-\d{8}-\d{6}$")
TRAINER_STATE = "trainer_state.json"


class SweepError(Exception):
    """A `checkpoints` setting that cannot be carried out; the message names what was found."""


@dataclass(frozen=True)
class TrainingOutput:
    """A training output folder: its checkpoint-N/ folders by step, and the model at its root, if any."""

    folder: Path
    steps: dict[int, Path]
    final: Path | None

    def found(self) -> str:
        """'checkpoint-2, checkpoint-4 and the final adapter at its root', for messages."""
        names = [f"checkpoint-{step}" for step in sorted(self.steps)]
        names += ["the final model at its root"] if self.final else []
        if not names:
            return "no checkpoint-N folder and no model at its root"
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def training_output(folder: Path) -> TrainingOutput:
    """The checkpoints of the training output folder `folder` (or of the one ms-swift run folder in it)."""
    if not folder.is_dir():
        raise SweepError(f"{folder} is not a folder here: `checkpoints` needs the training output folder on this "
                         "machine, to list its checkpoint-N folders")
    steps = _checkpoint_folders(folder)
    if not steps and not _final_model(folder):
        runs = sorted(p for p in _subfolders(folder) if SWIFT_RUN_FOLDER.match(p.name) and _checkpoint_folders(p))
        if len(runs) > 1:
            names = ", ".join(p.name for p in runs)
            raise SweepError(f"{folder} holds {len(runs)} ms-swift runs with checkpoints ({names}): set `model` to "
                             f"the one to sweep, e.g. {runs[-1]}")
        if runs:
            folder, steps = runs[0], _checkpoint_folders(runs[0])
    return TrainingOutput(folder, steps, folder if _final_model(folder) else None)


def holds_checkpoints(folder: Path) -> bool:
    """Whether `folder` looks like a training output folder (checkpoint-N/ inside, or an ms-swift run folder)."""
    try:
        found = training_output(folder)
    except (SweepError, OSError):
        return False
    return bool(found.steps)


def sweep_recipes(recipe: Recipe) -> list[tuple[Recipe, TrainedCheckpoint]]:
    """One recipe per checkpoint `recipe.checkpoints` picks from the training output folder `recipe.model`, in
    training order (the final model last), each with its record; SweepError naming the checkpoints found."""
    output = training_output(Path(recipe.model))
    picked = _picked(output, recipe.checkpoints)
    swept = []
    for label in picked:
        folder = output.final if label == FINAL else output.steps[int(label)]
        assert folder is not None  # _picked names the final model only where there is one
        record = _record(recipe.name, label, folder, output.folder)
        swept.append((recipe.model_copy(update={"name": checkpoint_name(recipe.name, label), "model": str(folder),
                                                "checkpoints": None}), record))
    return swept


def _picked(output: TrainingOutput, selection: Checkpoints) -> list[str]:
    """The labels ('2', 'final') `selection` names, in training order; SweepError for one that is not there."""
    steps = sorted(output.steps)
    where = f"{output.folder} holds {output.found()}"
    if selection == "all":
        if not steps and output.final is None:
            raise SweepError(f"{where}: nothing to sweep")
        return [str(step) for step in steps] + ([FINAL] if output.final else [])
    if selection == "last":
        if not steps:
            raise SweepError(f"{where}: no checkpoint-N folder to take the last of")
        return [str(steps[-1])]
    asked = list(selection or [])
    missing = [str(s) for s in asked if (s == FINAL and output.final is None) or (s != FINAL and s not in output.steps)]
    if missing:
        raise SweepError(f"no checkpoint {', '.join(missing)} in {output.folder}; it holds {output.found()}")
    return [str(s) for s in steps if s in asked] + ([FINAL] if FINAL in asked else [])


def _record(sweep: str, label: str, folder: Path, output_dir: Path) -> TrainedCheckpoint:
    """What the row records of a checkpoint: its step and the trainer's eval losses up to it."""
    record = TrainedCheckpoint(sweep=sweep, label=label, step=None if label == FINAL else int(label),
                               output_dir=str(output_dir))
    state_file = folder / TRAINER_STATE
    if not present(state_file):
        return record
    try:
        state = read_json_object(state_file)
    except CheckpointError as exc:
        return record.model_copy(update={"trainer_state_problem": f"its eval losses are left out: {exc}"})
    global_step = state.get("global_step")
    step = global_step if record.step is None and isinstance(global_step, int) else record.step
    return record.model_copy(update={"step": step, "trainer_state": str(state_file),
                                     "eval_losses": eval_losses(state.get("log_history"))})


def eval_losses(log_history: object) -> dict[int, float]:
    """trainer_state.json's log_history entries that carry an `eval_loss`, by `step` (others are left out)."""
    losses = {}
    for entry in log_history if isinstance(log_history, list) else []:
        if not isinstance(entry, dict):
            continue
        step, loss = entry.get("step"), entry.get("eval_loss")
        if isinstance(step, int) and isinstance(loss, int | float) and not isinstance(loss, bool) \
                and math.isfinite(loss):
            losses[step] = float(loss)
    return losses


def _checkpoint_folders(folder: Path) -> dict[int, Path]:
    return {int(found[1]): path for path in _subfolders(folder) if (found := CHECKPOINT_FOLDER.match(path.name))}


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [path for path in folder.iterdir() if path.is_dir()]
    except OSError as exc:
        raise SweepError(f"{folder} cannot be listed ({exc.strerror or exc})") from None


def _final_model(folder: Path) -> bool:
    """A model at the output folder's root, weights and all (a config alone is axolotl's, written at the start)."""
    kind = "adapter" if present(folder / ADAPTER_CONFIG) else "full" if present(folder / CONFIG) else None
    if kind is None:
        return False
    try:
        return bool(weight_files(folder, kind, allow_pickle=True))  # only whether there are any: lineage checks them
    except CheckpointError:
        return False
