"""Helpers for the sweep tests and benchmark: a tiny experiment config and a driver for one sweep."""

from __future__ import annotations

import sys
from pathlib import Path

from raylm.artifacts import Packed
from raylm.config import RaylmConfig, validate_config

TINY_TRAIN = dict(workers=1, lr=3e-3, warmup_steps=2, max_steps=40, micro_batch_size=4, global_batch_size=8,
                  eval_every=10, eval_sequences=16, checkpoint_every=10, report_every=10, use_gpu=False)


def sweep_config(workspace: Path, **tune) -> RaylmConfig:
    """4 trials (lr grid x batch grid) of 40 steps on a 2-layer model; ASHA rungs at steps 10 and 20."""
    section = dict(search_space={"train.lr": {"grid": [3e-3, 1e-5]}, "train.global_batch_size": {"grid": [4, 8]}},
                   num_samples=1, budget_steps=40, grace_period=10, reduction_factor=2, max_concurrent=2)
    section.update(tune)
    return validate_config({
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32},
        "train": TINY_TRAIN,
        "tune": section,
        "workspace": {"root": str(workspace)},
        "cluster": {"num_cpus": 2, "include_dashboard": False},
    })


def run_tiny_sweep(workspace: Path, packed: Packed, **tune) -> dict:
    from raylm.runtime import init_ray
    from raylm.tracking import Tracker
    from raylm.tune import run_sweep
    from raylm.workspace import Workspace

    config = sweep_config(workspace, **tune)
    init_ray(config.cluster)
    root = Workspace(config.workspace.root)
    return run_sweep(config, root, Tracker(config.tracking, root), packed, "tokenize:tiny")


if __name__ == "__main__":  # a sweep driver process that a test can kill: WORKSPACE PACKED_JSON
    import json

    packed = Packed.from_manifest(json.loads(Path(sys.argv[2]).read_text()))
    print(json.dumps(run_tiny_sweep(Path(sys.argv[1]), packed)["metrics"]))
