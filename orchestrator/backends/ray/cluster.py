"""The Ray cluster of `--backend ray`: connect to one (`--address`), or start a local one for the run and stop it
at the end. Ray is an optional extra (`pip install evalorch[ray]`): this module imports it only when asked, so
that `import orchestrator.cli` stays light and a missing Ray is a clear error, not a traceback.

Token authentication (Ray >= 2.59). A local cluster that `ray.init()` starts enables it by default, and when no
token exists Ray writes a new one to ~/.ray/auth_token, in the user's home, for good. A local cluster started
here instead gets a fresh token in its own temporary folder (`RAY_AUTH_MODE=token`,
`RAY_AUTH_TOKEN_PATH=<folder>/auth_token`, mode 0600), which every process of the cluster inherits and which
goes away with the cluster; an explicit `RAY_AUTH_MODE` (or a token of the user's, `RAY_AUTH_TOKEN` or
`RAY_AUTH_TOKEN_PATH`) is left as it is. Connecting to an existing cluster that uses tokens needs the cluster's
token where Ray looks for it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): without it the
connection is refused, and the error says so. The worker never sees any of these: backends/ray/node.py strips RAY_*.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

# Ray's object store holds nothing big of ours (result and log chunks): a small one spares /dev/shm.
_OBJECT_STORE_BYTES = 256 * 2**20
# Ray's sockets live in its temporary folder; a Unix socket path has room for about 107 bytes.
_SHORT_TMP = "/tmp"
# Ray Client's proxier starts a server process for each connection, forking from its gRPC threads, and that server
# now and then dies as it starts (ray-project/ray#63202: about 7% of starts in its reports; seen here in CI). The
# connection is refused with the first message where the proxier saw it die, with the second where it died after
# (its channel never came up). A new connection gets a new server, so it is asked again, a few times.
_CLIENT_SERVER_DIED = ("Starting Ray client server failed", "Proxy failed to Connect to backend")
_CLIENT_ATTEMPTS = 3


class RayBackendError(UserError):
    """Ray is missing, or the cluster cannot be reached or cannot run the suite as asked."""


def require_ray() -> Any:
    """The ray module, or a RayBackendError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayBackendError(f"--backend ray needs Ray, which is not installed here ({exc}): "
                              "pip install 'evalorch[ray]'") from None
    return ray


@dataclass
class Cluster:
    """The cluster this run uses: where it is, whether this run started it, and what it offers."""

    address: str | None  # as given (None: a local cluster started for this run)
    started: bool
    resources: dict[str, float] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)  # alive nodes: id, host, resources
    auth: str = ""
    attempts: int = 1  # connections made until one held (Ray Client's server may die as it starts)

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    def largest(self, resource: str) -> float:
        """The most of `resource` one node has (a lane's bundle must fit on one node)."""
        return max((node["resources"].get(resource, 0.0) for node in self.nodes), default=0.0)

    def record(self) -> dict[str, Any]:
        """What run.json keeps of the cluster."""
        ray = require_ray()
        return {"name": "ray", "address": self.address, "local_cluster": self.started, "ray_version": ray.__version__,
                "auth": self.auth, "connect_attempts": self.attempts, "cpus": self.resources.get("CPU", 0.0),
                "gpus": self.gpus,
                "nodes": [{"node_id": n["node_id"], "host": n["host"], "gpus": n["resources"].get("GPU", 0.0),
                           "cpus": n["resources"].get("CPU", 0.0)} for n in self.nodes]}


@contextlib.contextmanager
def open_cluster(address: str | None, *, num_cpus: int | None = None,
                 report: Callable[[str], None] = lambda message: None) -> Iterator[Cluster]:
    """Connected to the cluster at `address` ("auto", "ray://HOST:PORT", "HOST:PORT"), or to a local one started
    now (and stopped when the block ends) when `address` is None. `report` is told of a connection asked again."""
    if address is None:
        with _local_environment() as (folder, auth):
            ray = require_ray()
            _init(ray, None, report, num_cpus=num_cpus, include_dashboard=False,
                  object_store_memory=_OBJECT_STORE_BYTES, _temp_dir=str(folder / "ray"))
            try:
                yield _describe(ray, None, started=True, auth=auth)
            finally:
                ray.shutdown()
        return
    ray = require_ray()
    attempts = _init(ray, address, report)
    try:
        yield _describe(ray, address, started=False, auth=os.environ.get("RAY_AUTH_MODE", ""), attempts=attempts)
    finally:
        ray.shutdown()


def _init(ray: Any, address: str | None, report: Callable[[str], None], **options: Any) -> int:
    """ray.init, asked again where Ray Client's server for the connection died as it started; the attempts made."""
    attempt = 1
    while True:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **options)
            return attempt
        except (ConnectionError, ray.exceptions.RayError, RuntimeError, ValueError) as exc:
            causes = [str(exc)] + ([str(exc.__cause__)] if exc.__cause__ else [])
            if attempt == _CLIENT_ATTEMPTS or not any(m in cause for m in _CLIENT_SERVER_DIED for cause in causes):
                where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
                raise RayBackendError(f"cannot start or reach {where}: {'; '.join(causes)}") from None
        ray.shutdown()
        attempt += 1
        report(f"Ray Client's server for this connection did not start (Ray's own race, ray-project/ray#63202, "
               f"kills one now and then); connecting again ({attempt} of {_CLIENT_ATTEMPTS})")


def _describe(ray: Any, address: str | None, *, started: bool, auth: str, attempts: int = 1) -> Cluster:
    nodes = [{"node_id": n["NodeID"], "host": n.get("NodeManagerHostname") or n.get("NodeManagerAddress", ""),
              "resources": dict(n.get("Resources") or {})} for n in ray.nodes() if n.get("Alive")]
    return Cluster(address, started, dict(ray.cluster_resources()), nodes, auth, attempts)


@contextlib.contextmanager
def _local_environment() -> Iterator[tuple[Path, str]]:
    """A temporary folder for a local cluster (its sessions, sockets, address file and token), and the
    environment its processes inherit; both undone at the end."""
    folder = Path(tempfile.mkdtemp(prefix="evalorch-ray-", dir=_SHORT_TMP if os.path.isdir(_SHORT_TMP) else None))
    changes = {"RAY_TMPDIR": str(folder)}  # where Ray writes its address file too, not /tmp/ray
    auth = os.environ.get("RAY_AUTH_MODE") or "token"
    if "RAY_AUTH_MODE" not in os.environ:
        changes["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            token = folder / "auth_token"
            token.touch(mode=0o600)
            token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
            changes["RAY_AUTH_TOKEN_PATH"] = str(token)
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    refresh_ray_config()
    try:
        yield folder, auth
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        refresh_ray_config()
        shutil.rmtree(folder, ignore_errors=True)


def refresh_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its config when it is imported; after a change, have it read it again (what
    Ray's own `_enable_token_auth` does). Nothing to do when Ray is not imported yet."""
    if "ray" in sys.modules:
        with contextlib.suppress(ImportError, AttributeError):
            from ray._raylet import Config  # type: ignore[attr-defined]  # ray's _raylet.pyi omits the compiled Config

            Config.initialize("")
