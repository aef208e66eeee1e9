"""`--backend ray` on a real Ray cluster on this machine: one two-node cluster (ray.cluster_utils.Cluster, token
authentication on, the fake NVML on its nodes) for the whole module; the CLI connects to it with --address, as a
user's driver does. Real workers, real tiny models, real files: the same per-sample results as the local backend,
recipes placed on both nodes, the same through Ray Client (`ray://`), a Ray worker killed mid-recipe retried with the
missing samples, Ctrl-C leaving no worker behind, the node's refusal naming the holders, `plan` asking the cluster,
a local cluster of its own."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, only_run_dir, run_cli, wait_for_samples, write_recipes

from contract.nvml import FAKE_ENV, write_fake_nvml
from orchestrator.results.store import read_samples

GIB = 2**30
_SLOW = ("flaky", "first")  # recipes whose workers wait half a second before each sample (worker/faults.py)
_ROOMY = [{"name": "Fake H100", "uuid": "GPU-fake-0", "total_bytes": 80 * GIB, "free_bytes": 79 * GIB,
           "processes": []}]
# Ray Client's server for a connection dies as it starts, once, where a test creates the file the cluster's
# environment names here: ray-project/ray#63202's race (the server forked from the proxier's gRPC threads dies at
# once), on demand. Every Python process of the cluster imports this; only a server whose file exists exits.
_DIES_ENV = "EVALORCH_TEST_CLIENT_SERVER_DIES"
_SITECUSTOMIZE = f"""import os, sys
_marker = os.environ.get("{_DIES_ENV}")
if _marker and "--mode=specific-server" in sys.argv and os.path.exists(_marker):
    os.remove(_marker)
    os._exit(1)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict]:
    """A head node and a second node of 2 CPUs each, token authentication on (a token of its own, as a cluster's
    admin sets up), the head serving Ray Client (`client`: its ray:// address). The nodes' environment is theirs,
    not the driver's: it holds EVALORCH_FAKE_NVML (a roomy GPU; a test may rewrite the file) and the fault switch
    of the recipes that must run slowly (`_SLOW`). Its folder is short: Ray's socket paths must fit in 107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="evalorch-test-ray-", dir="/tmp"))
    token = folder / "auth_token"
    token.write_text("0123456789abcdef" * 4)
    fake = folder / "nvml.json"
    write_fake_nvml(fake, _ROOMY)
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder / "site"), os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"RAY_TMPDIR": str(folder), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                           FAKE_ENV: str(fake), "EVALORCH_FAULT": ",".join(f"{n}:delay@each" for n in _SLOW),
                           "PYTHONPATH": path, _DIES_ENV: str(folder / "client-server-dies"),
                           "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "10"}.items():  # a dead server: 10 s, not 30
            patch.setenv(key, value)
        from ray.cluster_utils import Cluster

        from orchestrator.backends.ray.cluster import refresh_ray_config

        refresh_ray_config()  # this process too talks to the cluster (wait_for_nodes)
        client_port = _free_port()
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                              "object_store_memory": 128 * 2**20,
                                                              "ray_client_server_port": client_port})
        nodes.add_node(num_cpus=2, object_store_memory=128 * 2**20)
        nodes.wait_for_nodes()
        try:
            yield {"address": nodes.address, "client": f"ray://127.0.0.1:{client_port}", "fake": fake, "token": token,
                   "node_ids": {node.node_id for node in nodes.list_all_nodes()},
                   "client_server_dies": folder / "client-server-dies"}
        finally:
            nodes.shutdown()
            refresh_ray_config()
    shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    """A port nothing listens on now (the OS's pick), for the head's Ray Client server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _recipes(tmp_path: Path, demo: dict, names: dict[str, str], **defaults: object) -> Path:
    models = demo["root"] / "models"
    body = "".join(f'[[recipe]]\nname = "{n}"\nmodel = "{models}/{model}"\n' for n, model in names.items())
    return write_recipes(tmp_path, body, demo, **{"batch_size": 2, "limit": 4, **defaults})


def _summary(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name / "summary.json").read_text())


def _results(run_dir: Path, name: str) -> list[tuple]:
    return sorted((s["id"], s["text"], s["iou"], s["pred"]) for s in read_samples(run_dir / name / "samples.jsonl"))


def _workers_of(run_dir: Path) -> list[psutil.Process]:
    """Live `python -m worker` processes of this run on the nodes: their spec lies in a folder named after it."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "-m worker" in cmdline and f"evalorch-{run_dir.name}-" in cmdline and \
                proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _none_left(run_dir: Path, within: float = 15.0) -> list[psutil.Process]:
    deadline = time.monotonic() + within
    while (left := _workers_of(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_suite_on_two_nodes_gives_the_local_backends_results(cluster: dict, demo: dict, tmp_path: Path) -> None:
    """Two lanes of a whole node each: one recipe on each node, at once; per sample, what the local backend
    gives. Each summary.json says where it ran; the worker's environment lost Ray's variables (its token too)."""
    recipes = _recipes(tmp_path, demo, {"base": "base", "r3-two-stage": "r3-stage2"})
    local = run_cli("run", str(recipes), "--out", str(tmp_path / "local"), "--device", "cpu")
    assert local.returncode == 0, local.stdout + local.stderr
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "ray"), "--device", "cpu", "--backend", "ray",
                     "--address", cluster["address"], "--ray-lanes", "2", "--ray-cpus", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 node(s)" in result.stderr and "2 lane(s) of 2 CPU" in result.stdout
    assert set(re.findall(r"starting on (lane \d)", result.stdout)) == {"lane 0", "lane 1"}  # Ray lanes, no GPU
    assert "[GPU" not in result.stdout and "on GPU" not in result.stdout  # (the node's preflight names its GPU)
    local_dir, ray_dir = only_run_dir(tmp_path / "local"), only_run_dir(tmp_path / "ray")
    for name in ("base", "r3-two-stage"):
        assert _results(ray_dir, name) == _results(local_dir, name), name
        assert len(_results(ray_dir, name)) == 4
    summaries = {name: _summary(ray_dir, name) for name in ("base", "r3-two-stage")}
    nodes = {s["ran_on"]["node_id"] for s in summaries.values()}
    assert nodes == cluster["node_ids"]  # one recipe on each node
    for summary in summaries.values():
        assert summary["status"] == "ok" and summary["ran_on"]["host"] and summary["ran_on"]["backend"] == "ray"
        assert summary["preflight"]["node"]["node_id"] == summary["ran_on"]["node_id"]
        assert summary["preflight"]["gpu_uuid"] == "GPU-fake-0"  # the node's NVML (the fake) was asked
        env = summary["env_set"]
        assert {"RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_JOB_ID"} <= set(env["ray"]["removed"])
        assert env["set"]["CUDA_VISIBLE_DEVICES"] == ""
    assert summaries["r3-two-stage"]["lineage"][0]["source"] == "remap"  # resolved on the node, remap applied
    run_record = json.loads((ray_dir / "run.json").read_text())
    assert run_record["backend"]["name"] == "ray" and len(run_record["backend"]["nodes"]) == 2
    assert not _none_left(ray_dir)


def test_ray_client_reaches_the_cluster_and_gives_the_local_backends_results(cluster: dict, demo: dict,
                                                                             tmp_path: Path) -> None:
    """`--address ray://HOST:PORT`, as README shows it: the driver connects through Ray Client (what
    `pip install evalorch[ray]` must bring, `ray[client]`), the recipe runs on a node, the results are the local
    backend's. The Ray Client server of its first connection dies as it starts (Ray's race, made to happen here):
    the driver says so, connects again, and run.json records the two attempts."""
    recipes = _recipes(tmp_path, demo, {"base": "base"}, limit=2)
    local = run_cli("run", str(recipes), "--out", str(tmp_path / "local"), "--device", "cpu")
    assert local.returncode == 0, local.stdout + local.stderr
    cluster["client_server_dies"].touch()
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "ray"), "--device", "cpu", "--backend", "ray",
                     "--address", cluster["client"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert not cluster["client_server_dies"].exists()  # the first connection's server did die
    assert "did not start" in result.stderr and "connecting again (2 of 3)" in result.stderr
    local_dir, ray_dir = only_run_dir(tmp_path / "local"), only_run_dir(tmp_path / "ray")
    assert _results(ray_dir, "base") == _results(local_dir, "base") and len(_results(ray_dir, "base")) == 2
    summary = _summary(ray_dir, "base")
    assert summary["status"] == "ok" and summary["ran_on"]["backend"] == "ray"
    assert summary["ran_on"]["node_id"] in cluster["node_ids"]
    run_record = json.loads((ray_dir / "run.json").read_text())
    assert run_record["backend"]["address"] == cluster["client"] and len(run_record["backend"]["nodes"]) == 2
    assert run_record["backend"]["connect_attempts"] in (2, 3)  # a third where Ray's own race struck as well
    assert not _none_left(ray_dir)


def test_a_killed_ray_worker_is_retried_with_the_samples_not_yet_received(cluster: dict, demo: dict,
                                                                          tmp_path: Path) -> None:
    """The actor supervising the worker is killed mid-recipe (its node's Ray worker dies): `lost`, then retried
    in a new actor (although `retries` is 0) with the missing samples only; complete results, no duplicate."""
    recipes = _recipes(tmp_path, demo, {"flaky": "base"}, batch_size=1, limit=4, retry_backoff=0.1)
    out = tmp_path / "runs"
    proc = _start(["run", str(recipes), "--out", str(out), "--device", "cpu", "--backend", "ray",
                   "--address", cluster["address"]])
    run_dir = wait_for_samples(out, "flaky", 2)
    (worker,) = _workers_of(run_dir)
    actor = worker.parent()
    assert "ray" in " ".join(actor.cmdline()).lower()  # the worker's parent is the Ray worker holding the actor
    actor.kill()
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout + stderr
    summary = _summary(run_dir, "flaky")
    assert [a["status"] for a in summary["attempts"]] == ["lost", "ok"], summary["attempts"]
    assert "was lost" in summary["attempts"][0]["detail"]
    first, second = (a["samples"] for a in summary["attempts"])
    assert first >= 2 and first + second == 4
    ids = [s["id"] for s in read_samples(run_dir / "flaky" / "samples.jsonl")]
    assert sorted(ids) == [f"s{i:03d}" for i in range(4)] and summary["metrics"]["n"] == 4
    assert summary["attempts"][0]["ran_on"]["actor_pid"] == actor.pid != summary["ran_on"]["actor_pid"]
    log = (run_dir / "flaky" / "worker.log").read_text()
    assert "was lost" in log and "attempt 2" in log
    assert not _none_left(run_dir)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_through_ray_stops_cleanly_and_leaves_no_worker(cluster: dict, demo: dict, tmp_path: Path,
                                                                presses: int) -> None:
    """Once: the running recipe finishes its batch (`stop` through the actor), nothing new starts. Twice: killed
    at once. Either way no worker is left on the node, the workers started ahead included."""
    # batches of 4 with half a second before each sample: the second press comes before the first batch ends
    recipes = _recipes(tmp_path, demo, {"first": "base", "second": "r1-llm-only"}, batch_size=4, limit=12)
    out = tmp_path / "runs"
    ahead = ["--prestart"] if presses == 2 else ["--no-prestart"]  # one worker started ahead to be killed too
    proc = _start(["run", str(recipes), "--out", str(out), "--device", "cpu", "--backend", "ray",
                   "--address", cluster["address"], "--prestart-depth", "1", *ahead])
    run_dir = wait_for_samples(out, "first", 2)
    running = [w for w in _workers_of(run_dir) if f"-{run_dir.name}-first-" in " ".join(w.cmdline())]
    environ = running[0].environ()
    assert not [key for key in environ if key.startswith("RAY_")] and "PYTHONBREAKPOINT" not in environ
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    first = _summary(run_dir, "first")
    assert first["status"] == "interrupted"
    kept = [s["id"] for s in read_samples(run_dir / "first" / "samples.jsonl")]
    assert 2 <= len(kept) < 12 and len(set(kept)) == len(kept)
    if presses == 2:
        assert [step["action"] for step in first["shutdown"]] == ["kill"]
    else:
        assert first["shutdown"] == [] and first["done"]["counts"]["stopped_early"] is True
        assert len(kept) == 4, (stdout, first["done"], first["timings"])  # the batch it was in, finished
    assert _summary(run_dir, "second")["status"] == "skipped"
    assert not _none_left(run_dir)


def test_the_node_refuses_what_does_not_fit_naming_the_holders_and_plan_asks_the_node(cluster: dict, demo: dict,
                                                                                     tmp_path: Path) -> None:
    """The fake NVML of the nodes now has 1 KiB free, the rest held by a foreign process: the node's preflight
    refuses (nothing starts); `plan --backend ray` prints the node's lineage check, estimate and verdict."""
    holder = subprocess.Popen(["sleep", "600"])
    try:
        write_fake_nvml(cluster["fake"], [{**_ROOMY[0], "free_bytes": 1024,
                                           "processes": [{"pid": holder.pid, "used_bytes": 80 * GIB}]}])
        recipes = _recipes(tmp_path, demo, {"big": "base"}, batch_size=4)
        result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu",
                         "--backend", "ray", "--address", cluster["address"])
        planned = run_cli("plan", str(recipes), "--device", "cpu", "--backend", "ray", "--address",
                          cluster["address"])
    finally:
        write_fake_nvml(cluster["fake"], _ROOMY)
        holder.kill()
        holder.wait()
    assert result.returncode == 1, result.stdout + result.stderr
    summary = _summary(only_run_dir(tmp_path / "runs"), "big")
    assert summary["status"] == "refused" and summary["pid"] is None
    assert f"pid {holder.pid} (sleep)" in summary["detail"] and "Fake H100" in summary["detail"]
    assert summary["preflight"]["node"]["node_id"] in cluster["node_ids"]
    assert planned.returncode == 1, planned.stdout + planned.stderr
    assert "lineage resolves, 1 link(s) as on the driver" in planned.stdout
    assert "memory:" in planned.stdout and f"pid {holder.pid} (sleep)" in planned.stdout


def test_plan_starts_and_stops_a_local_cluster_with_a_token_of_its_own(demo: dict, tmp_path: Path) -> None:
    """Without --address: a local cluster for the command, token authentication on with a token in its own
    folder (not the user's ~/.ray), all of it gone afterwards. A recipe the node cannot resolve says so."""
    models = demo["root"] / "models"
    body = (f'[[recipe]]\nname = "fine"\nmodel = "{models}/r1-llm-only"\n'
            f'[[recipe]]\nname = "missing"\nmodel = "{tmp_path}/nowhere"\n')
    recipes = write_recipes(tmp_path, body, demo)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != FAKE_ENV} | {"HOME": str(home)}
    before = set(Path("/tmp").glob("evalorch-ray-*"))
    done = subprocess.run([sys.executable, "-m", "orchestrator", "plan", str(recipes), "--device", "cpu",
                           "--backend", "ray"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "a local Ray cluster (started for this command)" in done.stderr
    assert "fine" in done.stdout and "lineage resolves, 2 link(s) as on the driver" in done.stdout
    assert "lineage on node" in done.stdout and "nowhere" in done.stdout
    assert not (home / ".ray").exists()  # Ray would have written ~/.ray/auth_token
    assert set(Path("/tmp").glob("evalorch-ray-*")) == before  # the cluster's folder (and token) went with it


def test_without_ray_the_backend_is_a_clear_error(demo: dict, tmp_path: Path) -> None:
    recipes = _recipes(tmp_path, demo, {"x": "base"})
    code = ("import sys; sys.modules['ray'] = None; from orchestrator.cli import main; "
            f"sys.argv = ['evalorch', 'run', {str(recipes)!r}, '--backend', 'ray', '--out', {str(tmp_path)!r}]; main()")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Error: --backend ray needs Ray" in done.stderr and "pip install 'evalorch[ray]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_ray_options_need_the_ray_backend(demo: dict, tmp_path: Path) -> None:
    recipes = _recipes(tmp_path, demo, {"x": "base"})
    env = {"RAY_ADDRESS": ""}
    done = run_cli("plan", str(recipes), "--address", "auto", env=env)
    assert done.returncode == 2 and "--address names a Ray cluster: use it with --backend ray" in done.stderr
    done = run_cli("plan", str(recipes), "--backend", "ray", "--gpus", "0", env=env)
    assert done.returncode == 2 and "--gpus is for the local backend" in done.stderr


def test_a_node_whose_weights_differ_from_the_drivers_refuses_naming_both(demo: dict, tmp_path: Path) -> None:
    from orchestrator.backends.ray.node import NodeTask, resolve_here
    from orchestrator.planning.plan import make_plans
    from orchestrator.planning.recipes import load_recipe_file

    recipe_file = load_recipe_file(_recipes(tmp_path, demo, {"r3": "r3-stage2"}))
    (plan,) = make_plans(recipe_file, recipe_file.recipes)
    task = NodeTask(plan.recipe, recipe_file.lineage, plan.chain, "cpu")
    assert resolve_here(task, "node-a") == (plan.chain, None)
    drivers = [replace(plan.chain[0], fingerprint="quick:other"), plan.chain[1]]
    chain, problem = resolve_here(replace(task, chain=drivers), "node-a")
    assert chain is None and problem.startswith("lineage on node node-a: ")
    assert plan.chain[0].fingerprint in problem and "quick:other" in problem and plan.chain[0].path in problem
    _, shorter = resolve_here(replace(task, chain=plan.chain[:1]), "node-a")
    assert "2 link(s) there, 1 on the driver" in shorter
