"""`run --backend ray`: the suite of a local run, each recipe's worker on a Ray node.

Where it plugs in: supervisor.Suite takes a preflight (plan.py's Preflight) and a launcher; here both are one
`RayLane`, so the supervision (run folder, durable appends, progress, timeouts and the escalating stop, retries,
resume, reports) is that of a local run:

- a lane is a placement group of one bundle: one GPU and --ray-cpus CPUs (CPUs alone with --device cpu), on
  whichever node Ray finds them. Ray's accounting keeps that GPU the lane's for the whole run, between two
  recipes too, so no other job takes it while the next worker gets ready;
- before each launch, `before_launch` creates the recipe's actor (node.RecipeNode) in the bundle and asks it
  for the node's verdict (lineage there, NVML there, the same estimate and refusal); `launch` then starts the
  worker through that actor, and the supervisor drives a `RayWorkerProcess`, whose methods call the actor;
- with one lane, the next recipes' workers are started ahead, held off the GPU, as locally: their actors share
  the bundle (each asks 1 / (1 + prestart depth) of its GPU and CPUs), and the preflight's wait for released
  memory keeps one worker at a time on the GPU;
- a worker whose actor or node dies is `lost` (RayWorkerProcess.lost): the supervisor retries it with the samples
  not yet received (supervisor.LOST_RETRIES), in a new actor, on whichever node has the lane's bundle then.

Several lanes (one per GPU of the cluster by default, --ray-lanes) run at once, each a Suite whose current recipe
is supervised in a thread, by the driver of the local GPUs (execution/lanes.py): a placed lane with no recipe
takes the next in file order; the main thread keeps the signal handlers, which only set flags. A double Ctrl-C
kills each worker's process group on its node, then its actor (`ray.kill`); Ray itself kills every actor of the
driver when the driver dies, and each worker's stdin lifeline ends it then. Actor tasks cannot be force-cancelled
(`ray.cancel(force=True)` is for tasks): killing the actor is how they end.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from contract.run_row import RecipeRow
from contract.spec import ChainLink, WorkerSpec
from orchestrator.backends.ray.cluster import Cluster, RayBackendError
from orchestrator.backends.ray.node import GONE_ANSWERS, NodeTask, RecipeNode, plan_here, resolve_task
from orchestrator.execution.lanes import Lane, LaneDriver, tagged
from orchestrator.execution.process import TRACEBACK_GRACE_S
from orchestrator.execution.supervisor import Interrupts, Listener, Overlaps, Suite, SuiteOptions
from orchestrator.gpu.preflight import RELEASE_TIMEOUT_S, expected_batch
from orchestrator.planning.plan import LaunchDecision, RecipePlan
from orchestrator.planning.recipes import LineageRules

_CALL_TIMEOUT_S = 120.0  # an actor call that takes longer than this (beyond its own wait) means the node is gone
_SLICE_S = 0.05  # how long the driver blocks in Ray at a time (see _get)
_PLACEMENT_NOTICE_S = 10.0  # how long a lane may wait for Ray to place it before the run says so
_GPU_SLIVER = 0.01  # what a small look-up task asks of a GPU: enough to be sent to a GPU node, next to a run
_ACTOR = ray.remote(RecipeNode)
_PLAN = ray.remote(plan_here)
_RESOLVE = ray.remote(resolve_task)

Report = Callable[[str], None]


@dataclass(frozen=True)
class RaySettings:
    """What every lane of a run shares."""

    device: str
    rules: LineageRules
    run_id: str
    cpus: float = 1.0  # CPUs Ray reserves for each recipe's worker
    hash_weights: bool = False
    offline: bool = True
    release_timeout: float = RELEASE_TIMEOUT_S

    def task(self, plan: RecipePlan) -> NodeTask:
        return NodeTask(plan.recipe, self.rules, plan.chain, self.device, self.run_id, self.hash_weights,
                        self.offline, self.release_timeout)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _get(ref: Any, timeout: float) -> Any:
    """ray.get, waited for in short slices. While Ray blocks in get it looks for signals about once a second, and
    two Ctrl-C within one look count as one (Python runs the handler of a signal once, however often it came):
    the second, "kill now", would be lost."""
    deadline = time.monotonic() + timeout
    while not ray.wait([ref], timeout=_SLICE_S)[0]:
        if time.monotonic() > deadline:
            raise GetTimeoutError(f"no answer from Ray within {timeout:.0f}s")
    return ray.get(ref)


def _kill(actor: Any) -> None:
    with contextlib.suppress(RayError, ValueError):
        ray.kill(actor)


# ----------------------------------------------------------------------------- the worker, seen from the driver


class RayWorkerProcess:
    """The WorkerHandle (process.py) of a worker on a Ray node: each call is a call of its actor, which drives the
    worker's own WorkerProcess there (node.RecipeNode.call). The log comes back in chunks with the results and is
    appended to the run folder's worker.log, so nothing of it is lost with the node. Any Ray error makes it
    `lost`: from then on it reads as a closed pipe and does nothing."""

    def __init__(self, actor: Any, spec: WorkerSpec, log_path: Path, forget: Callable[[Any], None]) -> None:
        self.actor = actor
        self.log_path = log_path
        self.lost: str | None = None
        self._forget = forget
        self._started = actor.start.remote(spec.to_json())  # not waited for: a held worker's actor may be starting
        self._info: dict[str, Any] | None = None
        self._returncode: int | None = None
        self._closed = False

    def _start_info(self) -> dict[str, Any]:
        if self._info is None:
            try:
                self._info = _get(self._started, _CALL_TIMEOUT_S)
            except RayError as exc:
                self._info = {}
                self._lose(exc)
            if self._info.get("problem"):  # a held worker whose node refused its lineage never started
                self._lose_with(self._info["problem"])
        return self._info

    @property
    def pid(self) -> int | None:
        return self._start_info().get("pid")

    @property
    def where(self) -> dict | None:
        return self._start_info().get("where")

    @property
    def env_record(self) -> dict | None:
        return self._start_info().get("env_record")

    def _ask(self, call: Callable[[], Any], wait: float, default: Any) -> Any:
        """The answer of an actor call (`call` makes it), `default` once the worker is lost."""
        if self.lost is None:
            self._start_info()
        if self.lost is not None:
            return default
        try:
            return _get(call(), wait + _CALL_TIMEOUT_S)
        except RayError as exc:
            self._lose(exc)
            return default

    def _call(self, method: str, *args: Any, wait: float = 0.0) -> Any:
        """The worker's WorkerHandle `method`, called on its node; once it is lost, what a gone worker answers."""
        return self._ask(lambda: self.actor.call.remote(method, *args), wait, GONE_ANSWERS[method])

    def _lose(self, exc: BaseException) -> None:
        self._lose_with(f"the Ray actor on node {(self._info or {}).get('where', {}).get('host', '?')} was lost "
                        f"({_short(exc)})")

    def _lose_with(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            self._append(f"\n=== evalorch: {why} ===\n".encode())

    def _append(self, data: bytes) -> None:
        if data:
            with open(self.log_path, "ab") as f:
                f.write(data)

    def read_results(self, wait: float = 0.0) -> bytes | None:
        answer = self._ask(lambda: self.actor.read.remote(wait), wait, None)
        if answer is None:
            return None
        chunk, log = answer
        self._append(log)
        return chunk

    def send(self, line: bytes) -> bool:
        return bool(self._call("send", line))

    def poll(self) -> int | None:
        if self._returncode is None:
            self._returncode = self._call("poll")
        return self._returncode

    def wait(self, timeout: float) -> int | None:
        if self._returncode is None:
            self._returncode = self._call("wait", timeout, wait=timeout)
        return self._returncode

    def kill(self) -> None:
        self._call("kill")

    def stop(self, reason: str, grace: float = TRACEBACK_GRACE_S) -> list[dict]:
        return list(self._call("stop", reason, grace, wait=grace + 10.0))

    def cleanup(self) -> None:
        """The worker's group killed on its node (by the actor, before it dies: ray-project/ray#31451), the rest
        of its log kept, then the actor killed. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._info is None and ray.wait([self._started], timeout=0)[0]:  # started, never asked (a held one)
            self._start_info()
        if self._info is not None and self.lost is None:
            with contextlib.suppress(RayError):
                self._append(_get(self.actor.cleanup.remote(), _CALL_TIMEOUT_S))
        _kill(self.actor)  # a held worker's actor not yet started is killed as it is: its worker's lifeline ends it
        self._forget(self.actor)


# ----------------------------------------------------------------------------- one lane: a bundle, its recipes


class RayLane:
    """One placement-group bundle and the recipes run in it, one at a time: the Preflight (plan.py) and the
    launcher (supervisor.py) of one Suite."""

    def __init__(self, index: int, settings: RaySettings, depth: int, report: Report) -> None:
        self.lane = Lane.ray(index)
        self.settings = settings
        self.report = report
        self.share = 1.0 / (1 + depth)  # of the bundle, for each actor: the running worker and `depth` held ones
        bundle = {"CPU": settings.cpus} | ({"GPU": 1.0} if settings.device == "cuda" else {})
        self.bundle = bundle
        self.group = placement_group([bundle], strategy="STRICT_PACK")
        self._ready, self._since, self._placed, self._noticed = self.group.ready(), time.monotonic(), False, False
        self._held: dict[str, Any] = {}  # recipe -> the actor of its worker started ahead
        self._reserved: dict[str, Any] = {}  # recipe -> the actor its preflight ran in, for the launch that follows
        self._procs: dict[str, RayWorkerProcess] = {}
        self._gpus: dict[str, dict[str, Any]] = {}  # GPU UUID -> baseline, last worker (for the next actor there)
        self._gpu_of: dict[str, str] = {}  # recipe -> the GPU UUID its last verdict was for
        self._lock = threading.Lock()

    def placed(self, wait: float = 0.0) -> bool:
        """Whether Ray has placed the bundle, waiting up to `wait` seconds; a lane that waits long says so once."""
        if not self._placed:
            self._placed = bool(ray.wait([self._ready], timeout=wait)[0])
        if not self._placed and not self._noticed and time.monotonic() - self._since > _PLACEMENT_NOTICE_S:
            self._noticed = True
            self.report(f"Ray: {self.lane.label} waits for a node with {self.bundle} free "
                        f"(cluster now: {ray.available_resources()})")
        return self._placed

    def wait_placed(self, give_up: Callable[[], bool]) -> bool:
        """Wait until Ray has placed the bundle; False if `give_up()` first."""
        while not self.placed(wait=_SLICE_S):
            if give_up():
                return False
        return True

    def close(self) -> None:
        for actor in [*self._held.values(), *self._reserved.values()]:
            _kill(actor)
        with contextlib.suppress(RayError, ValueError):
            remove_placement_group(self.group)

    def _new_actor(self, plan: RecipePlan) -> Any:
        gpus = self.share if self.settings.device == "cuda" else 0
        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=0)
        return _ACTOR.options(num_cpus=self.settings.cpus * self.share, num_gpus=gpus, max_restarts=0,
                              max_concurrency=4, scheduling_strategy=strategy).remote(self.settings.task(plan))

    # ------------------------------------------------------------------ the Preflight protocol

    def before_launch(self, plan: RecipePlan, gpu: int | None = None) -> LaunchDecision:
        """The node's verdict, asked of the worker started ahead for `plan` if there is one, else of a new actor
        (kept for the launch)."""
        name = plan.recipe.name
        with self._lock:
            held = self._held.get(name)
            stale = self._reserved.pop(name, None)
        if stale is not None:
            _kill(stale)
        answer = self._ask(held, plan) if held is not None else None
        actor = held
        if answer is None:
            actor = self._new_actor(plan)
            answer = self._ask(actor, plan)
            if answer is None:
                return LaunchDecision(ok=False, message=f"recipe '{name}': Ray could not run its preflight on a node "
                                                        "(see the messages above)")
            if answer["ok"]:
                with self._lock:
                    self._reserved[name] = actor
        for line in answer["reports"]:
            self.report(f"[{answer['where']['host']}] {line}")
        self._keep(name, answer)
        if not answer["ok"]:
            _kill(actor)
        record = {**answer["record"], "node": answer["where"]}
        return LaunchDecision(answer["ok"], answer["message"], answer["gpu"], answer["batch_size"], record)

    def _ask(self, actor: Any, plan: RecipePlan) -> dict[str, Any] | None:
        try:
            timeout = 2 * self.settings.release_timeout + _CALL_TIMEOUT_S  # placement, start, both release waits
            return _get(actor.preflight.remote(plan.recipe, self._carried()), timeout)
        except RayError as exc:
            self.report(f"Ray: the preflight of {plan.recipe.name} failed on its actor ({_short(exc)})")
            _kill(actor)
            return None

    def _carried(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {uuid: dict(known) for uuid, known in self._gpus.items()}

    def _keep(self, name: str, answer: dict[str, Any]) -> None:
        with self._lock:
            for uuid, baseline in answer["baselines"].items():
                self._gpus.setdefault(uuid, {}).setdefault("baseline", baseline)  # before our first worker
            if (uuid := answer["record"].get("gpu_uuid")) is not None:
                self._gpu_of[name] = uuid

    def after_exit(self, plan: RecipePlan, pid: int | None) -> None:
        name = plan.recipe.name
        with self._lock:
            unused = self._reserved.pop(name, None)
            uuid = self._gpu_of.get(name)
            if uuid is not None and pid is not None:
                self._gpus.setdefault(uuid, {}).update(last_pid=pid, last_recipe=name)
        if unused is not None:
            _kill(unused)

    def expected_batch(self, plan: RecipePlan, gpu: int | None = None) -> int | None:
        """The batch size a worker started ahead should prepare: as locally, for the lane's GPU as it was free
        before this run's first worker (None until the node said, or with no estimate)."""
        with self._lock:
            baselines = [known["baseline"]["free"] for known in self._gpus.values() if "baseline" in known]
        return expected_batch(plan, self.settings.device, baselines[-1]) if baselines else None

    # ------------------------------------------------------------------ the launcher

    def launch(self, spec: WorkerSpec, spec_path: Path, env: dict[str, str], log_path: Path) -> RayWorkerProcess:
        """The worker of `spec` on the lane's node: in the actor its preflight ran in, a new one for a worker
        started ahead. (`env` is the driver's: the node builds its own, node.RecipeNode.start.)"""
        name = spec.recipe.name
        plan = RecipePlan(spec.recipe, chain=spec.chain)
        with self._lock:
            actor = None if spec.hold else self._reserved.pop(name, None)
        if actor is None:  # held, or (should not happen) a launch without a verdict: in this same bundle
            actor = self._new_actor(plan)
        proc = RayWorkerProcess(actor, spec, log_path, self._forget)
        with self._lock:
            if spec.hold:
                self._held[name] = actor
            self._procs[name] = proc
        return proc

    def _forget(self, actor: Any) -> None:
        with self._lock:
            for table in (self._held, self._reserved):
                for name in [n for n, a in table.items() if a is actor]:
                    del table[name]


# ----------------------------------------------------------------------------- the run


def lane_count(cluster: Cluster, device: str, cpus: float, asked: int | None, recipes: int) -> int:
    """How many recipes run at once: as asked, else one per GPU of the cluster (cuda) or one (cpu); never more
    than there are recipes. Refuses what the cluster cannot hold."""
    if device == "cuda" and cluster.gpus == 0:
        raise RayBackendError("--device cuda, but the Ray cluster has no GPU: use --device cpu, or add GPU nodes")
    if cpus > cluster.largest("CPU"):
        raise RayBackendError(f"--ray-cpus {cpus:g}: no node of the Ray cluster has that many CPUs "
                              f"(the largest has {cluster.largest('CPU'):g})")
    lanes = asked or (cluster.gpus if device == "cuda" else 1)
    return max(1, min(lanes, recipes))


def resolve_on_cluster(plans: list[RecipePlan], settings: RaySettings) -> list[RecipePlan]:
    """The plans, where the driver could not resolve a chain, as a node resolves it: paths are the nodes'."""
    options = {"num_cpus": 0, "num_gpus": _GPU_SLIVER if settings.device == "cuda" else 0}
    pending = {i: _RESOLVE.options(**options).remote(settings.task(p)) for i, p in enumerate(plans)
               if not p.runnable and (p.problem or "").startswith("lineage")}
    resolved = list(plans)
    for i, ref in pending.items():
        try:
            answer = ray.get(ref, timeout=_CALL_TIMEOUT_S)
        except RayError as exc:
            answer = {"chain": None, "problem": f"{plans[i].problem}; no node could resolve it ({_short(exc)})"}
        chain: list[ChainLink] | None = answer["chain"]
        if chain is not None:
            resolved[i] = RecipePlan(plans[i].recipe, chain=chain, checkpoint=plans[i].checkpoint)
        else:
            resolved[i] = RecipePlan(plans[i].recipe, problem=answer["problem"], checkpoint=plans[i].checkpoint)
    return resolved


def run_on_ray(cluster: Cluster, plans: list[RecipePlan], run_dir: Path, options: SuiteOptions,
               settings: RaySettings, *, lanes: int | None, listener: Listener, interrupts: Interrupts,
               report: Report) -> list[RecipeRow]:
    """Every recipe of `plans` through the supervisor, its worker on the cluster; the rows of Suite.run()."""
    plans = resolve_on_cluster(plans, settings)
    count = lane_count(cluster, settings.device, settings.cpus, lanes, sum(p.runnable for p in plans) or 1)
    depth = options.prestart_depth if options.prestart and count == 1 else 0
    report(f"Ray: {count} lane(s) of {settings.cpus:g} CPU{' and 1 GPU' if settings.device == 'cuda' else ''} "
           f"each{f', {depth} worker(s) started ahead' if depth else ''}")
    opened = [RayLane(i, settings, depth, report) for i in range(count)]
    try:
        if count == 1:
            lane = opened[0]
            lane.wait_placed(lambda: interrupts.stop_requested)
            suite = Suite(plans, run_dir, options, listener=listener, preflight=lane, interrupts=interrupts,
                          launcher=lane.launch)
            return suite.run()  # after an interrupt while waiting, every recipe is kept or skipped at once
        return _run_lanes(opened, plans, run_dir, replace(options, prestart=False), listener, interrupts)
    finally:
        for lane in opened:
            lane.close()


def _run_lanes(lanes: list[RayLane], plans: list[RecipePlan], run_dir: Path, options: SuiteOptions,
               listener: Listener, interrupts: Interrupts) -> list[RecipeRow]:
    """Each lane a Suite of its own, driven by lanes.LaneDriver: a placed lane with no recipe takes the next."""
    overlaps = Overlaps()  # shared: each recipe's row names those that ran at the same time
    suites = {lane.lane: Suite(plans, run_dir, options, listener=tagged(listener, lane.lane), preflight=lane,
                               interrupts=interrupts, launcher=lane.launch, overlaps=overlaps)
              for lane in lanes}
    recorder = Suite(plans, run_dir, options, listener=listener, interrupts=interrupts, overlaps=overlaps)
    return LaneDriver(plans, suites, recorder, _FreeLanes(lanes), interrupts).run()


class _FreeLanes:
    """The Placer (lanes.py) of Ray lanes: each placed lane with no recipe takes the next one in file order."""

    def __init__(self, lanes: list[RayLane]) -> None:
        self.lanes = lanes

    def place(self, waiting: list[str], running: Mapping[str, Lane]) -> list[tuple[str, Lane]]:
        busy = set(running.values())
        free = [lane.lane for lane in self.lanes if lane.lane not in busy and lane.placed()]
        return list(zip(waiting, free, strict=False))

    def ended(self, name: str) -> None:
        """Nothing to release: a lane's actors go with each recipe (RayLane.after_exit)."""


def plan_on_ray(plans: list[RecipePlan], settings: RaySettings) -> list[dict[str, Any]]:
    """`plan --backend ray`: for each recipe, what a node says (node.plan_here), in order. On cuda the task
    asks a sliver of a GPU, so that it runs on a GPU node and NVML there has a GPU to judge."""
    gpus = _GPU_SLIVER if settings.device == "cuda" else 0
    refs = [_PLAN.options(num_cpus=0, num_gpus=gpus).remote(settings.task(plan)) for plan in plans]
    answers = []
    for plan, ref in zip(plans, refs, strict=True):
        try:
            answers.append(ray.get(ref, timeout=_CALL_TIMEOUT_S))
        except RayError as exc:
            answers.append({"where": {}, "lines": [f"{plan.recipe.name}: no node answered ({_short(exc)})"],
                            "ok": False})
    return answers
