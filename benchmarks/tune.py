"""Sweep wall time with ASHA against the same trials run to completion (no early stopping).

Same search space (lr log-uniform x batch size), same seed (so the same sampled trials), same budget,
same concurrency, one after the other on this Ray instance. Reported for each: wall time of the whole
sweep, wall time until the best trial's last result (the sweep start to the moment the best config
is known), trials stopped early, the best config and its val loss; then the ratios ASHA / full and
whether both found the same best configuration.

    python benchmarks/tune.py [--samples 6] [--steps 60] [--seed 0]

Ends with one line: `tune: asha_s=... full_s=... ratio_total=... ratio_to_best=... same_best=...`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
import _repo  # noqa: F401,E402  (puts the repository root on sys.path)

from raylm.config import validate_config  # noqa: E402
from raylm.runtime import init_ray  # noqa: E402
from raylm.tracking import Tracker  # noqa: E402
from raylm.tune import run_sweep  # noqa: E402
from raylm.workspace import Workspace  # noqa: E402
from tests.train_helpers import make_packed  # noqa: E402


def sweep(root: Path, packed: dict, scheduler: str, args: argparse.Namespace) -> dict:
    config = validate_config({
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32},
        "train": {"workers": 1, "lr": 3e-3, "warmup_steps": 2, "max_steps": args.steps, "micro_batch_size": 4,
                  "global_batch_size": 8, "eval_every": 10, "eval_sequences": 16, "checkpoint_every": args.steps,
                  "report_every": 10, "use_gpu": False},
        "tune": {"search_space": {"train.lr": {"loguniform": [1e-5, 1e-2]},
                                  "train.global_batch_size": {"choice": [4, 8]}},
                 "num_samples": args.samples, "scheduler": scheduler, "budget_steps": args.steps,
                 "grace_period": 10, "reduction_factor": 2, "seed": args.seed, "max_concurrent": 2},
        "workspace": {"root": str(root)},
        "cluster": {"num_cpus": 2, "include_dashboard": False},
    })
    init_ray(config.cluster)
    workspace = Workspace(str(root))
    started = time.time()
    manifest = run_sweep(config, workspace, Tracker(config.tracking, workspace), packed, "tokenize:bench")
    total = time.time() - started
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(manifest["experiment_path"])
    best_id = manifest["best"]["trial_id"]
    best_done = analysis.trial_dataframes[best_id]["timestamp"].max() if best_id in analysis.trial_dataframes else None
    return {"total_s": total, "to_best_s": (best_done - started) if best_done else total,
            "stopped": manifest["metrics"]["trials_stopped_early"], "best": manifest["best"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raylm-bench-tune-") as folder:
        root = Path(folder)
        (root / "packed").mkdir()
        packed = make_packed(root / "packed")
        results = {name: sweep(root / name, packed, scheduler, args)
                   for name, scheduler in (("asha", "asha"), ("full", "none"))}
    asha, full = results["asha"], results["full"]
    same = asha["best"]["params"] == full["best"]["params"]
    print(f"\n{args.samples} trials x {args.steps} steps, seed {args.seed}, 2 at a time on 2 CPUs")
    print(f"{'sweep':<8}{'total s':>10}{'to best s':>11}{'stopped':>9}{'best val_loss':>15}  best config")
    for name, r in results.items():
        params = ", ".join(f"{k}={v:.3g}" for k, v in r["best"]["params"].items())
        print(f"{name:<8}{r['total_s']:>10.1f}{r['to_best_s']:>11.1f}{r['stopped']:>9}{r['best']['value']:>15.4f}  {params}")
    print(f"tune: asha_s={asha['total_s']:.1f} full_s={full['total_s']:.1f} "
          f"ratio_total={asha['total_s'] / full['total_s']:.3f} asha_to_best_s={asha['to_best_s']:.1f} "
          f"full_to_best_s={full['to_best_s']:.1f} ratio_to_best={asha['to_best_s'] / full['to_best_s']:.3f} "
          f"asha_stopped={asha['stopped']} same_best={str(same).lower()}")


if __name__ == "__main__":
    main()
