"""Connecting to Ray, and checking that a cluster can see the storage the stages write to.

`init_ray`: a cluster when one is named (`cluster.address` or `RAY_ADDRESS`, which `ray job submit`
sets for the job's driver; `auto` finds one started with `ray start` on this machine), otherwise a new
local instance sized by `cluster.num_cpus`. Called once by each command before any stage runs; all
the stages of `raylm pipeline` share that instance. Back-to-back commands can share one too: start it
once (`ray start --head`) and run each with `RAY_ADDRESS=auto`, which saves Ray's start-up (~6 s) per
command.

`check_shared_storage`: on a cluster of several nodes every stage output, checkpoint and the MLflow
store must be on storage all nodes see; a workspace on the driver's local disk would leave shards on
one node and checkpoints on another. Object stores (`s3://`, `gs://`) and an HTTP MLflow server are
shared by construction; a local path (a ReadWriteMany volume, NFS) is checked for real: the driver
writes a probe file and a zero-CPU task pinned to each alive node looks for it.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

import ray
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raylm import failure
from raylm.config import ClusterConfig, ConfigError
from raylm.console import quiet_ray
from raylm.storage import is_object_store, probe_workspace

log = logging.getLogger("raylm")

PROBE_PREFIX = ".raylm-shared-probe-"
_started_local = False  # this process started its own local instance (a cluster of fixed size)


def started_local_instance() -> bool:
    """True when `init_ray` started a new local instance: nothing else adds nodes to it."""
    return _started_local and ray.is_initialized()


def init_ray(config: ClusterConfig) -> None:
    global _started_local
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    runtime_env = None
    if config.runtime_env:
        with open(config.runtime_env) as handle:
            runtime_env = yaml.safe_load(handle)
    forward = not failure.quiet()  # workers' output on the console only with --verbose (else Ray's session logs)
    if failure.quiet():
        quiet_ray()  # Ray's own start-up lines (auth token, dashboard) too
    if address:
        context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=forward)
    else:  # "local": always a new instance, never a cluster some other `ray start` left running
        context = ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=config.include_dashboard,
                           runtime_env=runtime_env, log_to_driver=forward)
        _started_local = True
    start_autoscaling_coordinator()
    failure.refresh_console()  # Ray set up its console loggers just now
    if failure.quiet():
        quiet_ray()
    resources = {key: value for key, value in ray.cluster_resources().items() if not key.startswith("node:")}
    log.info("ray: %s; worker logs in %s/logs", resources, context.address_info.get("session_dir", "?"))


def start_autoscaling_coordinator() -> None:
    """Start, without waiting for it, the detached actor that Ray Train's controller sends its resource
    requests to, so that it comes up while the driver imports and opens its MLflow run. Left to the
    controller, the actor starts (a process that imports Ray Data) only when the first `fit()` asks for
    it, and the worker group waits: up to 5 s per try (Ray's timeout), twice on a busy machine.
    The same named actor (`get_if_exists`) that Ray Train and Ray Data use; a Ray without it skips this."""
    try:
        # deferred: a private Ray Data module (the coordinator Ray Train 2.60 calls); only this path needs it
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    try:
        get_or_create_autoscaling_coordinator()
    except Exception as error:  # noqa: BLE001 - an optimisation only: Ray Train creates it itself when needed
        log.debug("could not start Ray's autoscaling coordinator early: %s", error)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


@dataclass(frozen=True)
class LocalStorage:
    """A folder on a filesystem path that every node must see; `key` is the config key that set it."""

    key: str
    value: str
    folder: str


def local_storage(workspace_root: str, tracking_uri: str) -> list[LocalStorage]:
    """The storage a run writes to that lives on a filesystem path (as opposed to an object store or
    a server): the workspace folder, and the folder of a SQLite / file MLflow store."""
    found = []
    if "://" not in workspace_root or workspace_root.startswith("file://"):
        folder = os.path.abspath(workspace_root.removeprefix("file://"))
        found.append(LocalStorage("workspace.root", workspace_root, folder))
    if tracking_uri.startswith("sqlite:///"):
        found.append(LocalStorage("tracking.uri", tracking_uri,
                                  os.path.dirname(os.path.abspath(tracking_uri.removeprefix("sqlite:///")))))
    elif tracking_uri.startswith(("file:", "/", "./", "../")):
        found.append(LocalStorage("tracking.uri", tracking_uri, os.path.abspath(tracking_uri.removeprefix("file:"))))
    return found


def storage_problems(storage: list[LocalStorage], unseen: dict[str, list[str]]) -> list[str]:
    """Config problems for the folders some nodes cannot see (`unseen`: folder -> node addresses)."""
    problems = []
    for item in storage:
        nodes = unseen.get(item.folder)
        if nodes:
            problems.append(
                f"{item.key} = {item.value!r}: {item.folder} is on the driver's local disk, not seen by "
                f"node(s) {', '.join(sorted(nodes))}; on a multi-node cluster use storage every node sees "
                "(s3://, gs://, or a ReadWriteMany / NFS volume mounted at the same path) and an MLflow "
                "server (MLFLOW_TRACKING_URI=http://mlflow:5000)")
    return problems


def _on_node(node: dict, function, *args):
    strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    return ray.remote(num_cpus=0, max_retries=0)(function).options(scheduling_strategy=strategy).remote(*args)


def _check_object_store_from_every_node(root: str, nodes: list[dict], timeout_s: float) -> None:
    refs = {_on_node(node, probe_workspace, root): node["NodeManagerAddress"] for node in nodes}
    problems = [f"{problem} (from node {refs[ref]})" for ref, problem in zip(refs, ray.get(list(refs), timeout=timeout_s))
                if problem]
    if problems:
        raise ConfigError(problems)
    log.info("shared storage: %s written, read and deleted from all %d nodes", root, len(nodes))


def _sees_probe(folder: str, name: str, content: str) -> bool:
    try:
        with open(os.path.join(folder, name)) as handle:
            return handle.read() == content
    except OSError:
        return False


def check_shared_storage(config: ClusterConfig, workspace_root: str, tracking_uri: str,
                         timeout_s: float = 120.0) -> int:
    """Raise ConfigError when a local folder the run writes to is not seen by every alive node, or when
    a node cannot write, read and delete an object in an object-store workspace (its credentials or
    endpoint differ from the driver's). Returns the number of nodes checked (0 when nothing needed it)."""
    if not config.check_shared_storage or not ray.is_initialized():
        return 0
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return 0
    checked = 0
    if is_object_store(workspace_root):
        _check_object_store_from_every_node(workspace_root, nodes, timeout_s)
        checked = len(nodes)
    storage = local_storage(workspace_root, tracking_uri)
    if not storage:
        return checked
    name, content = f"{PROBE_PREFIX}{uuid.uuid4().hex}", uuid.uuid4().hex
    folders = sorted({item.folder for item in storage})
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as handle:
            handle.write(content)
    try:
        pending = {}
        for node in nodes:
            for folder in folders:
                pending[_on_node(node, _sees_probe, folder, name, content)] = (folder, node["NodeManagerAddress"])
        seen = ray.get(list(pending), timeout=timeout_s)
    finally:
        for folder in folders:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
    unseen: dict[str, list[str]] = {}
    for (folder, address), ok in zip(pending.values(), seen):
        if not ok:
            unseen.setdefault(folder, []).append(address)
    problems = storage_problems(storage, unseen)
    if problems:
        raise ConfigError(problems)
    log.info("shared storage: %s seen by all %d nodes", ", ".join(folders), len(nodes))
    return len(nodes)
