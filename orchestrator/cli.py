"""The command line: parse options, call the library, turn its exceptions into "Error: ..." and an exit code.

Exit codes: 0 every recipe evaluated; 1 a recipe failed or was refused; 2 usage or config error;
3 a quality gate failed; 130 interrupted.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from . import __version__
from .boxes import BOX_FORMATS
from .gates import GateError, GateRequest, Outputs, ci_options, gate_request, publish, validate_for_run
from .gpu import default_device, open_nvml
from .lineage import describe_chain
from .merge import MergeError, merge_recipe
from .plan import RecipePlan, make_plans
from .preflight import PreflightError, plan_lines, preflight_for
from .progress import progress_display
from .recipes import LineageRules, RecipeFile, RecipeFileError, load_recipe_file
from .report import ReportError, load_run, run_summary
from .rescore import RescoreError, rescore
from .results import new_run_dir, write_json
from .resume import ResumeError, differences, planned_recipe
from .scheduler import GpuScheduler, runs_concurrently
from .supervisor import Interrupts, Suite, SuiteOptions

EXIT_OK, EXIT_RECIPE_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
_GPUS_HELP = ("GPUs a worker may use, as nvidia-smi numbers them, or all. Without it: one worker at a time, on the GPU"
              " with most free memory; with it (run): one worker per GPU at once, each recipe on the GPU that fits it.")
_HASH_WEIGHTS_HELP = "Fingerprint every link with a full content hash (reads all weights) instead of the quick one."

# Logs of nightly jobs are read in wide windows: don't wrap the table at 80 columns when not on a terminal.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def _load(recipes_path: Path, only: str | None, hash_weights: bool = False) -> tuple[RecipeFile, list[RecipePlan]]:
    try:
        recipe_file = load_recipe_file(recipes_path)
        selected = recipe_file.select([n.strip() for n in only.split(",") if n.strip()] if only else None)
    except RecipeFileError as exc:
        err_console.print(f"[red]Error:[/red] {exc}", markup=True)
        sys.exit(EXIT_CONFIG)
    return recipe_file, make_plans(recipe_file, selected, hash_weights=hash_weights)


@click.group()
@click.version_option(__version__, prog_name="evalorch")
def main() -> None:
    """Evaluate fine-tuned vision-language models, each in a fresh worker process."""


@main.command()
@click.argument("recipes", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"), show_default=True,
              help="Folder that receives the run folder runs/<UTC time>/.")
@click.option("--only", metavar="NAME[,NAME...]", help="Run only these recipes.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto: cuda where NVML sees a GPU, else cpu. cpu puts the whole model on the CPU (tests, demo);"
              " a model is never split between devices.")
@click.option("--timeout", type=float, default=None, help="Seconds allowed for each recipe (default: none).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Continue this interrupted run folder: finished recipes are kept, the others continue.")
@click.option("--force", is_flag=True, help="With --resume: continue even though recipes or weights changed.")
@click.option("--prestart/--no-prestart", default=True, show_default=True,
              help="Start the next recipes' workers (imports, data, page cache; no GPU) while this one runs.")
@click.option("--prestart-depth", type=click.IntRange(1, 8), default=2, show_default=True,
              help="How many recipes ahead to start workers with --prestart.")
@click.option("--hash-weights", is_flag=True, help=_HASH_WEIGHTS_HELP)
@click.option("--gpus", metavar="I[,I...]", help=_GPUS_HELP)
@ci_options
def run(recipes: Path, out: Path, only: str | None, device: str, timeout: float | None,
        resume_dir: Path | None, force: bool, prestart: bool, prestart_depth: int, hash_weights: bool,
        gpus: str | None, **ci: Any) -> None:
    """Evaluate every recipe of RECIPES, each in its own fresh worker process."""
    request, outputs = _ci(**ci)  # gate options are checked before any worker starts
    recipe_file, plans = _load(recipes, only, hash_weights)
    _check_gates(lambda: validate_for_run(request, [p.recipe.name for p in plans]))
    if device == "auto":
        device = default_device(open_nvml())
        console.print(f"Device: {device} (--device auto)")
    preflight = _preflight(device, gpus, required=True)
    run_dir = _resume_dir(resume_dir, plans, force) if resume_dir else new_run_dir(out)
    write_json(run_dir / "run.json", _run_record(recipe_file, plans, device, timeout))
    console.print(f"Run folder: {run_dir}")
    interrupts = Interrupts()
    interrupts.install()
    options = SuiteOptions(device=device, timeout=timeout, offline=not recipe_file.lineage.allow_network,
                           resume=resume_dir is not None, prestart=prestart, prestart_depth=prestart_depth)
    with progress_display(console, [p.recipe.name for p in plans], run_dir) as listener:
        if runs_concurrently(preflight, gpus):
            rows = GpuScheduler(plans, run_dir, options, listener=listener, interrupts=interrupts,
                                preflight=preflight).run()
        else:
            rows = Suite(plans, run_dir, options, listener=listener, interrupts=interrupts, preflight=preflight).run()
    baseline = recipe_file.baseline.name if recipe_file.baseline else None
    code = _check_gates(lambda: publish(run_dir, run_summary(rows, baseline), request, outputs,
                                        interrupted=interrupts.stop_requested))
    if interrupts.stop_requested:
        err_console.print(f"Interrupted: continue with --resume {run_dir}")
    sys.exit(code)


def _ci(fail_under: tuple[str, ...], compare: Path | None, max_drop: tuple[str, ...], junit: Path | None,
        json_out: bool) -> tuple[GateRequest, Outputs]:
    """The gate and CI-output options; with --json, stdout carries the JSON alone (human output: stderr)."""
    if json_out:
        console.file = sys.stderr
    request = _check_gates(lambda: gate_request(fail_under, compare, max_drop))
    return request, Outputs(console, junit=junit, json_out=json_out)


def _check_gates(action: Any) -> Any:
    """Run `action`; a gate option it cannot apply is a usage error (exit 2)."""
    try:
        return action()
    except GateError as exc:
        err_console.print(f"[red]Error:[/red] {escape(str(exc))}", markup=True)
        sys.exit(EXIT_CONFIG)


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@ci_options
def report_command(run_dir: Path, **ci: Any) -> None:
    """Re-render report.md and report.html of RUN_DIR from the run folder alone, and apply gates to it without a
    rerun. Exit code as for `run`: 1 if a recipe failed, else 3 if a gate failed."""
    request, outputs = _ci(**ci)
    outputs.write_summary = False  # a re-render leaves the recorded summary.json as it was
    try:
        summary = load_run(run_dir)
    except ReportError as exc:
        err_console.print(f"[red]Error:[/red] {escape(str(exc))}", markup=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(_check_gates(lambda: publish(run_dir, summary, request, outputs)))


@main.command("rescore")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--box-format", type=click.Choice(sorted(BOX_FORMATS)),
              help="Read every recipe's texts in this box format (default: each recipe's declared one).")
@click.option("--thresholds", metavar="T[,T...]", help="IoU thresholds for the IoU>t rates, e.g. 0.5,0.7,0.9"
              " (default: those of the run).")
@ci_options
def rescore_command(run_dir: Path, box_format: str | None, thresholds: str | None, **ci: Any) -> None:
    """Recompute every metric of RUN_DIR from the raw texts in samples.jsonl, without a model, into a new folder
    RUN_DIR/rescore-<UTC time>/ (summary.json, report.md, report.html); the original is never overwritten."""
    request, outputs = _ci(**ci)
    try:
        values = [float(t) for t in thresholds.split(",") if t.strip()] if thresholds else None
    except ValueError:
        err_console.print(f"[red]Error:[/red] --thresholds {thresholds!r}: expected numbers like 0.5,0.7,0.9",
                          markup=True)
        sys.exit(EXIT_CONFIG)
    try:
        out, summary = rescore(run_dir, box_format, values)
    except (ReportError, RescoreError) as exc:
        err_console.print(f"[red]Error:[/red] {escape(str(exc))}", markup=True)
        sys.exit(EXIT_CONFIG)
    outputs.console.print(f"Rescored into {out}", markup=False)
    sys.exit(_check_gates(lambda: publish(out, summary, request, outputs)))


def _preflight(device: str, gpus: str | None, *, required: bool):
    """The GPU preflight (which GPU, wait for the last worker's memory, fit or refuse), or None on cpu."""
    try:
        return preflight_for(device, gpus, required=required,
                             report=lambda message: console.print(f"    {message}", markup=False))
    except PreflightError as exc:
        err_console.print(f"[red]Error:[/red] {escape(str(exc))}", markup=True)
        sys.exit(EXIT_CONFIG)


def _resume_dir(run_dir: Path, plans: list[RecipePlan], force: bool) -> Path:
    try:
        changed = differences(run_dir, plans)
    except ResumeError as exc:
        err_console.print(f"[red]Error:[/red] {exc}", markup=True)
        sys.exit(EXIT_CONFIG)
    if changed and not force:
        lines = "\n".join(f"  - {c}" for c in changed)
        err_console.print(f"[red]Error:[/red] {run_dir} was started with other recipes or weights:\n{lines}\n"
                          "Results would mix two setups. Start a new run, or pass --force to continue anyway.",
                          markup=True)
        sys.exit(EXIT_CONFIG)
    return run_dir


@main.command()
@click.argument("recipes", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--only", metavar="NAME[,NAME...]", help="Plan only these recipes.")
@click.option("--hash-weights", is_flag=True, help=_HASH_WEIGHTS_HELP)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Estimate memory for this device (auto: cuda where NVML sees a GPU, else cpu).")
@click.option("--gpus", metavar="I[,I...]", help=_GPUS_HELP)
def plan(recipes: Path, only: str | None, hash_weights: bool, device: str, gpus: str | None) -> None:
    """Validate RECIPES and show each recipe's lineage, memory estimate and, where a GPU is visible, whether
    it fits; loads no weights, needs no GPU."""
    recipe_file, plans = _load(recipes, only, hash_weights)
    device = default_device(open_nvml()) if device == "auto" else device
    preflight = _preflight(device, gpus, required=False)
    refused = []
    for item in plans:
        console.print(_lineage_tree(item, recipe_file.lineage))
        lines, fits = plan_lines(item, device, preflight)
        for line in lines:
            console.print(f"    {line}", markup=False)
        if item.runnable and not fits:
            refused.append(item)
    problems = [p for p in plans if not p.runnable] + refused
    if problems:
        err_console.print(f"[red]Error:[/red] {len(problems)} recipe(s) cannot run", markup=True)
        sys.exit(EXIT_RECIPE_FAILED)


def _lineage_tree(item: RecipePlan, rules: LineageRules) -> Tree:
    tree = Tree(f"[bold]{item.recipe.name}[/bold]")
    if item.problem:
        tree.add(f"[red]{escape(item.problem)}[/red]")  # messages name [lineage]: not markup
        return tree
    node = tree
    # top (what the recipe names) first, down to the root
    for line, link in zip(describe_chain(item.chain or [], rules), reversed(item.chain or []), strict=True):
        note = " [yellow](base overridden by the recipe)[/yellow]" if link.source == "recipe-base" else ""
        node = node.add(escape(line) + note)
    return tree


@main.command("merge")
@click.argument("recipe_name")
@click.argument("recipes", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="New (or empty) folder for the merged checkpoint.")
@click.option("--hash-weights", is_flag=True, help=_HASH_WEIGHTS_HELP)
def merge_command(recipe_name: str, recipes: Path, out: Path, hash_weights: bool) -> None:
    """Merge RECIPE_NAME's adapter chain into one standalone checkpoint in OUT that loads without peft."""
    try:
        record = merge_recipe(load_recipe_file(recipes), recipe_name, out, hash_weights=hash_weights)
    except RecipeFileError as exc:
        err_console.print(f"[red]Error:[/red] {escape(str(exc))}", markup=True)
        sys.exit(EXIT_CONFIG)
    except MergeError as exc:
        err_console.print(f"[red]Error:[/red] {escape(str(exc))}", markup=True)
        sys.exit(exc.exit_code)
    console.print(f"Merged {record['adapters_merged']} adapter(s) of '{recipe_name}' into {out} "
                  f"({record['dtype']}, {record['fingerprint']}); its lineage is in {out / 'lineage.json'}")


def _run_record(recipe_file: RecipeFile, plans: list[RecipePlan], device: str, timeout: float | None) -> dict:
    return {
        "orchestrator_version": __version__,
        "command": sys.argv,
        "recipe_file": str(recipe_file.path),
        "device": device,
        "timeout": timeout,
        "python": platform.python_version(),
        "host": platform.node(),
        "recipes": [planned_recipe(p) for p in plans],
    }
