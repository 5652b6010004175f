"""Connecting to Ray: a cluster when one is named (`cluster.address` or `RAY_ADDRESS`; `auto` finds
one started with `ray start` on this machine), otherwise a new local instance sized by
`cluster.num_cpus`. Called once by each command before any stage runs."""

from __future__ import annotations

import logging
import os

import ray

from raylm.config import ClusterConfig

log = logging.getLogger("raylm")


def init_ray(config: ClusterConfig) -> None:
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    runtime_env = None
    if config.runtime_env:
        import yaml

        with open(config.runtime_env) as handle:
            runtime_env = yaml.safe_load(handle)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:  # "local": always a new instance, never a cluster some other `ray start` left running
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=config.include_dashboard,
                 runtime_env=runtime_env, log_to_driver=True)
    log.info("ray: %s", ray.cluster_resources())


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
