"""The `tune` stage: hyperparameter sweeps with Ray Tune, each trial a real Ray Train pretraining run.

Ray Train v2 puts the trainer inside the trial: a Tune trial function builds a `TorchTrainer`
(`raylm.train.launch.build_trainer`) and calls `fit()`; the trainer's evaluation reports reach Tune
through a `TuneReportCallback`, where ASHA compares trials on val loss and stops the weak ones. The
trial itself holds no CPU (only a little memory), the trainer's workers hold the CPUs or GPUs, and the
number of concurrent trials is fitted to what the cluster can give all their workers at once, so
trials never wait on each other's resources.

Everything lives in the stage folder `<workspace>/tune/<key>`: the Tune experiment (`sweep/`, a
standard `ResultGrid` that `Tuner.restore` and `ExperimentAnalysis` read), each trial's Ray Train run
(`trials/<trial_id>/`, its checkpoints), the best config (`best_params.json`, `best_config.yaml`) and
the plot. Rerunning an interrupted sweep restores it: finished trials keep their results, unfinished
ones continue from their latest checkpoint, and the MLflow runs (a parent for the sweep, a nested run
per trial) are reopened instead of duplicated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import Any

import yaml

from raylm import failure, tracking
from raylm.artifacts import Packed
from raylm.config import ConfigError, RaylmConfig, apply_override, dump_config, validate_config
from raylm.stage import run_stage
from raylm.tracking import TAG_PREFIX, Tracker, flatten
from raylm.workspace import StageDir, Workspace, code_version, is_remote, read_text_uri

log = logging.getLogger("raylm")

SWEEP_DIR = "sweep"
TRIALS_DIR = "trials"
STATE_FILE = "sweep_state.json"
BEST_PARAMS = "best_params.json"
BEST_CONFIG = "best_config.yaml"
PLOT = "lr_vs_val_loss.png"
TRIAL_TAG = f"{TAG_PREFIX}tune.trial_id"
TRIAL_DRIVER_MEMORY = 128 * 1024**2  # the trial function only waits on its trainer


# ----------------------------------------------------------------------------------------------
# Validation and the Tune objects built from the config


def trial_config(config: RaylmConfig, params: dict[str, Any]) -> RaylmConfig:
    """The experiment with one trial's sampled values (`{"train.lr": 1e-3, ...}`) applied, validated."""
    tree = config.model_dump(mode="json", exclude_unset=True)  # keys left to defaults stay so (model.explicit_keys)
    for key, value in params.items():
        apply_override(tree, key.split("."), value)
    return validate_config(tree, f"tune trial {params}")


def space_corners(config: RaylmConfig) -> list[dict[str, Any]]:
    """Each value of each key (range ends, every choice) with the others at their first value."""
    space = config.tune.search_space
    first = {key: next(iter(spec.values()))[0] for key, spec in space.items()}
    corners = []
    for key, spec in space.items():
        for value in next(iter(spec.values())):
            corners.append({**first, key: value})
    return corners


def check_sweep(config: RaylmConfig) -> None:
    """Everything that can be checked before Ray starts: every value of the space in the full config,
    the budget, the search algorithm. Raises ConfigError naming the keys."""
    problems = []
    for params in space_corners(config):
        try:
            trial = trial_config(config, params)
            trial.train.global_batch_sequences(trial.model.seq_len)
        except ConfigError as error:
            problems += [f"tune.search_space {params}: {p}" for p in error.problems]
        except ValueError as error:
            problems.append(f"tune.search_space {params}: {error}")
    tune = config.tune
    kinds = {key: next(iter(spec)) for key, spec in tune.search_space.items()}
    if tune.search_algorithm != "random":
        for key, kind in kinds.items():
            if kind == "grid":
                problems.append(f"tune.search_space.{key}.grid: tune.search_algorithm = {tune.search_algorithm!r} "
                                "samples its own points; use `choice` (grid works with `random`)")
        module = {"optuna": "optuna", "hyperopt": "hyperopt"}[tune.search_algorithm]
        try:
            __import__(module)
        except ImportError:
            problems.append(f"tune.search_algorithm = {tune.search_algorithm!r}: the {module!r} package is not "
                            f"installed (pip install {module}), or use 'random'")
    if tune.metric not in ("val_loss", "val_bpb", "loss"):
        problems.append(f"tune.metric = {tune.metric!r}: expected one the trainer reports: val_loss, val_bpb, loss")
    if problems:
        raise ConfigError(problems)


def trial_steps(config: RaylmConfig) -> int:
    """Optimizer steps one trial runs: the step budget, or the token budget over its batch size."""
    tune = config.tune
    if tune.budget_tokens is not None:
        per_step = config.train.global_batch_sequences(config.model.seq_len) * config.model.seq_len
        return max(1, tune.budget_tokens // per_step)
    return tune.budget_steps or config.train.max_steps


def budget_unit(config: RaylmConfig) -> tuple[str, int, int]:
    """(Tune time attribute, budget, ASHA grace period) in steps, or tokens under a token budget."""
    tune = config.tune
    if tune.budget_tokens is not None:
        first_eval = config.train.eval_every * config.train.global_batch_sequences(config.model.seq_len) \
            * config.model.seq_len
        return "tokens_seen", tune.budget_tokens, tune.grace_period or first_eval
    return "step", trial_steps(config), tune.grace_period or config.train.eval_every


def param_space(config: RaylmConfig) -> dict[str, Any]:
    """The search space as nested Tune domains: {"train": {"lr": tune.loguniform(...)}}."""
    # deferred: pulls in ray, slow to import; only this path needs it
    from ray import tune

    build = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
             "choice": tune.choice, "grid": tune.grid_search}
    space: dict[str, Any] = {}
    for key, spec in config.tune.search_space.items():
        kind, values = next(iter(spec.items()))
        section, field = key.split(".", 1)
        space.setdefault(section, {})[field] = build[kind](values)
    return space


def sampled_params(sample: dict[str, Any]) -> dict[str, Any]:
    """Tune's nested sample back to dotted keys: {"train.lr": 0.001}."""
    return {f"{section}.{field}": value for section, fields in sample.items() if isinstance(fields, dict)
            for field, value in fields.items()}


def search_algorithm(config: RaylmConfig, concurrency: int):
    """Tune's variant generator (random and grid), or Optuna / HyperOpt, limited to `concurrency`
    trials at once (a searcher passed explicitly ignores `TuneConfig.max_concurrent_trials`)."""
    # deferred: pulls in ray, slow to import; only this path needs it
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    tune_cfg = config.tune
    if tune_cfg.search_algorithm == "optuna":
        # deferred: pulls in ray, slow to import; only this path needs it
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=tune_cfg.seed), max_concurrent=concurrency)
    if tune_cfg.search_algorithm == "hyperopt":
        # deferred: pulls in ray, slow to import; only this path needs it
        from ray.tune.search.hyperopt import HyperOptSearch

        return ConcurrencyLimiter(HyperOptSearch(random_state_seed=tune_cfg.seed), max_concurrent=concurrency)
    return BasicVariantGenerator(random_state=tune_cfg.seed, max_concurrent=concurrency)


def scheduler(config: RaylmConfig):
    # deferred: pulls in ray, slow to import; only this path needs it
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.tune.scheduler == "none":
        return FIFOScheduler()
    time_attr, budget, grace = budget_unit(config)
    return ASHAScheduler(time_attr=time_attr, max_t=budget, grace_period=min(grace, budget),
                         reduction_factor=config.tune.reduction_factor)


def fitted_concurrency(config: RaylmConfig, resources: dict[str, float]) -> int:
    """How many trials fit at once: each needs its trainer's workers (one GPU each, or on CPUs
    `train.cpus_per_worker` each, one when unset), and no more than the sweep has trials. With
    `train.cpus_per_worker` unset, the concurrent trials then share all the CPUs (`trial_resources`)."""
    # deferred: pulls in ray, slow to import; only this path needs it
    from raylm.runtime import cluster_has_gpus

    train = config.train
    use_gpu = cluster_has_gpus() if train.use_gpu == "auto" else train.use_gpu
    kind = "GPU" if use_gpu else "CPU"
    per_trial = trial_workers(config)
    per_worker = 1 if use_gpu else (train.cpus_per_worker or 1)
    capacity = int(resources.get(kind, 0) // (per_trial * per_worker))
    if capacity < 1:
        key = "train.workers" if use_gpu or train.cpus_per_worker is None else "train.workers, train.cpus_per_worker"
        raise ConfigError([f"{key} = {train.workers!r}{'' if key == 'train.workers' else f', {per_worker:g}'}: a trial "
                           f"needs {per_trial * per_worker:g} {kind}s for its workers, the cluster has "
                           f"{resources.get(kind, 0):g}"])
    return min(capacity, config.tune.max_concurrent or capacity, total_trials(config))


def trial_workers(config: RaylmConfig) -> int:
    """The most workers any trial of the sweep runs (`train.workers` may be searched)."""
    return max([config.train.max_workers] + [trial_config(config, p).train.max_workers for p in space_corners(config)])


def total_trials(config: RaylmConfig) -> int:
    """Trials in the sweep: `num_samples` times the size of each grid axis."""
    return config.tune.num_samples * math.prod(len(values) for spec in config.tune.search_space.values()
                                               for kind, values in spec.items() if kind == "grid")


def trial_resources(config: RaylmConfig, concurrency: int):
    """Each trial worker's CPUs and torch threads when `concurrency` trials run at once: with
    `train.cpus_per_worker` unset, they split the CPUs Ray has between them."""
    # deferred: pulls in ray, slow to import; only this path needs it
    from raylm.train.resources import worker_resources

    return worker_resources(config.train.model_copy(update={"workers": trial_workers(config)}), concurrency)


# ----------------------------------------------------------------------------------------------
# One trial (runs inside a Tune trial actor)


def _evaluation_report_callback():
    """Forward to Tune only the trainer's evaluation reports (and the step-0 one), so that ASHA
    compares trials on fresh val losses, never on the value carried between evaluations."""
    # deferred: pulls in ray, slow to import; only this path needs it
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvaluationReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and (metrics[0].get("evaluated") or metrics[0].get("step") == 0):
                super().after_report(run_context, metrics, checkpoint)

    return EvaluationReportCallback()


PLACEMENT_GROUP_FILE = "placement_group.json"


def _placement_group_recorder(trial_dir: str):
    """A controller callback that writes the trainer's placement group id into the trial's folder.

    When ASHA stops a trial, Tune ends the trial actor and with it the trainer's controller; Ray
    Train's own cleaner should then remove the workers' placement group, but in Ray 2.60 it asks the
    state API without an address and dies when the host runs several Ray instances (CI, shared
    machines), leaving the CPUs reserved and the next trials waiting for ever. The driver removes
    the recorded group when the trial ends (`ReleaseTrialResources`).
    """
    # deferred: pulls in pyarrow, ray, slow to import; only this path needs it
    import pyarrow.fs as pafs
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RecordPlacementGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            fs, base = pafs.FileSystem.from_uri(trial_dir) if is_remote(trial_dir) else (
                pafs.LocalFileSystem(), os.path.abspath(trial_dir))
            fs.create_dir(base, recursive=True)
            with fs.open_output_stream(f"{base}/{PLACEMENT_GROUP_FILE}") as out:
                out.write(json.dumps({"id": group.id.hex()}).encode())

    return RecordPlacementGroup()


def _release_trial_resources_callback(trials_path: str):
    # deferred: pulls in pyarrow, ray, slow to import; only this path needs it
    import pyarrow.fs as pafs
    import ray
    from ray.tune import Callback
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    class ReleaseTrialResources(Callback):
        def _release(self, trial) -> None:
            path = f"{trials_path.rstrip('/')}/{trial.trial_id}/{PLACEMENT_GROUP_FILE}"
            fs, inner = pafs.FileSystem.from_uri(path) if is_remote(path) else (pafs.LocalFileSystem(), path)
            try:
                with fs.open_input_stream(inner) as stream:
                    group_id = json.loads(stream.read())["id"]
            except (FileNotFoundError, OSError, ValueError):
                return
            state = ray.util.placement_group_table().get(group_id, {}).get("state")
            if state in (None, "REMOVED"):
                return
            log.info("tune: releasing placement group %s left by trial %s", group_id, trial.trial_id)
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
            except Exception as error:  # noqa: BLE001 - already gone, or the cluster is shutting down
                log.warning("tune: could not remove placement group %s: %s", group_id, error)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

    return ReleaseTrialResources()


def run_trial(sample: dict[str, Any], setup: dict[str, Any]) -> None:
    """A Tune trial: pretrain with the sampled values for the trial budget, on its own TorchTrainer."""
    # deferred: pulls in ray, torch, slow to import; only this path needs it
    import ray.tune

    from raylm.train.launch import build_trainer

    context = ray.tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    params = sampled_params(sample)
    config = trial_config(validate_config(setup["config"]), params)
    tune_budget = config.tune.budget_steps is not None or config.tune.budget_tokens is not None
    # a tune budget sizes each trial; else train.budget does (resolved by build_trainer), else train.max_steps
    train = config.train.model_copy(update={"max_steps": trial_steps(config),
                                            "budget": None if tune_budget else config.train.budget})
    client = tracking.client(setup["tracking_uri"])
    # the trial's nested run, reopened when a restored sweep reruns the trial
    run_id = tracking.child_run(client, setup["experiment_id"], setup["parent_run_id"], TRIAL_TAG, trial_id, trial_name,
                                {f"{TAG_PREFIX}stage": "tune-trial", f"{TAG_PREFIX}code_version": code_version()},
                                {**params, **flatten(config.section("train"), "train."), "train.max_steps": train.max_steps,
                           **flatten(config.section("model"), "model.")})
    trainer = build_trainer(config.model, train, setup["packed"], setup["trials_path"], trial_id,
                            setup["tracking_uri"], run_id, callbacks=[
                                _evaluation_report_callback(),
                                _placement_group_recorder(f"{setup['trials_path'].rstrip('/')}/{trial_id}")],
                            resources=setup.get("worker_resources") if train.cpus_per_worker is None else None)
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    if result.error:
        client.set_terminated(run_id, status="FAILED")
        raise result.error
    client.set_terminated(run_id, status="FINISHED")


# ----------------------------------------------------------------------------------------------
# The sweep (driver)


def plan_tune_stage(config: RaylmConfig, workspace: Workspace, packed_fingerprint: str) -> StageDir:
    section = {"model": config.section("model"), "train": config.section("train"), "tune": config.section("tune")}
    return workspace.stage("tune", section, {"packed": packed_fingerprint})


def tuned_config(config: RaylmConfig, workspace: Workspace, packed_fingerprint: str) -> RaylmConfig:
    """`config` with the best values of its finished sweep on this packed data (unchanged without one)."""
    stage = plan_tune_stage(config, workspace, packed_fingerprint)
    if not stage.is_complete():
        return config
    return trial_config(config, stage.manifest()["best"]["params"])


def _read_state(stage: StageDir) -> dict[str, Any]:
    try:
        return stage.read_json(STATE_FILE)
    except (FileNotFoundError, OSError):
        return {}


def quiet_tune() -> dict[str, Any]:
    """Tune's status tables only with --verbose (raylm logs the sweep's outcome; the run log has the rest).
    Tune's new output engine prints its experiment table even when silent; its classic reporter does not."""
    if not failure.quiet():
        return {}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return {"verbose": 0}


def _trainable(setup: dict[str, Any]):
    # deferred: pulls in ray, slow to import; only this path needs it
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                               {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})


def run_sweep(config: RaylmConfig, workspace: Workspace, tracker: Tracker, packed: Packed,
              packed_fingerprint: str, force: bool = False) -> dict[str, Any]:
    """Run (or restore, or reuse) the sweep of `config.tune`; return the stage manifest."""
    # deferred: pulls in ray, slow to import; only this path needs it
    import ray
    from ray import tune

    check_sweep(config)
    stage = plan_tune_stage(config, workspace, packed_fingerprint)
    section = stage.config
    if stage.is_complete() and not force:
        return run_stage(stage, section, tracker, body=lambda _: {}, force=False)
    if force and stage.exists():
        stage.prepare(force=True)
    stage.fs.create_dir(stage.fs_path(), recursive=True)

    experiment_path = stage.path(SWEEP_DIR)
    previous = _read_state(stage)
    tags = {f"{TAG_PREFIX}stage": "tune", f"{TAG_PREFIX}fingerprint": stage.fingerprint,
            f"{TAG_PREFIX}output": stage.uri, f"{TAG_PREFIX}input.packed": packed_fingerprint,
            f"{TAG_PREFIX}tune.experiment_path": experiment_path}
    if previous.get("parent_run_id"):
        log.info("tune: resuming sweep %s (MLflow run %s)", experiment_path, previous["parent_run_id"])
        parent_run_id = tracking.start_run(run_id=previous["parent_run_id"])
    else:
        parent_run_id = tracking.start_run(run_name="tune", tags={f"{TAG_PREFIX}code_version": code_version(), **tags})
        tracker.log_params(flatten(section))
        stage.write_json(STATE_FILE, {"parent_run_id": parent_run_id, "experiment_path": experiment_path})
    try:
        concurrency = fitted_concurrency(config, ray.cluster_resources())
        resources = trial_resources(config, concurrency)
        log.info("tune: %d trial(s) at once, %s", concurrency, resources.describe(trial_workers(config)))
        metric, mode = config.tune.metric, config.tune.mode
        setup = {"config": config.model_dump(mode="json"), "packed": packed, "trials_path": stage.path(TRIALS_DIR),
                 "tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
                 "parent_run_id": parent_run_id, "worker_resources": resources}
        trainable = _trainable(setup)
        release = _release_trial_resources_callback(setup["trials_path"])
        tracking.set_tag(f"{TAG_PREFIX}tune.concurrency", str(concurrency))
        if tune.Tuner.can_restore(experiment_path) and not force:
            log.info("tune: restoring the interrupted sweep at %s", experiment_path)
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)  # the run config (with `release`) comes back from tuner.pkl
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(config),
                tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=config.tune.num_samples,
                                            scheduler=scheduler(config),
                                            search_alg=search_algorithm(config, concurrency)),
                run_config=tune.RunConfig(name=SWEEP_DIR, storage_path=stage.path(),
                                          failure_config=tune.FailureConfig(max_failures=0),
                                          callbacks=[release], **quiet_tune()),
            )
        grid = tuner.fit()
        outputs = summarize(config, grid, stage, tracker)
        tracking.set_tag(f"{TAG_PREFIX}tune.experiment_path", grid.experiment_path)
        manifest = stage.finish({**outputs, "mlflow_run_id": parent_run_id})
        tracker.log_metrics(outputs["metrics"])
        tracker.log_manifest(manifest)
        tracking.end_run("FINISHED")
        return manifest
    except BaseException:
        tracking.end_run("FAILED")
        raise


def trial_rows(config: RaylmConfig, grid) -> list[dict[str, Any]]:
    """One row per trial: its params, final metric, steps run and whether ASHA stopped it early."""
    rows = []
    for result in grid:
        params = sampled_params(result.config)
        metrics = result.metrics or {}
        planned = trial_steps(trial_config(config, params))
        steps = metrics.get("step")
        rows.append({
            "trial_id": metrics.get("trial_id") or os.path.basename(result.path.rstrip("/")),
            "params": params,
            "metric": metrics.get(config.tune.metric),
            "step": steps,
            "planned_steps": planned,
            "tokens_seen": metrics.get("tokens_seen"),
            "stopped_early": result.error is None and steps is not None and steps < planned,
            "error": None if result.error is None else repr(result.error)[:500],
            "path": result.path,
        })
    return rows


def summarize(config: RaylmConfig, grid, stage: StageDir, tracker: Tracker) -> dict[str, Any]:
    """Best config to the workspace and MLflow, trial runs closed with their outcome, the plot."""
    rows = trial_rows(config, grid)
    client = tracker.client
    for run in tracking.child_runs(client, tracker.experiment_id, tracking.active_run_id()):
        row = next((r for r in rows if r["trial_id"] == run.data.tags.get(TRIAL_TAG)), None)
        if row is None:
            continue
        client.set_tag(run.info.run_id, f"{TAG_PREFIX}tune.stopped_early", str(row["stopped_early"]).lower())
        if row["stopped_early"]:
            client.set_terminated(run.info.run_id, status="KILLED")
        elif row["error"]:
            client.set_terminated(run.info.run_id, status="FAILED")
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FINISHED")
    scored = [r for r in rows if r["metric"] is not None and r["error"] is None and not math.isnan(r["metric"])]
    if not scored:
        errors = [r["error"] for r in rows if r["error"]]
        raise RuntimeError(f"no trial of the sweep {grid.experiment_path} reported {config.tune.metric}"
                           + (f"; first error: {errors[0]}" if errors else ""))
    pick = min if config.tune.mode == "min" else max
    best = pick(scored, key=lambda r: r["metric"])
    best_config = trial_config(config, best["params"])
    best_payload = {"params": best["params"], "metric": config.tune.metric, "value": best["metric"],
                    "trial_id": best["trial_id"], "steps": best["step"], "experiment_path": grid.experiment_path}
    stage.write_json(BEST_PARAMS, best_payload)
    stage.write_text(BEST_CONFIG, dump_config(best_config))
    tracking.log_dict(best_payload, BEST_PARAMS)
    tracking.log_text(dump_config(best_config), BEST_CONFIG)
    tracking.log_dict({"trials": rows}, "trials.json")
    tracking.set_tag(f"{TAG_PREFIX}tune.best_trial", best["trial_id"])
    for key, value in best["params"].items():
        tracking.set_tag(f"{TAG_PREFIX}tune.best.{key}", str(value))
    plot_path = _plot_to_stage(config, rows, stage)
    if plot_path:
        tracking.log_artifact(plot_path)
    stopped = sum(r["stopped_early"] for r in rows)
    log.info("tune: %d trials (%d stopped early), best %s = %.4f with %s", len(rows), stopped,
             config.tune.metric, best["metric"], best["params"])
    return {
        "experiment_path": grid.experiment_path,
        "best": best_payload,
        "best_config": stage.path(BEST_CONFIG),
        "trials": rows,
        "metrics": {f"best_{config.tune.metric}": best["metric"], "trials": len(rows), "trials_stopped_early": stopped,
                    "trials_failed": sum(1 for r in rows if r["error"])},
    }


# ----------------------------------------------------------------------------------------------
# The plot


def batch_key(rows: list[dict[str, Any]]) -> str | None:
    keys = {k for r in rows for k in r["params"]}
    for key in ("train.global_batch_tokens", "train.global_batch_size", "train.micro_batch_size"):
        if key in keys:
            return key
    return None


def plot_lr_vs_loss(config: RaylmConfig, rows: list[dict[str, Any]], path: str) -> None:
    """Learning rate (log x) against the final metric, coloured by batch size; stopped trials as x."""
    # deferred: pulls in matplotlib, slow to import; only this path needs it
    import matplotlib

    matplotlib.use("Agg")
    # deferred: pulls in matplotlib, slow to import; only this path needs it
    import matplotlib.pyplot as plt

    key = batch_key(rows)
    def batch_of(row):
        if key:
            return row["params"][key]
        return config.train.global_batch_tokens or config.train.global_batch_size
    batches = sorted({batch_of(r) for r in rows})
    colours = plt.get_cmap("viridis")
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for index, batch in enumerate(batches):
        colour = colours(index / max(1, len(batches) - 1))
        for stopped, marker in ((False, "o"), (True, "x")):
            points = [(r["params"].get("train.lr", config.train.lr), r["metric"]) for r in rows
                      if batch_of(r) == batch and r["stopped_early"] == stopped and r["metric"] is not None]
            if points:
                axes.scatter(*zip(*points), color=colour, marker=marker, s=60,
                             label=f"{key or 'batch'}={batch}" + (" (stopped early)" if stopped else ""))
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (train.lr)")
    axes.set_ylabel(f"final {config.tune.metric}")
    axes.set_title("sweep: learning rate vs final validation loss")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_to_stage(config: RaylmConfig, rows: list[dict[str, Any]], stage: StageDir) -> str | None:
    scored = [r for r in rows if r["metric"] is not None]
    if not scored:
        return None
    local_dir = tempfile.mkdtemp(prefix="raylm-tune-plot-")
    local = os.path.join(local_dir, PLOT)
    plot_lr_vs_loss(config, scored, local)
    with open(local, "rb") as handle, stage.fs.open_output_stream(stage.fs_path(PLOT)) as out:
        out.write(handle.read())
    return local


# ----------------------------------------------------------------------------------------------
# Using the result: `raylm pretrain --from-sweep RUN_OR_PATH`


def best_params_from(ref: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The best trial's values from a sweep: its stage folder, its best_params.json or best_config.yaml,
    or the MLflow run id of the sweep (its `best_params.json` artifact)."""
    def exists(path: str) -> bool:
        if is_remote(path):
            # deferred: pulls in pyarrow, slow to import; only this path needs it
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(path)
            return fs.get_file_info(inner).type != pafs.FileType.NotFound
        return os.path.exists(path)

    if exists(ref):
        if not ref.endswith((".json", ".yaml", ".yml")):
            ref = ref.rstrip("/") + "/" + BEST_PARAMS
            if not exists(ref):
                raise ConfigError([f"--from-sweep {ref}: no {BEST_PARAMS} (has the sweep finished?)"])
        text = read_text_uri(ref)
        if ref.endswith(".json"):
            return dict(json.loads(text)["params"])
        tree = yaml.safe_load(text) or {}
        return {f"{section}.{key}": value for section in ("model", "train")
                for key, value in (tree.get(section) or {}).items()}
    if tracking_uri is None:
        raise ConfigError([f"--from-sweep {ref}: not a path, and no MLflow tracking URI to look it up as a run"])
    try:
        local = tracking.download_run_artifact(ref, BEST_PARAMS, tracking_uri)
    except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing run/artifact
        raise ConfigError([f"--from-sweep {ref}: neither a path nor a finished sweep's MLflow run "
                           f"({type(error).__name__}: {str(error)[:200]})"]) from None
    with open(local) as handle:
        return dict(json.load(handle)["params"])


def from_sweep_overrides(ref: str, tracking_uri: str | None) -> list[str]:
    """`--set` overrides that apply a sweep's best values (explicit `--set`s after them win)."""
    return [f"{key}={json.dumps(value)}" for key, value in best_params_from(ref, tracking_uri).items()]


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    best = manifest.get("best") or {}
    lines = [f"  best {best.get('metric')} {best.get('value')} with {best.get('params')}",
             f"  best config {manifest.get('best_config')}",
             f"  ResultGrid {manifest.get('experiment_path')}  "
             f"(ray.tune.Tuner.restore(path, trainable).get_results() or ray.tune.ExperimentAnalysis(path))"]
    return lines
