"""How one stage runs: reuse a finished result, or compute it into an attempt folder, and log either way.

Every stage (curate, tokenize, pretrain, eval, ...) goes through `execute`: the stage's folder is
named by its config and inputs; when its commit exists the stage is not run again (unless forced) and
its manifest is logged to a run tagged `raylm.reused=true`. When another live run is writing the same
stage, this one waits for that run's commit and reuses it. Otherwise the body runs inside an MLflow run,
writing into an attempt folder of its own, and the manifest and the commit are written last
(`raylm.workspace` says how a commit stays whole on every store).
A body returns its typed artifact (raylm/artifacts.py) and `execute` returns the artifact read back
from the manifest, the same whether the stage ran now or earlier.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, TypeVar

from raylm import failure, tracking
from raylm.artifacts import Artifact
from raylm.tracking import Tracker
from raylm.workspace import STALE_AFTER_S, StageConflict, StageDir

log = logging.getLogger("raylm")

A = TypeVar("A", bound=Artifact)


def execute(stage: StageDir, section: dict[str, Any], tracker: Tracker, body: Callable[[StageDir], A],
            kind: type[A], force: bool = False, resumable: bool = False,
            extra_params: dict[str, Any] | None = None) -> A:
    """Run `body(stage)` unless its result exists; return the stage's artifact of type `kind`.

    The artifact's `metrics` (a flat dict of numbers) are also logged to MLflow. A `resumable` stage
    (training) continues the attempt an interrupted run left; other stages start a new attempt.
    """
    manifest = run_stage(stage, section, tracker, lambda st: body(st).to_manifest(), force, resumable, extra_params)
    return kind.from_manifest(manifest)


def run_stage(stage: StageDir, section: dict[str, Any], tracker: Tracker,
              body: Callable[[StageDir], dict[str, Any]], force: bool = False, resumable: bool = False,
              extra_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """`execute` for a stage whose outputs are a plain dict (a Tune sweep's): returns the manifest.

    A `resumable` stage (training) takes back the attempt an interrupted run left, so it can continue
    from there; other stages start a new attempt.
    """
    with failure.stage(stage.name):
        return _run_stage(stage, section, tracker, body, force, resumable, extra_params)


def _run_stage(stage: StageDir, section: dict[str, Any], tracker: Tracker,
               body: Callable[[StageDir], dict[str, Any]], force: bool, resumable: bool,
               extra_params: dict[str, Any] | None) -> dict[str, Any]:
    if not force:
        wait_for_other_run(stage)
    if stage.is_complete() and not force:
        return reuse(stage, section, tracker, extra_params)

    close_runs_left_open(stage, tracker)
    stage.begin(resumable=resumable and not force)
    log.info("%s: writing %s", stage.name, stage.path())
    try:
        with tracker.stage_run(stage, section, extra_params=extra_params) as run:
            started = time.perf_counter()
            outputs = body(stage)
            metrics = {**outputs.get("metrics", {}), "stage_seconds": time.perf_counter() - started}
            outputs["metrics"] = metrics
            try:
                manifest = stage.finish({**outputs, "mlflow_run_id": run.info.run_id}, replace=force)
            except StageConflict as conflict:
                tracking.set_tag("raylm.superseded", str(conflict))
                manifest = None
            else:
                log_summary(tracker, metrics)
                tracker.log_manifest(manifest)
    finally:
        stage.release()
    if manifest is None:  # another run of the same stage committed first: its result stands, ours goes
        log.warning("%s: another run committed %s first; reusing its result", stage.name, stage.uri)
        stage.fs.delete_dir(stage.fs_path())
        stage.attempt = None
        return reuse(stage, section, tracker, extra_params)
    stage.discard_abandoned()
    return manifest


# Summary figures that say nothing at these values (they stay in the manifest): None means never logged.
QUIET_SUMMARY = {"evaluated": None, "checkpoints_refused": 0, "resumed_from_step": -1}


def log_summary(tracker: Tracker, metrics: dict[str, Any]) -> None:
    """A stage's summary figures to its MLflow run, at the stage's last step when it trains (so a summary
    ends the curves the run logged while training, instead of adding a point at step 0)."""
    last_step = metrics.get("step")
    shown = {key: value for key, value in metrics.items()
             if key not in QUIET_SUMMARY or (QUIET_SUMMARY[key] is not None and value != QUIET_SUMMARY[key])}
    tracker.log_metrics(shown, step=int(last_step) if isinstance(last_step, (int, float)) and last_step == last_step else None)


def reuse(stage: StageDir, section: dict[str, Any], tracker: Tracker,
          extra_params: dict[str, Any] | None) -> dict[str, Any]:
    """Log a finished stage's manifest to a run tagged `raylm.reused=true` and return it."""
    manifest = stage.manifest()
    log.info("%s: reusing finished result %s", stage.name, stage.uri)
    with tracker.stage_run(stage, section, reused=True, extra_params=extra_params):
        log_summary(tracker, manifest.get("metrics", {}))
        tracker.log_manifest(manifest)
        tracking.set_tag("raylm.source_run", manifest.get("mlflow_run_id", ""))
    return manifest


def close_runs_left_open(stage: StageDir, tracker: Tracker) -> None:
    """A run killed mid-flight (SIGKILL, a lost node) never ends its MLflow run. Before this stage starts
    again, its runs still RUNNING whose attempt no live process writes are ended KILLED, with the reason."""
    live = {stage.attempt_uri(owner.attempt) for owner in stage.owners() if owner.is_live()}
    for run_id, attempt in tracker.open_stage_runs(stage.name, stage.fingerprint):
        if attempt not in live:
            reason = f"found RUNNING when {stage.name} started again; no live process writes {attempt or 'its attempt'}"
            log.warning("%s: closing MLflow run %s left open by a killed run", stage.name, run_id)
            tracker.close_run(run_id, "KILLED", reason)


def wait_for_other_run(stage: StageDir, poll_s: float = 2.0) -> None:
    """While another live run writes this stage (and it is not committed), wait; it ends by commit or death."""
    announced = None
    while not stage.is_complete():
        other = stage.live_owner()
        if other is None:
            return
        if announced != other.attempt:
            log.warning("%s: %s is writing %s; waiting for it to finish (it is taken as dead %.0f s after "
                        "its last heartbeat)", stage.name, other.describe(), stage.uri, STALE_AFTER_S)
            announced = other.attempt
        time.sleep(poll_s)
