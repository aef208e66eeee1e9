"""What runs on a Ray node for one recipe; backend.py drives it from the driver.

`RecipeNode` becomes a Ray actor, one per attempt of a recipe, killed after it. On its node it:

- resolves the recipe's lineage again, with the node's files and the recipe file's remap rules, and refuses when
  the fingerprints differ from the driver's (every node must see the same weights);
- runs the GPU preflight there, on the GPU Ray gave it: NVML of that node, the same estimate and the same refusal
  naming the holders as a local run (preflight.GpuPreflight), once this run's last worker on that GPU has gone
  and its memory is back (the driver carries what the previous actor's preflight knew: `carried`);
- starts `python -m worker` with the launcher of a local run (process.WorkerProcess: own process group, stdin
  lifeline, result pipe) in a folder of its own on the node, laid out like a recipe folder, with the environment
  of a local run built from the node's, less what Ray set for its own workers (`ray_free_env`);
- hands result-pipe bytes and new worker-log bytes to the driver as they come (`read`), and kills the worker's
  process group before it goes (Ray leaves a task's children alive: ray-project/ray#31451).

Nothing here imports torch: the actor is a light process next to the worker it supervises.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import ray

from contract.layout import RecipeFolder
from contract.nvml import GpuProcess, Nvml
from contract.recipe import Recipe
from contract.spec import ChainLink, WorkerSpec
from orchestrator.execution.environment import worker_env
from orchestrator.execution.process import WorkerProcess
from orchestrator.gpu.preflight import (
    POLL_S,
    RELEASE_TIMEOUT_S,
    GpuPreflight,
    PreflightError,
    nvml_for,
    plan_lines,
)
from orchestrator.planning.lineage import LineageError, resolve_chain
from orchestrator.planning.plan import RecipePlan
from orchestrator.planning.recipes import LineageRules

_LOG_CHUNK = 1 << 20  # the most worker-log bytes one `read` hands back
# The WorkerHandle methods (process.py) the driver's RayWorkerProcess has the actor call on the worker here
# (RecipeNode.call), each with what it answers when there is no worker to ask: none was started on this node, or
# (on the driver) the node or the actor is lost.
GONE_ANSWERS: dict[str, Any] = {"send": False, "poll": None, "wait": None, "kill": None, "stop": ()}
# What Ray 2.60 sets in its workers' environment besides RAY_*, dropped when the raylet's own environment (the
# node's, as the cluster was started) cannot be read to tell exactly.
_RAY_SETS = {"PYTHONBREAKPOINT": "ray.util.rpdb.set_trace", "SPT_NOENV": "1"}


def marker(run_id: str) -> str:
    """The prefix of this run's folders on the nodes: a worker whose command line holds it is one of ours."""
    return f"evalorch-{run_id}-"


@dataclass(frozen=True)
class NodeTask:
    """What the driver tells a node about one recipe."""

    recipe: Recipe
    rules: LineageRules
    chain: list[ChainLink] | None  # the chain as the driver (or a first node) resolved it; None: not resolved
    device: str
    run_id: str = "plan"
    hash_weights: bool = False
    offline: bool = True
    release_timeout: float = RELEASE_TIMEOUT_S


# ----------------------------------------------------------------------------- what the node sees


def resolve_here(task: NodeTask, host: str) -> tuple[list[ChainLink] | None, str | None]:
    """The recipe's chain as this node resolves it, or why it cannot run here."""
    try:
        chain = resolve_chain(task.recipe, task.rules, hash_weights=task.hash_weights)
    except LineageError as exc:
        return None, f"lineage on node {host}: {exc}"
    if task.chain is not None:
        for here, there in zip(chain, task.chain, strict=False):
            if here.fingerprint != there.fingerprint:
                return None, (f"lineage on node {host}: {here.path} ({here.fingerprint}) is not the driver's "
                              f"{there.path} ({there.fingerprint}); every node must see the same weights (the "
                              "same paths, or a remap to identical copies)")
        if len(chain) != len(task.chain):
            return None, (f"lineage on node {host}: the chain has {len(chain)} link(s) there, "
                          f"{len(task.chain)} on the driver")
    return chain, None


def node_nvml(device: str) -> tuple[Nvml | None, str | None]:
    """NVML on this node as a local run opens it (preflight.nvml_for), or why it cannot be had."""
    try:
        return nvml_for(device, where=f"on node {socket.gethostname()}"), None
    except PreflightError as exc:
        return None, str(exc)


def assigned_gpu(nvml: Nvml) -> int | None:
    """The NVML index of the GPU Ray gave this process, None if none. Ray numbers a node's GPUs as CUDA does
    without CUDA_VISIBLE_DEVICES (NVML's order on a host of identical GPUs), or names them by UUID when the
    node was started with UUIDs in CUDA_VISIBLE_DEVICES."""
    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids:
        return None
    if ids[0].isdigit():
        return int(ids[0])
    return next((i for i in range(nvml.device_count()) if nvml.state(i).uuid == ids[0]), None)


def where_here(device: str, nvml: Nvml | None) -> dict[str, Any]:
    """The node and GPU this process runs on, for the recipe's summary.json."""
    context = ray.get_runtime_context()
    where: dict[str, Any] = {"backend": "ray", "node_id": context.get_node_id(), "host": socket.gethostname(),
                             "ip": ray.util.get_node_ip_address(), "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                             "actor_pid": os.getpid()}
    if device == "cuda" and nvml is not None and (index := assigned_gpu(nvml)) is not None:
        state = nvml.state(index)
        where |= {"gpu_index": index, "gpu_uuid": state.uuid, "gpu_name": state.name}
    return where


def ray_free_env() -> tuple[dict[str, str], dict[str, list[str]]]:
    """This process's environment less what Ray set for its workers: every RAY_* variable (the cluster's token
    among them), and what differs from the raylet's own environment (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS sized
    to the actor's CPU share, PYTHONBREAKPOINT...), put back as the raylet has it or removed. Returns the
    environment and the names removed and restored."""
    env = dict(os.environ)
    raylet = _raylet_env()
    removed, restored = [], []
    for key, value in list(env.items()):
        if key.startswith("RAY_") or (raylet is None and _RAY_SETS.get(key) == value) or (
                raylet is not None and key not in raylet):
            del env[key]
            removed.append(key)
        elif raylet is not None and raylet[key] != value:
            env[key] = raylet[key]
            restored.append(key)
    return env, {"removed": sorted(removed), "restored": sorted(restored)}


def _raylet_env() -> dict[str, str] | None:
    """The environment of the raylet that started this Ray worker, None when it cannot be read."""
    try:
        parent = psutil.Process(os.getppid())
        return parent.environ() if parent.name() == "raylet" else None
    except psutil.Error:
        return None


# ----------------------------------------------------------------------------- the preflight on the node


def node_preflight(task: NodeTask, chain: list[ChainLink], nvml: Nvml | None, carried: dict[str, dict],
                   where: dict[str, Any]) -> dict[str, Any]:
    """A LaunchDecision's fields (plan.py) as this node decides, plus what the driver keeps for the next actor on
    the same GPU ("baselines", by GPU UUID) and the preflight's messages ("reports")."""
    if nvml is None:  # cpu: nothing to decide
        return {"ok": True, "message": "", "gpu": None, "batch_size": None, "record": {}, "baselines": {},
                "reports": []}
    reports: list[str] = []
    index = assigned_gpu(nvml) if task.device == "cuda" else None  # cpu + fake NVML: every GPU, as locally
    try:
        preflight = GpuPreflight(nvml, device=task.device, gpus=None if index is None else [index],
                                 release_timeout=task.release_timeout, report=reports.append)
    except PreflightError as exc:
        return _refused(f"on node {where['host']}: {exc}")
    uuids = {i: nvml.state(i).uuid or str(i) for i in preflight.gpus}
    leftover = _wait_for_our_workers(nvml, preflight.gpus, marker(task.run_id), task.release_timeout)
    if leftover:
        return _refused(f"on node {where['host']}: worker(s) of this run still hold GPU memory after "
                        f"{task.release_timeout:.0f}s: {'; '.join(p.describe() for p in leftover)}. End them "
                        "(kill -9 the pid), then run the remaining recipes again.")
    for i, uuid in uuids.items():
        known = carried.get(uuid) or {}
        preflight.carry_over(i, known.get("baseline"), known.get("last_pid"), known.get("last_recipe", ""))
    decision = preflight.before_launch(RecipePlan(task.recipe, chain=chain), gpu=index)
    return {"ok": decision.ok, "message": decision.message, "gpu": decision.gpu, "batch_size": decision.batch_size,
            "record": decision.record, "reports": reports,
            "baselines": {uuid: preflight.baseline_of(i) for i, uuid in uuids.items()}}


def _refused(message: str) -> dict[str, Any]:
    return {"ok": False, "message": message, "gpu": None, "batch_size": None, "record": {}, "baselines": {},
            "reports": []}


def _wait_for_our_workers(nvml: Nvml, gpus: list[int], prefix: str, timeout: float) -> list[GpuProcess]:
    """Wait up to `timeout` until no `python -m worker` of this run (its spec lies in a folder named with
    `prefix`) is listed on `gpus`; those still there after it."""
    deadline = time.monotonic() + timeout
    while True:
        ours = [p for i in gpus for p in nvml.state(i).processes if _is_our_worker(p.pid, prefix)]
        if not ours or time.monotonic() >= deadline:
            return ours
        time.sleep(POLL_S)


def _is_our_worker(pid: int, prefix: str) -> bool:
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "worker" in cmdline and any(prefix in part for part in cmdline)


def plan_here(task: NodeTask) -> dict[str, Any]:
    """`plan --backend ray` on one node: the lineage as it resolves there, the estimate and the verdict on the
    node's GPU (the one Ray gave this task, or with the fake NVML the one with the most free memory)."""
    nvml, problem = node_nvml(task.device)
    where = where_here(task.device, nvml)
    chain, lineage_problem = resolve_here(task, where["host"])
    problem = problem or lineage_problem
    if problem is not None:
        return {"where": where, "lines": [problem], "ok": False}
    assert chain is not None  # resolve_here gives a chain or a problem, and there is no problem
    agreed = "as on the driver" if task.chain is not None else "(the driver could not resolve it)"
    lines = [f"node {where['host']}: lineage resolves, {len(chain)} link(s) {agreed}"]
    preflight = None
    if nvml is not None:
        index = assigned_gpu(nvml) if task.device == "cuda" else None
        try:
            preflight = GpuPreflight(nvml, device=task.device, gpus=None if index is None else [index])
        except PreflightError as exc:
            return {"where": where, "lines": [*lines, str(exc)], "ok": False}
    more, ok = plan_lines(RecipePlan(task.recipe, chain=chain), task.device, preflight)
    return {"where": where, "lines": lines + more, "ok": ok, "chain": chain}


def resolve_task(task: NodeTask) -> dict[str, Any]:
    """The chain as one node resolves it: for a recipe whose paths the driver cannot see."""
    host = socket.gethostname()
    chain, problem = resolve_here(task, host)
    return {"chain": chain, "problem": problem, "host": host}


# ----------------------------------------------------------------------------- the actor


class RecipeNode:
    """One attempt of one recipe on its node (a Ray actor: see the module's docstring): its preflight, then the
    worker's WorkerProcess (process.py), driven from the driver by backend.RayWorkerProcess through `start`,
    `read`, `call` and `cleanup`."""

    def __init__(self, task: NodeTask) -> None:
        self.task = task
        self.nvml, nvml_problem = node_nvml(task.device)
        self.where = where_here(task.device, self.nvml)
        self.chain, self.problem = resolve_here(task, self.where["host"])
        self.problem = nvml_problem or self.problem
        prefix = f"{marker(task.run_id)}{task.recipe.name}-"
        self.folder = RecipeFolder(Path(tempfile.mkdtemp(prefix=prefix)))
        self.proc: WorkerProcess | None = None
        self._log_at = 0

    def preflight(self, recipe: Recipe, carried: dict[str, dict]) -> dict[str, Any]:
        """The node's verdict for `recipe` (as in the recipe file: a worker started ahead was given a guess of
        its batch size)."""
        if self.problem is not None:
            return {**_refused(self.problem), "where": self.where}
        assert self.chain is not None  # resolve_here gave a chain or a problem, and there is no problem
        task = replace(self.task, recipe=recipe)
        return {**node_preflight(task, self.chain, self.nvml, carried, self.where), "where": self.where}

    def start(self, spec_json: bytes) -> dict[str, Any]:
        """Start the worker of `spec_json` (the driver's spec, with the chain as resolved here)."""
        if self.problem is not None:
            return {"problem": self.problem, "where": self.where}
        spec = WorkerSpec.from_json(spec_json).model_copy(update={"chain": self.chain})
        self.folder.spec.write_bytes(spec.to_json())
        base, ray_vars = ray_free_env()
        env, record = worker_env(spec.device, self.where.get("gpu_uuid"), offline=self.task.offline, base=base)
        record["ray"] = ray_vars
        self.proc = WorkerProcess(["--spec", str(self.folder.spec)], env, self.folder.log)
        return {"pid": self.proc.pid, "env_record": record, "where": self.where}

    def read(self, wait: float) -> tuple[bytes | None, bytes]:
        """(result bytes: b"" none yet, None at EOF; new worker-log bytes)."""
        chunk = self.proc.read_results(wait) if self.proc is not None else None
        return chunk, self._new_log(_LOG_CHUNK)

    def call(self, method: str, *args: Any) -> Any:
        """The worker's WorkerHandle `method` (one of GONE_ANSWERS); before it started, what a gone one answers."""
        if method not in GONE_ANSWERS:
            raise ValueError(f"{method!r} is not a worker method the driver may call")
        if self.proc is None:
            return GONE_ANSWERS[method]
        return getattr(self.proc, method)(*args)

    def cleanup(self) -> bytes:
        """Kill what is left of the worker's group and reap it, before this actor is killed; the rest of its log.
        Safe to call twice."""
        if self.proc is not None:
            self.proc.cleanup()
        rest = self._new_log(None)
        shutil.rmtree(self.folder.path, ignore_errors=True)
        return rest

    def _new_log(self, limit: int | None) -> bytes:
        try:
            with open(self.folder.log, "rb") as f:
                f.seek(self._log_at)
                data = f.read(limit if limit is not None else -1)
        except OSError:
            return b""
        self._log_at += len(data)
        return data
