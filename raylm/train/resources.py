"""How many CPUs each training worker holds, and how many torch threads it runs.

Ray Train gives a worker one CPU unless told otherwise, and torch inside it then runs one thread: a
one-worker run on a laptop left every other core idle. Unless `train.cpus_per_worker` is set, a run's
workers now share the CPUs Ray has:

- CPU-only: each worker gets `CPUs / workers` (whole CPUs while there are at least as many CPUs as
  workers, else an equal fraction, so that more workers than cores still start). An elastic run
  divides by its *max* workers: the group it may grow into must fit on the same nodes, and a smaller
  group leaves CPUs idle rather than never growing. On several nodes the share is lowered until every
  worker fits on some node (no worker is asked for more CPUs than a node has).
- GPU: one GPU per worker (Ray Train's `use_gpu`), and the CPUs of a GPU node split among its GPUs
  (for data work and CPU-side ops), the smallest share over the GPU nodes.
- A Tune sweep runs `concurrent_runs` trainers at once; they split the CPUs between them.

The share is taken from the CPUs free when the run starts (all of them on an idle cluster, once the
previous run's have come back), so a run next to other work on a shared cluster waits for nothing that
is not free. Each worker sets torch's
intra-op threads to the whole CPUs it holds (at least one); both figures are logged by the workers to
MLflow (metrics `cpus_per_worker`, `torch_threads`) and printed by the driver.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from raylm.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class NodeResources:
    """What one alive Ray node has: its CPUs and GPUs."""

    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class WorkerResources:
    """What each worker of a run asks Ray for, and the torch threads it runs."""

    use_gpu: bool
    cpus_per_worker: float  # 0 only on a GPU node without CPUs: the worker then asks for none
    torch_threads: int
    chosen_by: str  # "train.cpus_per_worker" (set), "cluster" (shared out here), "ray" (no node yet: Ray's default)

    def describe(self, workers: int | tuple[int, int]) -> str:
        count = workers if isinstance(workers, int) else f"{workers[0]}-{workers[1]}"
        device = "GPU + " if self.use_gpu else ""
        why = {"train.cpus_per_worker": "set by train.cpus_per_worker", "cluster": "the free CPUs of the cluster, shared",
               "ray": "Ray's default: no node of that kind is up yet"}[self.chosen_by]
        return (f"{count} worker(s), each {device}{self.cpus_per_worker:g} CPU(s) and {self.torch_threads} torch "
                f"thread(s) ({why})")

    def ray_resources(self) -> dict[str, float] | None:
        """`ScalingConfig.resources_per_worker` (Ray adds GPU: 1 when use_gpu); None: Ray's default."""
        if self.chosen_by == "ray":
            return None
        return {"CPU": self.cpus_per_worker}


def threads_for(cpus: float) -> int:
    """Torch intra-op threads for a worker holding `cpus` CPUs: the whole ones, at least one."""
    return max(1, math.floor(cpus))


def even_share(node_cpus: list[float], free_cpus: float, workers: int) -> float:
    """The largest equal CPU share for `workers` workers out of `free_cpus` that still lets every worker
    fit on one node: whole CPUs when there are enough, else a fraction (two decimals, rounded down)."""
    share = math.floor(free_cpus / workers)
    while share >= 1 and sum(math.floor(cpus / share) for cpus in node_cpus) < workers:
        share -= 1
    if share >= 1:
        return float(share)
    return max(math.floor(100 * min(free_cpus, max(node_cpus, default=0)) / workers) / 100, 0.01)


def resolve_worker_resources(train: TrainConfig, nodes: list[NodeResources], free_cpus: float,
                             concurrent_runs: int = 1, fixed: bool = True) -> WorkerResources:
    """The resources of each worker of `train` on a cluster of `nodes` with `free_cpus` CPUs free now,
    when `concurrent_runs` such runs (Tune trials) share it.

    `fixed`: the cluster is what it is (a local instance raylm started): a set `train.cpus_per_worker`
    it cannot meet is a ConfigError naming the key. On a cluster that may grow (an autoscaler adds
    nodes as Ray Train asks for workers), nothing is refused, and where no node of the needed kind is
    up yet the workers ask for Ray's defaults (one CPU; none beside a GPU)."""
    gpu_nodes = [node for node in nodes if node.gpus > 0]
    use_gpu = bool(gpu_nodes) if train.use_gpu == "auto" else train.use_gpu
    if train.cpus_per_worker is not None:
        if fixed:
            check_fits(train, nodes, train.cpus_per_worker, concurrent_runs)
        return WorkerResources(use_gpu, train.cpus_per_worker, threads_for(train.cpus_per_worker),
                               "train.cpus_per_worker")
    workers = train.max_workers * concurrent_runs
    if use_gpu:
        if not gpu_nodes:
            return WorkerResources(True, 0.0, 1, "ray")
        per_gpu = min(math.floor(node.cpus / node.gpus) for node in gpu_nodes)
        gpus = max(1, min(workers, int(sum(node.gpus for node in gpu_nodes))))
        share = float(max(0, min(per_gpu, math.floor(free_cpus / gpus))))
        return WorkerResources(True, share, threads_for(share), "cluster")
    node_cpus = [node.cpus for node in nodes if node.cpus > 0]
    if not node_cpus:
        return WorkerResources(False, 1.0, 1, "ray")
    share = even_share(node_cpus, free_cpus if free_cpus > 0 else sum(node_cpus), workers)
    return WorkerResources(False, share, threads_for(share), "cluster")


def check_fits(train: TrainConfig, nodes: list[NodeResources], cpus: float, concurrent_runs: int = 1) -> None:
    """ConfigError when a set `train.cpus_per_worker` cannot be met: no node has that many CPUs, or the
    cluster cannot hold the run's (min) workers at that size."""
    largest = max((node.cpus for node in nodes), default=0.0)
    if cpus > largest:
        raise ConfigError([f"train.cpus_per_worker = {cpus:g}: no node of the Ray cluster has that many CPUs "
                           f"(the largest has {largest:g})"])
    fit = sum(math.floor(node.cpus / cpus + 1e-9) for node in nodes)
    needed = train.min_workers * concurrent_runs
    if fit < needed:
        raise ConfigError([f"train.cpus_per_worker = {cpus:g} with train.workers = {train.workers!r}: the Ray cluster "
                           f"holds {fit} such worker(s), the run needs {needed}"])


def cluster_nodes(settle_s: float = 3.0) -> tuple[list[NodeResources], float]:
    """The alive nodes of the connected Ray cluster, and the CPUs free now. CPUs a run that just ended
    still holds come back within a moment (its placement group is removed asynchronously): wait up to
    `settle_s` for all of them before counting what is free, so that back-to-back runs get the same share."""
    # deferred: pulls in ray, slow to import; only this path needs it
    import ray

    nodes = [NodeResources(node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0))
             for node in ray.nodes() if node.get("Alive")]
    total = sum(node.cpus for node in nodes)
    deadline = time.monotonic() + settle_s
    free = ray.available_resources().get("CPU", 0.0)
    while free < total and time.monotonic() < deadline:
        time.sleep(0.2)
        free = ray.available_resources().get("CPU", 0.0)
    return nodes, free


def worker_resources(train: TrainConfig, concurrent_runs: int = 1) -> WorkerResources:
    """`resolve_worker_resources` on the connected Ray cluster (fixed when raylm started it itself)."""
    # deferred: pulls in ray, slow to import; only this path needs it
    from raylm.runtime import started_local_instance

    nodes, free = cluster_nodes()
    return resolve_worker_resources(train, nodes, free, concurrent_runs, fixed=started_local_instance())
