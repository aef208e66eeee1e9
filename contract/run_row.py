"""What a run records of its results, typed once: each recipe's row, how it ended (Status), the rule its rates at
an IoU threshold counted by (IouRule), and the run's summary that lists the rows.

The parent's supervisor writes a row when a recipe ends (into the recipe's summary.json, beside the worker's
messages) and rescore writes one per rescored recipe; the run's summary.json holds every row with its comparisons
(the change over the baseline, intervals, paired differences) added when the summary is made. Every reader (the
summary, the reports, the gates, the history, MLflow) reads the rows through these models, so a field has one name
and one type. Run folders written before a field existed still read: it takes its default; a row from before the
IoU rule was recorded counted IoU > t, which its metric keys (iou_gt_<t>) say.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, computed_field, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from .quantization import Quantization


class Status(StrEnum):
    """How a recipe's evaluation ended (PENDING: not yet)."""

    PENDING = "pending"
    OK = "ok"
    SAMPLE_ERRORS = "sample_errors"  # finished, but too many samples errored (or none was scored)
    ERROR = "error"  # the worker reported an error (config, lineage, memory, data...), or the plan refused it
    CRASHED = "crashed"  # the worker died of a signal other than SIGKILL
    KILLED = "killed"  # SIGKILL (the kernel's OOM killer, a user)
    TIMEOUT = "timeout"  # a phase ran out of time; the parent stopped the worker
    PROTOCOL = "protocol"  # the worker's stream broke the protocol, or ended without `done`
    INTERRUPTED = "interrupted"  # the user stopped it (Ctrl-C, SIGTERM)
    REFUSED = "refused"  # the preflight found no room for it on the device
    SKIPPED = "skipped"  # the run was interrupted before it started
    LOST = "lost"  # a remote backend's node or Ray worker died under the worker
    INCOMPLETE = "incomplete"  # no summary recorded: the parent was stopped (killed) before the recipe ended

    @property
    def stopped_early(self) -> bool:
        """The run was stopped before this recipe ended (Ctrl-C, a killed parent): it says nothing of the recipe."""
        return self in (Status.INTERRUPTED, Status.SKIPPED, Status.INCOMPLETE)


class IouRule(StrEnum):
    """How the rate at threshold t counts a sample's IoU. New runs count IoU >= t, as every peer's ACC@t does
    (lmms-eval, InternVL's and Qwen-VL's RefCOCO scripts); runs from before the rule was recorded counted IoU > t.
    The rule names the metric key (iou_ge_0.5, iou_gt_0.5) and the column (IoU≥0.5, IoU>0.5)."""

    AT_LEAST = ">="
    ABOVE = ">"

    def counts(self, iou: float, threshold: float) -> bool:
        """Whether an IoU counts towards the rate at `threshold`."""
        return iou >= threshold if self is IouRule.AT_LEAST else iou > threshold

    def key(self, threshold: float) -> str:
        """The rate's stable name in JSON and on the command line: 'iou_ge_0.5', or 'iou_gt_0.5'."""
        return f"{_KEY_PREFIX[self]}{threshold:g}"

    def column(self, threshold: float) -> str:
        """The column a person reads: 'IoU≥0.5', or 'IoU>0.5'."""
        return f"{_TITLE_PREFIX[self]}{threshold:g}"


NEW_RUN_RULE = IouRule.AT_LEAST  # how the rates of a new run count
UNRECORDED_RULE = IouRule.ABOVE  # what a row (or run.json) without a recorded rule counted
_KEY_PREFIX = {IouRule.AT_LEAST: "iou_ge_", IouRule.ABOVE: "iou_gt_"}
_TITLE_PREFIX = {IouRule.AT_LEAST: "IoU≥", IouRule.ABOVE: "IoU>"}


def parse_threshold_key(key: str) -> tuple[float, IouRule] | None:
    """'iou_ge_0.5' -> (0.5, AT_LEAST), 'iou_gt_0.5' -> (0.5, ABOVE); None for any other key."""
    for rule, prefix in _KEY_PREFIX.items():
        if key.startswith(prefix):
            try:
                return float(key[len(prefix):]), rule
            except ValueError:
                return None
    return None


def rule_of_metrics(metrics: object) -> IouRule:
    """The rule a row's rates counted by, read from its metric keys: only iou_ge_ keys mean AT_LEAST; a row from
    before the rule was recorded has iou_gt_ keys (or none) and counted IoU > t."""
    keys = metrics if isinstance(metrics, dict) else {}
    rules = {found[1] for key in keys if (found := parse_threshold_key(str(key))) is not None}
    return NEW_RUN_RULE if rules == {NEW_RUN_RULE} else UNRECORDED_RULE


def _number(value: object) -> int | float:
    """A metric's value as recorded: a count stays an int, a mean or a rate a float; text or a bool is refused."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


MetricValue = Annotated[int | float, PlainValidator(_number)]
# n, errors, mean_iou, detection_rate and the rate at each threshold (IouRule.key); None where nothing was scored
Metrics = dict[str, MetricValue | None]


class Rescore(BaseModel):
    """How a rescored row was scored again (orchestrator/results/rescore.py)."""

    box_format: str
    thresholds: list[float]
    iou_rule: IouRule
    samples_changed: int


class TrainedCheckpoint(BaseModel):
    """Which checkpoint of a training run a swept recipe evaluates (orchestrator/planning/sweep.py), and what the
    trainer's trainer_state.json beside it says: its eval loss at each step it evaluated, up to this checkpoint."""

    sweep: str  # the recipe as the recipe file names it
    label: str  # the step ('400'), or 'final' for the adapter at the training output folder's root
    step: int | None = None  # the training step: checkpoint-N's N; for 'final' its trainer_state's global_step
    output_dir: str  # the training output folder the checkpoints are in
    eval_losses: dict[int, float] = Field(default_factory=dict)  # log_history's eval_loss, by step
    trainer_state: str | None = None  # the trainer_state.json read, where there is one
    trainer_state_problem: str | None = None  # why it could not be read (the losses are then left out)

    def describe(self) -> str:
        """'step 400 of sweep lora (/runs/out); the trainer's eval loss there: 0.4321'."""
        if self.label.isdigit():
            where = f"step {self.step}"
        else:
            where = "the final adapter" + (f" (step {self.step})" if self.step is not None else "")
        text = f"{where} of sweep {self.sweep} ({self.output_dir})"
        if self.step is not None and self.step in self.eval_losses:
            text += f"; the trainer's eval loss there: {self.eval_losses[self.step]:.4f}"
        if self.trainer_state_problem:
            text += f"; {self.trainer_state_problem}"
        return text


# The fields a run's summary adds to each row when it is made (results/summary.py): None in a recipe's own
# summary.json, which records what the recipe did, not how it compares.
COMPARISONS = frozenset({"change_vs_baseline", "intervals", "vs_baseline_paired", "vs_recorded_base_paired"})


class RecipeRow(BaseModel):
    """One recipe's result in a run. The nested records a row carries as the parent got them (the worker's parity
    check, the preflight's record, the lineage links, the attempts) keep their own keys."""

    model_config = ConfigDict(extra="ignore")  # a recipe's summary.json holds the worker's messages besides

    name: str
    status: Status
    detail: str = ""
    metrics: Metrics | None = None
    # how its rates at t counted; absent from a row recorded before the rule was: read from its metric keys
    iou_rule: IouRule = UNRECORDED_RULE
    parity: dict[str, Any] | None = None  # batched vs one at a time (worker/inference/parity.py)
    lineage: list[dict[str, Any]] = Field(default_factory=list)  # the chain, root first
    base_override: bool = False
    # where its processor came from and the resolution it resizes to, embeddings resized to an adapter's rows
    # (planning/plan.py, RecipePlan.as_trained); None for a row recorded before it was, or resolved on a Ray node
    as_trained: dict[str, Any] | None = None
    # its base's bitsandbytes quantization and whether it was evaluated quantized or dequantized (the recipe's
    # `dequantize`); None where the base is not quantized, or for a row recorded before it was
    quantization: Quantization | None = None
    recipe: dict[str, Any] | None = None  # the recipe's settings as run
    preflight: dict[str, Any] | None = None  # the preflight's record (GPU, memory, batch size); None on a CPU
    attempts: list[dict[str, Any]] = Field(default_factory=list)
    sample_errors: dict[str, Any] | None = None  # the verdict on its errored samples (stats.sample_error_verdict)
    # the recipes whose workers were on a device at the same time (several on a GPU, or one per GPU)
    concurrent_with: list[str] = Field(default_factory=list)
    # batches CUDA ran out of memory on and the worker retried at half the size, and the batch size it ended at
    oom_retries: int | None = None
    final_batch_size: int | None = None
    decode_graph: dict[str, Any] | None = None  # decode steps replayed from CUDA graphs, and batches run eagerly
    rescore: Rescore | None = None  # only in a rescore's rows (absent from the JSON otherwise)
    checkpoint: TrainedCheckpoint | None = None  # a swept checkpoint's (its name is <sweep>@<label>)
    # comparisons (COMPARISONS), added when the run's summary is made
    change_vs_baseline: float | None = None
    intervals: dict[str, list[float] | None] | None = None
    vs_baseline_paired: dict[str, Any] | None = None
    vs_recorded_base_paired: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _rule_from_metric_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("iou_rule") is None:
            return {**data, "iou_rule": rule_of_metrics(data.get("metrics"))}
        return data

    @model_serializer(mode="wrap")
    def _rescore_only_where_rescored(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("rescore") is None:
            data.pop("rescore", None)
        return data

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def mean_iou(self) -> float | None:
        return (self.metrics or {}).get("mean_iou")

    def recorded(self) -> dict[str, Any]:
        """The row as JSON, less the comparisons: what a recipe's own summary.json holds of it."""
        return self.model_dump(mode="json", exclude=set(COMPARISONS))


class SweepPoint(BaseModel):
    """One checkpoint of a sweep in a run's summary: its mean IoU with the interval, and the trainer's eval loss."""

    recipe: str  # <sweep>@<label>
    label: str
    step: int | None = None
    status: Status
    mean_iou: float | None = None
    interval: list[float] | None = None
    eval_loss: float | None = None  # the trainer's, at this step (trainer_state.json)


class Sweep(BaseModel):
    """The checkpoints of one training run evaluated in a run (results/sweeps.py): the metric against the training
    step, the best checkpoint, and whether it is clearly ahead of the last one (paired, best - last)."""

    name: str
    points: list[SweepPoint]  # in training order, the final adapter last
    eval_losses: dict[int, float] = Field(default_factory=dict)  # the trainer's eval loss by step, all it recorded
    best: str | None = None
    last: str | None = None  # the last checkpoint that finished: the final adapter, else the highest step
    best_vs_last: dict[str, Any] | None = None  # paired_comparison(best, last); None where best is last


class RunSummary(BaseModel):
    """A run's summary.json: the rows in the run's order, the baseline, the best recipe and how the best compares;
    the gates' verdict once checked."""

    model_config = ConfigDict(extra="ignore")

    recipes: list[RecipeRow]
    baseline: str | None = None
    best: str | None = None
    best_change_vs_baseline: float | None = None
    best_vs_others: list[dict[str, Any]] = Field(default_factory=list)  # the best paired with each other recipe
    sweeps: list[Sweep] = Field(default_factory=list)  # each training run's checkpoints evaluated, by step
    gates: dict[str, Any] | None = None

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented form; mypy does not know it
    @property
    def iou_rule(self) -> str:
        """How the rates at t count: the rows' rule, or 'mixed: >, >=' where they differ (a summary of old and new
        rows)."""
        rules = sorted({row.iou_rule.value for row in self.recipes})
        return rules[0] if len(rules) == 1 else "mixed: " + ", ".join(rules)

    def row(self, name: str | None) -> RecipeRow | None:
        return next((row for row in self.recipes if row.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """The summary as summary.json holds it."""
        return self.model_dump(mode="json")
