"""The command line: parse options, call the library, turn its UserErrors into "Error: ..." and an exit code.

Exit codes (contract/exits.py): 0 every recipe evaluated; 1 a recipe failed or was refused; 2 usage or config
error; 3 a quality gate failed; 130 interrupted. No user text is ever read as rich markup: the consoles have
markup off, so a message that names `[defaults]` shows `[defaults]`.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from contract.boxes import BOX_FORMATS
from contract.exits import Exit
from contract.layout import MERGE_LINEAGE, RunFolder
from contract.nvml import default_device, open_nvml
from contract.recipe import Settings
from contract.run_row import NEW_RUN_RULE, IouRule, RecipeRow
from orchestrator import __version__
from orchestrator.backends.ray.cluster import Cluster
from orchestrator.errors import UserError
from orchestrator.execution.merge import merge_recipe
from orchestrator.execution.progress import progress_display
from orchestrator.execution.scheduler import GpuScheduler, runs_concurrently, scheduled_gpus, workers_per_gpu
from orchestrator.execution.supervisor import Interrupts, Suite, SuiteOptions
from orchestrator.gpu.preflight import plan_lines, preflight_for
from orchestrator.planning.lineage import describe_chain
from orchestrator.planning.plan import RecipePlan, bitsandbytes_installed, for_device, make_plans
from orchestrator.planning.recipes import LineageRules, RecipeFile, load_recipe_file
from orchestrator.reporting.gates import GateRequest, gate_request, validate_for_run
from orchestrator.reporting.history import read_history
from orchestrator.reporting.history_text import show_history
from orchestrator.reporting.publish import Outputs, publish, write_history
from orchestrator.reporting.tracking import mlflow_target
from orchestrator.results import resume, write_faults
from orchestrator.results.folder_lock import writing
from orchestrator.results.provenance import git_commit
from orchestrator.results.rescore import rescore
from orchestrator.results.resume import planned_recipe
from orchestrator.results.stats import fraction
from orchestrator.results.store import ResultsWriteError, new_run_dir, write_json
from orchestrator.results.summary import load_run, run_summary, with_recorded_rows

_GPUS_HELP = ("GPUs a worker may use, as nvidia-smi numbers them, or all. Without it: the GPU with most free memory;"
              " with it (run): workers on every one of them at once, each recipe on a GPU that fits it.")
_WORKERS_HELP = ("Workers at once on one GPU, each a fresh process with its own CUDA context, admitted while the GPU's"
                 " free memory, less what the workers already on it will still take, fits the next one's estimate at"
                 " its full batch. auto (the default): as many as fit, at most CPU cores // (4 x GPUs), since each"
                 " GPU worker prepares its batches on 4 CPU threads (1 with --device cpu); packed workers answer as"
                 " they do one at a time. 1: one at a time, the next ones started ahead.")


def _given(parameter: str) -> bool:
    """Whether the user passed the option (its default is not a request)."""
    source = click.get_current_context().get_parameter_source(parameter)
    return source not in (click.core.ParameterSource.DEFAULT, None)


class _RecipeSetting(click.ParamType):
    """A value the recipe schema also takes (contract/recipe.py), checked by the schema's own rule for that field:
    one home for each rule, so `--timeout nan` is refused as `timeout = nan` in a recipe file is."""

    def __init__(self, field: str) -> None:
        self.field = self.name = field

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return getattr(Settings.model_validate({self.field: value}), self.field)
        except ValidationError as exc:
            self.fail(f"{value!r}: {exc.errors()[0]['msg']}", param, ctx)


def _names(option: str, given: str | None) -> list[str] | None:
    """A comma-separated list of recipe names (None: not given, so all); one that names none is an error."""
    if given is None:
        return None
    names = [n.strip() for n in given.split(",") if n.strip()]
    if not names:
        raise UserError(f"{option} {given!r} names no recipe: give NAME[,NAME...], or leave the option out for all")
    return names


class WorkersPerGpu(click.ParamType):
    """A count of 1 to 64, or "auto" (None: workers_per_gpu decides)."""

    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        if value is None or value == "auto":
            return None
        try:
            count = int(value)
        except (TypeError, ValueError):
            count = 0
        if not 1 <= count <= 64:
            self.fail(f"{value!r} is neither a count from 1 to 64 nor 'auto'", param, ctx)
        return count
_HASH_WEIGHTS_HELP = "Fingerprint every link with a full content hash (reads all weights) instead of the quick one."
_BACKEND_HELP = ("local: the workers run on this host. ray: each recipe's worker runs on a node of a Ray cluster"
                 " (pip install evalorch[ray]), in a fresh worker, with the GPU Ray gives it.")
_ADDRESS_HELP = ("With --backend ray: the cluster, auto (the one `ray start` runs on this host), ray://HOST:PORT"
                 " (Ray Client) or HOST:PORT (its head node). Default: $RAY_ADDRESS, else a local cluster started"
                 " and stopped by this command.")

# Logs of nightly jobs are read in wide windows: don't wrap the table at 80 columns when not on a terminal.
console = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, markup=False, width=None if sys.stderr.isatty() else 160)


def fail(message: str, code: int = Exit.USAGE) -> None:
    """'Error: ...' on stderr (never read as markup) and exit."""
    err_console.print(Text.assemble(("Error:", "red"), " ", message))
    sys.exit(code)


class _Cli(click.Group):
    """The one translator from the library's exceptions to "Error: ..." and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            fail(str(exc), exc.exit_code)


@click.group(cls=_Cli)
@click.version_option(__version__, prog_name="evalorch")
def main() -> None:
    """Evaluate fine-tuned vision-language models, each in a fresh worker process."""
    write_faults.install_from_env()  # test-only: none unless EVALORCH_WRITE_FAULT plans one


def ci_options(command: Callable) -> Callable:
    """--fail-under, --compare, --max-drop, --junit, --json: shared by run, report and rescore."""
    options = [
        click.option("--fail-under", "fail_under", multiple=True, metavar="[RECIPE:]METRIC=VALUE",
                     help="Quality gate (repeatable): exit 3 when a recipe's metric is under VALUE, e.g."
                     " mean_iou=0.80 or r4-joint:iou_ge_0.5=0.9. Metrics: mean_iou, detection_rate, iou_ge_<t>"
                     " (the rate of IoU >= t; iou_gt_<t>, its name before, is accepted; rates as fractions). A"
                     " failed or refused recipe still exits 1: that wins over a gate."),
        click.option("--compare", type=click.Path(path_type=Path, file_okay=False, exists=True),
                     metavar="PREVIOUS_RUN_DIR", help="Run folder to compare with (needs --max-drop)."),
        click.option("--max-drop", "max_drop", multiple=True, metavar="[RECIPE:]METRIC=VALUE",
                     help="Quality gate (repeatable): exit 3 when a recipe's metric fell by more than VALUE"
                     " (in the metric's units: 0.02 is 2 points of a rate) against --compare, e.g. mean_iou=0.02."),
        click.option("--junit", type=click.Path(path_type=Path, dir_okay=False),
                     help="Write JUnit XML here: one test case per recipe (failed, refused, gated)."),
        click.option("--json", "json_out", is_flag=True,
                     help="Print the summary as JSON on stdout (everything else goes to stderr)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def backend_options(command: Callable) -> Callable:
    """--backend and --address: shared by run and plan."""
    command = click.option("--address", metavar="auto|ray://HOST:PORT|HOST:PORT", envvar="RAY_ADDRESS",
                           help=_ADDRESS_HELP)(command)
    return click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                        help=_BACKEND_HELP)(command)


def _ci(fail_under: tuple[str, ...], compare: Path | None, max_drop: tuple[str, ...], junit: Path | None,
        json_out: bool) -> tuple[GateRequest, Outputs]:
    """The gate and CI-output options, checked before any work starts; with --json, stdout carries the JSON
    alone (human output: stderr)."""
    if json_out:
        console.file = sys.stderr
    if junit is not None:
        _check_writable(junit, "--junit")
    return gate_request(fail_under, compare, max_drop), Outputs(console, junit=junit, json_out=json_out)


def _check_writable(path: Path, option: str) -> None:
    """Before any work: a file the command will write at its end can be (its folder can be made and written; click
    refuses a folder for the file itself), so a whole run is never lost to a typo in where its report goes."""
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    problem = (f"{folder} is not a folder" if not folder.is_dir() else
               f"{folder} cannot be written" if not os.access(folder, os.W_OK | os.X_OK) else
               f"{path} cannot be written" if path.exists() and not os.access(path, os.W_OK) else None)
    if problem:
        raise UserError(f"{option} {path}: {problem}; choose a path this user can write")


def mlflow_options(command: Callable) -> Callable:
    """--mlflow, --mlflow-experiment: shared by run and report."""
    command = click.option("--mlflow-experiment", "mlflow_experiment", metavar="NAME",
                           help="MLflow experiment for --mlflow (default: the recipe file's name).")(command)
    return click.option("--mlflow", "mlflow_uri", metavar="URI",
                        help="Also log each recipe as an MLflow run to this tracking URI (http://host:5000,"
                        " file:/path/mlruns, sqlite:///mlflow.db; needs the [mlflow] extra). A server that cannot"
                        " be reached is a warning: the run's results and exit code stay as they are.")(command)


def _load(recipes_path: Path, only: str | None, hash_weights: bool = False,
          backend: str = "local") -> tuple[RecipeFile, list[RecipePlan]]:
    # On Ray the nodes resolve the paths (backends/ray/node.py): one this host cannot see is theirs to find or refuse.
    recipe_file = load_recipe_file(recipes_path, paths_on_nodes=backend == "ray")
    selected = recipe_file.select(_names("--only", only))
    return recipe_file, make_plans(recipe_file, selected, hash_weights=hash_weights)


@main.command()
@click.argument("recipes", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"), show_default=True,
              help="Folder that receives the run folder runs/<UTC time>/.")
@click.option("--only", metavar="NAME[,NAME...]", help="Run only these recipes.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto: cuda where NVML sees a GPU, else cpu. cpu puts the whole model on the CPU (tests, demo);"
              " a model is never split between devices.")
@click.option("--timeout", type=_RecipeSetting("timeout"), default=None,
              help="Seconds allowed for each recipe, as a recipe's own `timeout` (default: none).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Continue this interrupted run folder: finished recipes are kept, the others continue.")
@click.option("--force", is_flag=True, help="With --resume: evaluate again from scratch each recipe whose settings, "
              "weights, processor, tokenizer or chat template changed (its earlier files are kept under .replaced/)."
              " Without it such a resume is refused.")
@click.option("--prestart/--no-prestart", default=True, show_default=True,
              help="Start the next recipes' workers (imports, data, page cache; no GPU) while this one runs.")
@click.option("--prestart-depth", type=click.IntRange(1, 8), default=2, show_default=True,
              help="How many recipes ahead to start workers with --prestart.")
@click.option("--hash-weights", is_flag=True, help=_HASH_WEIGHTS_HELP)
@click.option("--gpus", metavar="I[,I...]", help=_GPUS_HELP)
@click.option("--max-workers-per-gpu", "max_workers_per_gpu", type=WorkersPerGpu(), default="auto", metavar="N|auto",
              help=_WORKERS_HELP)
@backend_options
@click.option("--ray-cpus", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="With --backend ray: CPUs Ray reserves for each recipe's worker.")
@click.option("--ray-lanes", type=click.IntRange(1, 1024), default=None,
              help="With --backend ray: recipes at once (default: one per GPU of the cluster; 1 with --device cpu)."
              " With one, the next recipes' workers start ahead (--prestart), as on one GPU here.")
@ci_options
@mlflow_options
def run(recipes: Path, out: Path, only: str | None, device: str, timeout: float | None,
        resume_dir: Path | None, force: bool, prestart: bool, prestart_depth: int, hash_weights: bool,
        gpus: str | None, max_workers_per_gpu: int | None, backend: str, address: str | None, ray_cpus: float,
        ray_lanes: int | None, mlflow_uri: str | None, mlflow_experiment: str | None, **ci: Any) -> None:
    """Evaluate every recipe of RECIPES, each in its own fresh worker process."""
    request, outputs = _ci(**ci)  # gate options are checked before any worker starts
    outputs.mlflow = mlflow_target(mlflow_uri, mlflow_experiment)
    recipe_file, plans = _load(recipes, only, hash_weights, backend)
    validate_for_run(request, [p.recipe.name for p in plans])
    cluster = _backend(backend, address, gpus)
    if device == "auto":
        device = _auto_device(cluster)
        console.print(f"Device: {device} (--device auto)")
    plans = _on_device(plans, device, cluster)
    preflight = _preflight(device, gpus, required=True) if cluster is None else None
    if cluster is not None and _given("max_workers_per_gpu"):
        raise UserError("--max-workers-per-gpu is for the local backend: on Ray, --ray-lanes says how many at once")
    run_dir = resume_dir or new_run_dir(out)
    with writing(RunFolder(run_dir).lock, "run --resume" if resume_dir else "run"):  # the folder's one writer
        recorded = [planned_recipe(p) for p in plans]
        if resume_dir is not None:  # exactly, or refused: resume.py
            for line in resume.prepare(resume_dir, plans, force):
                console.print(Text(line))
            recorded = resume.merged_recipes(resume_dir, plans)
        interrupts = Interrupts()
        # workers at once on one GPU: only where a preflight can judge its memory (a CPU run goes one at a time)
        per_gpu = (workers_per_gpu(max_workers_per_gpu, device, len(scheduled_gpus(preflight, gpus)))
                   if preflight is not None else None)
        options = SuiteOptions(device=device, timeout=timeout, offline=not recipe_file.lineage.allow_network,
                               resume=resume_dir is not None, prestart=prestart, prestart_depth=prestart_depth,
                               max_workers_per_gpu=per_gpu)
        try:
            write_json(RunFolder(run_dir).record, {**_run_record(recipe_file, recorded, device, timeout),
                                                   "backend": cluster.record() if cluster else {"name": "local"},
                                                   "max_workers_per_gpu": options.max_workers_per_gpu})
            console.print(f"Run folder: {run_dir}")
            interrupts.install()  # after Ray's init, which sets a SIGTERM handler of its own
            with progress_display(console, [p.recipe.name for p in plans], run_dir) as listener:
                if cluster is not None:
                    rows = _run_on_ray(cluster, recipe_file, plans, run_dir, options, hash_weights, ray_cpus,
                                       ray_lanes, listener, interrupts)
                else:
                    rows = _run_suite(plans, run_dir, options, interrupts, preflight, gpus, listener)
            baseline = recipe_file.baseline.name if recipe_file.baseline else None
            rows = with_recorded_rows(run_dir, recorded, rows)  # a resume's unselected recipes keep theirs
            code = publish(run_dir, run_summary(rows, baseline), request, outputs,
                           interrupted=interrupts.stop_requested)
        except ResultsWriteError as exc:  # a full disk, a folder made read-only: the run stops, and can continue
            raise ResultsWriteError(exc.path, exc.reason, resume=run_dir) from None
    if interrupts.stop_requested:
        err_console.print(f"Interrupted: continue with --resume {run_dir}")
    sys.exit(code)


def _run_suite(plans: list[RecipePlan], run_dir: Path, options: SuiteOptions, interrupts: Interrupts, preflight,
               gpus: str | None, listener: Any) -> list[RecipeRow]:
    """Every recipe on this host, one worker at a time, or several at once (on several GPUs, several on a GPU);
    their rows."""
    if runs_concurrently(preflight, gpus, options.max_workers_per_gpu or 1):
        return GpuScheduler(plans, run_dir, options, listener=listener, interrupts=interrupts, preflight=preflight,
                            gpus=scheduled_gpus(preflight, gpus)).run()
    return Suite(plans, run_dir, options, listener=listener, interrupts=interrupts, preflight=preflight).run()


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@ci_options
@mlflow_options
def report_command(run_dir: Path, mlflow_uri: str | None, mlflow_experiment: str | None, **ci: Any) -> None:
    """Re-render report.md and report.html of RUN_DIR from the run folder alone, and apply gates to it without a
    rerun. Exit code as for `run`: 1 if a recipe failed, else 3 if a gate failed."""
    request, outputs = _ci(**ci)
    outputs.mlflow = mlflow_target(mlflow_uri, mlflow_experiment)
    outputs.write_summary = False  # a re-render leaves the recorded summary.json as it was
    sys.exit(publish(run_dir, load_run(run_dir), request, outputs))


@main.command("rescore")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--box-format", type=click.Choice(sorted(BOX_FORMATS)),
              help="Read every recipe's texts in this box format (default: each recipe's declared one).")
@click.option("--thresholds", metavar="T[,T...]", help="IoU thresholds for the IoU≥t rates, e.g. 0.5,0.7,0.9"
              " (default: those of the run).")
@click.option("--iou-rule", type=click.Choice([rule.value for rule in IouRule]),
              help="How a rate at t counts: >= (IoU >= t, every new run's) or > (run folders from before the rule "
              "was recorded). Default: each recipe's own rule, so an old folder is reproduced as it was.")
@ci_options
def rescore_command(run_dir: Path, box_format: str | None, thresholds: str | None, iou_rule: str | None,
                    **ci: Any) -> None:
    """Recompute every metric of RUN_DIR from the raw texts in samples.jsonl, without a model, into a new folder
    RUN_DIR/rescore-<UTC time>/ (summary.json, report.md, report.html); the original is never overwritten."""
    request, outputs = _ci(**ci)
    values = _thresholds(thresholds) if thresholds is not None else None
    out, summary = rescore(run_dir, box_format, values, iou_rule)
    outputs.console.print(f"Rescored into {out}")
    sys.exit(publish(out, summary, request, outputs))


def _thresholds(given: str) -> list[float]:
    """--thresholds: IoU thresholds, each a fraction (stats.fraction's rule), at least one."""
    try:
        values = [fraction(float(t), "an IoU threshold") for t in given.split(",") if t.strip()]
    except ValueError as exc:
        raise UserError(f"--thresholds {given!r}: {exc}; expected numbers like 0.5,0.7,0.9") from None
    if not values:
        raise UserError(f"--thresholds {given!r} names no threshold: expected numbers like 0.5,0.7,0.9")
    return values


@main.command("history")
@click.argument("runs_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--last", type=click.IntRange(min=1), metavar="N", help="Only the last N finished runs.")
@click.option("--recipes", "only", metavar="NAME[,NAME...]", help="Only these recipes.")
@click.option("--metric", default="mean_iou", show_default=True,
              help="mean_iou, detection_rate or iou_ge_<t> (iou>=0.5 works too; iou_gt_<t>, its name before, too).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for history.md and history.html (default: RUNS_DIR).")
def history_command(runs_dir: Path, last: int | None, only: str | None, metric: str, out: Path | None) -> None:
    """Every run folder under RUNS_DIR, oldest first, and each recipe's METRIC in each finished run; marks each
    change from one run to the next whose paired 95% interval excludes 0, and each change of weights, settings or
    software. Reads the run folders only (no model, no GPU); writes history.md and history.html."""
    found = read_history(runs_dir, metric=metric, recipes=_names("--recipes", only), last=last)
    show_history(found, console)
    md_path, html_path = write_history(found, out or runs_dir)
    console.print(f"History: {md_path} and {html_path}", markup=False)


def _preflight(device: str, gpus: str | None, *, required: bool):
    """The GPU preflight (which GPU, wait for the last worker's memory, fit or refuse), or None on cpu."""
    return preflight_for(device, gpus, required=required, report=lambda message: console.print(f"    {message}"))


def _backend(backend: str, address: str | None, gpus: str | None) -> Cluster | None:
    """The Ray cluster for --backend ray (connected, or a local one started), closed when the command ends; None
    for the local backend."""
    if backend == "local":
        if address:
            raise UserError("--address names a Ray cluster: use it with --backend ray")
        return None
    if gpus is not None:
        raise UserError("--gpus is for the local backend: with --backend ray, Ray gives each worker its GPU")
    from orchestrator.backends.ray.cluster import open_cluster

    cluster = click.get_current_context().with_resource(
        open_cluster(address, report=lambda message: err_console.print(f"Ray: {message}")))
    where = "a local Ray cluster (started for this command)" if cluster.started else f"the Ray cluster at {address}"
    err_console.print(f"Ray: {where}: {len(cluster.nodes)} node(s), {cluster.resources.get('CPU', 0):g} CPU(s), "
                      f"{cluster.gpus} GPU(s)")
    return cluster


def _on_device(plans: list[RecipePlan], device: str, cluster: Cluster | None) -> list[RecipePlan]:
    """The plans as they stand on `device`: a quantized base that cannot be evaluated there is its recipe's error.
    Whether bitsandbytes is installed is known here for this host's workers; a Ray node's worker checks its own."""
    return for_device(plans, device, bitsandbytes=bitsandbytes_installed() if cluster is None else None)


def _auto_device(cluster: Cluster | None) -> str:
    """--device auto: cuda where NVML sees a GPU here, or on Ray where the cluster has one."""
    if cluster is not None:
        return "cuda" if cluster.gpus else "cpu"
    return default_device(open_nvml())


def _run_on_ray(cluster: Cluster, recipe_file: RecipeFile, plans: list[RecipePlan], run_dir: Path,
                options: SuiteOptions, hash_weights: bool, cpus: float, lanes: int | None, listener: Any,
                interrupts: Interrupts) -> list[RecipeRow]:
    from orchestrator.backends.ray.backend import RaySettings, run_on_ray

    settings = RaySettings(options.device, recipe_file.lineage, run_dir.name, cpus, hash_weights, options.offline)
    return run_on_ray(cluster, plans, run_dir, options, settings, lanes=lanes, listener=listener,
                      interrupts=interrupts, report=lambda message: console.print(f"    {message}"))


@main.command()
@click.argument("recipes", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--only", metavar="NAME[,NAME...]", help="Plan only these recipes.")
@click.option("--hash-weights", is_flag=True, help=_HASH_WEIGHTS_HELP)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Estimate memory for this device (auto: cuda where NVML sees a GPU, else cpu).")
@click.option("--gpus", metavar="I[,I...]", help=_GPUS_HELP)
@backend_options
def plan(recipes: Path, only: str | None, hash_weights: bool, device: str, gpus: str | None, backend: str,
         address: str | None) -> None:
    """Validate RECIPES and show each recipe's lineage, memory estimate and, where a GPU is visible, whether
    it fits; loads no weights, needs no GPU. With --backend ray, a node of the cluster checks each recipe."""
    recipe_file, plans = _load(recipes, only, hash_weights, backend)
    cluster = _backend(backend, address, gpus)
    device = _auto_device(cluster) if device == "auto" else device
    plans = _on_device(plans, device, cluster)
    if cluster is not None:
        _plan_on_ray(recipe_file, plans, device, hash_weights)
        return
    preflight = _preflight(device, gpus, required=False)
    refused = []
    for item in plans:
        console.print(_lineage_tree(item, recipe_file.lineage))
        lines, fits = plan_lines(item, device, preflight)
        if item.runnable:
            lines[:0] = [*checkpoint_lines(item), f"box format: {item.recipe.box_format} ({item.box_format_from})",
                         *as_trained_lines(item)]
        for line in lines:
            console.print(f"    {line}")
        if item.runnable and not fits:
            refused.append(item)
    problems = [p for p in plans if not p.runnable] + refused
    if problems:
        fail(f"{len(problems)} recipe(s) cannot run", Exit.RECIPE_FAILED)


def _plan_on_ray(recipe_file: RecipeFile, plans: list[RecipePlan], device: str, hash_weights: bool) -> None:
    """The lineage as the driver sees it, then what a node of the cluster says (lineage there, estimate, verdict)."""
    from orchestrator.backends.ray.backend import RaySettings, plan_on_ray

    answers = plan_on_ray(plans, RaySettings(device, recipe_file.lineage, "plan", hash_weights=hash_weights))
    for item, answer in zip(plans, answers, strict=True):
        console.print(_lineage_tree(item, recipe_file.lineage))
        for line in [*checkpoint_lines(item), *as_trained_lines(item), *answer["lines"]]:
            console.print(f"    {line}")
    # a config problem is the driver's verdict whatever a node resolves (a quantized base on the CPU)
    failed = sum(not answer["ok"] or (not item.runnable and item.problem_kind == "config")
                 for item, answer in zip(plans, answers, strict=True))
    if failed:
        fail(f"{failed} recipe(s) cannot run", Exit.RECIPE_FAILED)


def checkpoint_lines(item: RecipePlan) -> list[str]:
    """Which checkpoint of a training run a swept recipe is, and the trainer's eval loss there."""
    return [f"checkpoint: {item.checkpoint.describe()}"] if item.checkpoint is not None else []


def as_trained_lines(item: RecipePlan) -> list[str]:
    """What `plan` says under a recipe's lineage of how it is evaluated as trained: where its processor comes from
    and the resolution, whether that differs from its base's, its base's quantization and how it is evaluated, and
    the embeddings resized before an adapter."""
    record = item.as_trained()
    if record is None or item.processor is None:
        return []
    lines = [f"processor: {item.processor.describe()}"]
    if item.quantization is not None:
        lines.append(f"quantization: {item.quantization.describe()}; {item.quantization.evaluated()}")
    if record["resolution_note"]:
        lines.append(f"resolution: {record['resolution_note']}")
    lines += [f"embeddings: resized to {resized['rows']} rows before {resized['adapter']} (the rows its saved "
              "embeddings have)" for resized in record["embeddings_resized"]]
    return lines


def _lineage_tree(item: RecipePlan, rules: LineageRules) -> Tree:
    tree = Tree(Text(item.recipe.name, style="bold"))
    if item.problem:
        tree.add(Text(item.problem, style="red"))
        return tree
    node = tree
    # top (what the recipe names) first, down to the root
    for line, link in zip(describe_chain(item.chain or [], rules), reversed(item.chain or []), strict=True):
        label = Text(line)
        if link.source == "recipe-base":
            label.append(" (base overridden by the recipe)", style="yellow")
        node = node.add(label)
    return tree


@main.command("merge")
@click.argument("recipe_name")
@click.argument("recipes", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="New (or empty) folder for the merged checkpoint.")
@click.option("--hash-weights", is_flag=True, help=_HASH_WEIGHTS_HELP)
def merge_command(recipe_name: str, recipes: Path, out: Path, hash_weights: bool) -> None:
    """Merge RECIPE_NAME's adapter chain into one standalone checkpoint in OUT that loads without peft."""
    record = merge_recipe(load_recipe_file(recipes), recipe_name, out, hash_weights=hash_weights)
    console.print(f"Merged {record['adapters_merged']} adapter(s) of '{recipe_name}' into {out} "
                  f"({record['dtype']}, {record['fingerprint']}); its lineage is in {out / MERGE_LINEAGE}")


def _run_record(recipe_file: RecipeFile, recipes: list[dict], device: str, timeout: float | None) -> dict:
    return {
        "orchestrator_version": __version__,
        "command": sys.argv,
        "recipe_file": str(recipe_file.path),
        "device": device,
        "timeout": timeout,
        "iou_rule": NEW_RUN_RULE,
        "python": platform.python_version(),
        "host": platform.node(),
        "commit": git_commit(recipe_file.path.resolve().parent, Path.cwd()),
        "recipes": recipes,
    }
