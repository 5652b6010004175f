"""How one stage runs: reuse a finished result, or compute it into a fresh folder, and log either way.

Every stage (curate, tokenize, pretrain, eval, ...) goes through `execute`: the stage's folder is
named by its config and inputs; when its success marker exists the stage is not run again (unless
forced) and its manifest is logged to a run tagged `raylm.reused=true`; otherwise the folder is
cleared, the stage's body runs inside an MLflow run, and the manifest and marker are written last.
A body returns its typed artifact (raylm/artifacts.py) and `execute` returns the artifact read back
from the manifest, the same whether the stage ran now or earlier.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, TypeVar

import mlflow

from raylm.artifacts import Artifact
from raylm.tracking import Tracker
from raylm.workspace import StageDir

log = logging.getLogger("raylm")

A = TypeVar("A", bound=Artifact)


def execute(stage: StageDir, section: dict[str, Any], tracker: Tracker, body: Callable[[StageDir], A],
            kind: type[A], force: bool = False, resumable: bool = False,
            extra_params: dict[str, Any] | None = None) -> A:
    """Run `body(stage)` unless its result exists; return the stage's artifact of type `kind`.

    The artifact's `metrics` (a flat dict of numbers) are also logged to MLflow. A `resumable` stage
    (training) keeps what an interrupted run left in its folder, so it can continue from there; other
    stages start from an empty folder.
    """
    manifest = run_stage(stage, section, tracker, lambda st: body(st).to_manifest(), force, resumable, extra_params)
    return kind.from_manifest(manifest)


def run_stage(stage: StageDir, section: dict[str, Any], tracker: Tracker,
              body: Callable[[StageDir], dict[str, Any]], force: bool = False, resumable: bool = False,
              extra_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """`execute` for a stage whose outputs are a plain dict (a Tune sweep's): returns the manifest."""
    if stage.is_complete() and not force:
        manifest = stage.manifest()
        log.info("%s: reusing finished result %s", stage.name, stage.uri)
        with tracker.stage_run(stage, section, reused=True, extra_params=extra_params):
            tracker.log_metrics(manifest.get("metrics", {}))
            tracker.log_manifest(manifest)
            mlflow.set_tag("raylm.source_run", manifest.get("mlflow_run_id", ""))
        return manifest

    if resumable and not force:
        stage.fs.create_dir(stage.fs_path(), recursive=True)
    else:
        stage.prepare(force=True)
    log.info("%s: writing %s", stage.name, stage.uri)
    with tracker.stage_run(stage, section, extra_params=extra_params) as run:
        started = time.perf_counter()
        outputs = body(stage)
        metrics = {**outputs.get("metrics", {}), "stage_seconds": time.perf_counter() - started}
        outputs["metrics"] = metrics
        manifest = stage.finish({**outputs, "mlflow_run_id": run.info.run_id})
        tracker.log_metrics(metrics)
        tracker.log_manifest(manifest)
    return manifest
