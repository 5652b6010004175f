"""Sweeps: search-space validation (fast), and real Ray Tune + Ray Train + MLflow sweeps on a tiny model.

The sweep is 4 trials (lr 3e-3 / 1e-5 x batch 4 / 8) of 40 steps, ASHA rungs at steps 10 and 20, two
trials at a time on 2 CPUs; lr 1e-5 barely moves the loss, so ASHA stops at least one of those.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raylm.config import ConfigError, load_config, validate_config
from tests.conftest import REPO
from tests.tune_helpers import run_tiny_sweep, sweep_config

# Trials start trainers side by side, and on a loaded 2-core machine a worker process can take more
# than Ray Train's default 60 s to start; set before the session's Ray starts (at collection).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


def refusal(space: dict, **tune) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config({"tune": {"search_space": space, **tune}})
    return str(caught.value)


def test_unknown_key_is_refused_naming_it():
    message = refusal({"train.learning_rate": {"loguniform": [1e-4, 1e-2]}})
    assert "tune.search_space.train.learning_rate" in message and "unknown key" in message and "lr" in message
    assert "tune.search_space.data.seed" in refusal({"data.seed": {"choice": [1, 2]}})


def test_empty_ranges_and_bad_values_are_refused_naming_the_key():
    assert "empty range" in refusal({"train.lr": {"uniform": [1e-2, 1e-2]}})
    assert "tune.search_space.train.global_batch_size.choice = []" in refusal({"train.global_batch_size": {"choice": []}})
    assert "loguniform needs low > 0" in refusal({"train.lr": {"loguniform": [0, 1e-2]}})
    assert "value -1" in refusal({"train.lr": {"choice": [-1, 1e-3]}})
    assert "exactly one of" in refusal({"train.lr": {"normal": [0, 1]}})
    assert "empty search space" in refusal({})


def test_yaml_numbers_in_ranges_are_numbers():
    config = load_config(None, ['tune.search_space={"train.lr": {"loguniform": [1e-4, 1e-2]}}'])
    assert config.tune.search_space["train.lr"]["loguniform"] == [1e-4, 1e-2]


def test_values_checked_against_the_whole_config(tmp_path):
    from raylm.tune import check_sweep

    config = sweep_config(tmp_path, search_space={"train.global_batch_size": {"choice": [8, 1]}})
    config = validate_config({**config.model_dump(mode="json"), "train": {**config.section("train"), "workers": 2}})
    with pytest.raises(ConfigError, match="global_batch_size"):
        check_sweep(config)


def test_search_algorithm_needs_its_package_and_no_grid(tmp_path):
    from raylm.tune import check_sweep

    with pytest.raises(ConfigError, match=r"tune.search_space.train.lr.grid: .*optuna"):
        check_sweep(sweep_config(tmp_path, search_algorithm="optuna"))
    try:
        import hyperopt  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"tune.search_algorithm = 'hyperopt': the 'hyperopt' package is not installed"):
            check_sweep(sweep_config(tmp_path, search_algorithm="hyperopt",
                                     search_space={"train.lr": {"loguniform": [1e-4, 1e-2]}}))


def test_cli_refuses_a_bad_space_before_any_trial(tmp_path):
    workspace = tmp_path / "never-created"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run([sys.executable, "-m", "raylm", "tune", "--workspace", str(workspace), "--set",
                              'tune.search_space={"train.lr": {"uniform": [0.01, 0.001]}}'],
                             capture_output=True, text=True, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "tune.search_space.train.lr.uniform" in refused.stderr and "empty range" in refused.stderr
    assert not workspace.exists()


def test_concurrency_fits_the_cpus_and_the_trials(tmp_path):
    """Trials at once: no more than the sweep has, nor than fit at `train.cpus_per_worker` (one when unset)."""
    from raylm.tune import fitted_concurrency, total_trials

    config = sweep_config(tmp_path)  # a 2 x 2 grid, max_concurrent 2
    assert total_trials(config) == 4
    assert fitted_concurrency(config, {"CPU": 8}) == 2
    assert fitted_concurrency(sweep_config(tmp_path, max_concurrent=None), {"CPU": 8}) == 4
    one = sweep_config(tmp_path, search_space={"train.lr": {"choice": [1e-3, 3e-3]}}, max_concurrent=None)
    assert fitted_concurrency(one, {"CPU": 8}) == 1  # one sample: one trial, which then gets all 8 CPUs
    wide = config.model_copy(update={"train": config.train.model_copy(update={"cpus_per_worker": 2.0})})
    assert fitted_concurrency(wide, {"CPU": 2}) == 1
    with pytest.raises(ConfigError, match=r"train.workers, train.cpus_per_worker = 1, 4: a trial needs 4 CPUs"):
        fitted_concurrency(config.model_copy(update={"train": config.train.model_copy(update={"cpus_per_worker": 4.0})}),
                           {"CPU": 2})


def test_plot_marks_stopped_trials(tmp_path):
    from raylm.tune import plot_lr_vs_loss

    rows = [{"params": {"train.lr": lr, "train.global_batch_size": b}, "metric": loss, "stopped_early": stopped}
            for lr, b, loss, stopped in [(1e-3, 8, 4.0, False), (1e-5, 8, 6.0, True), (3e-3, 16, 3.9, False)]]
    path = tmp_path / "plot.png"
    plot_lr_vs_loss(sweep_config(tmp_path), rows, str(path))
    assert path.stat().st_size > 5000


def test_from_sweep_reads_a_best_params_file(tmp_path):
    from raylm.tune import from_sweep_overrides

    (tmp_path / "best_params.json").write_text(json.dumps({"params": {"train.lr": 0.002, "train.global_batch_size": 16}}))
    overrides = from_sweep_overrides(str(tmp_path), None)
    config = load_config(None, [*overrides, "train.global_batch_size=32"])
    assert config.train.lr == 0.002 and config.train.global_batch_size == 32  # explicit --set wins
    with pytest.raises(ConfigError, match="neither a path nor"):
        from_sweep_overrides("no-such-run", f"sqlite:///{tmp_path}/mlflow.db")


# ----------------------------------------------------------------------------------------------
# Real sweeps


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from tests.train_helpers import make_packed

    folder = tmp_path_factory.mktemp("packed")
    return make_packed(folder)


def sweep_runs(workspace: Path):
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    experiment = client.get_experiment_by_name("raylm")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "tune"]
    children = [r for r in runs if parents and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents, children


@pytest.mark.slow
def test_asha_sweep_stops_trials_logs_nested_runs_and_writes_best_config(ray_session, tmp_path, packed):
    from raylm.cli import _config_from_sweep

    manifest = run_tiny_sweep(tmp_path, packed)
    assert manifest["metrics"]["trials"] == 4 and manifest["metrics"]["trials_failed"] == 0
    assert manifest["metrics"]["trials_stopped_early"] >= 1
    stopped = [t for t in manifest["trials"] if t["stopped_early"]]
    assert all(t["step"] < 40 for t in stopped)
    assert manifest["best"]["params"]["train.lr"] == 3e-3
    stage = Path(manifest["uri"])
    best = json.loads((stage / "best_params.json").read_text())
    assert best["params"] == manifest["best"]["params"]
    assert "lr: 0.003" in (stage / "best_config.yaml").read_text()
    assert (stage / "lr_vs_val_loss.png").stat().st_size > 5000

    client, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"best_params.json", "best_config.yaml", "lr_vs_val_loss.png"} <= artifacts
    statuses = sorted(r.info.status for r in children)
    assert "KILLED" in statuses and "RUNNING" not in statuses
    for run in children:
        assert "train.lr" in run.data.params and "train.global_batch_size" in run.data.params
        # logged by rank 0: a curve for a trial that ran its budget; a trial ASHA stopped at its first
        # evaluation has one point (no step-0 point since train.eval_at_start is off by default)
        points = len(client.get_metric_history(run.info.run_id, "val/loss"))
        assert points >= (2 if run.info.status == "FINISHED" else 1), (run.info.status, points)

    # the ResultGrid stays usable with Tune's own tools
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(manifest["experiment_path"])
    assert len(analysis.trials) == 4

    # `raylm pretrain --from-sweep RUN_ID` and `--from-sweep STAGE_FOLDER` take the best values
    class Args:
        config, overrides, workspace = None, ["train.max_steps=5"], str(tmp_path)

    for ref in (parents[0].info.run_id, str(stage)):
        Args.from_sweep = ref
        config = _config_from_sweep(Args, sweep_config(tmp_path))
        assert config.train.lr == 3e-3 and config.train.max_steps == 5
        assert config.train.global_batch_size == best["params"]["train.global_batch_size"]


def _terminated_trials(experiment_path: Path) -> set[str]:
    states = sorted(experiment_path.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        state = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # being written
        return set()
    done = set()
    for entry in state.get("trial_data", []):
        trial = json.loads(entry[0]) if isinstance(entry, list) else entry
        if trial.get("status") == "TERMINATED":
            done.add(trial["trial_id"])
    return done


@pytest.mark.slow
def test_killed_sweep_restores_and_finishes_without_rerunning_finished_trials(ray_session, tmp_path, packed):
    packed_json = tmp_path / "packed.json"
    packed_json.write_text(json.dumps(packed.to_manifest()))
    config = sweep_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "tests.tune_helpers", str(tmp_path), str(packed_json)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    stage_root = tmp_path / "tune"
    finished_before: set[str] = set()
    deadline = time.time() + 600
    try:
        while time.time() < deadline and driver.poll() is None:
            for experiment in stage_root.glob("*/sweep"):
                finished_before = _terminated_trials(experiment)
            if finished_before:
                break
            time.sleep(1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started: a lost driver
        driver.wait()
    assert finished_before, "no trial finished before the deadline"
    assert len(finished_before) < 4, "the sweep finished before it could be interrupted"
    (experiment,) = stage_root.glob("*/sweep")
    assert not (experiment.parent / "_SUCCESS").exists()
    trials_before = {p.name: sorted(os.listdir(p)) for p in (experiment.parent / "trials").iterdir()
                     if p.name in finished_before}

    assert config.tune.num_samples == 1
    manifest = run_tiny_sweep(tmp_path, packed)  # the same sweep again: restores instead of starting over

    assert manifest["metrics"]["trials"] == 4 and manifest["metrics"]["trials_failed"] == 0
    assert {t["trial_id"] for t in manifest["trials"]} >= finished_before
    for trial_id, listing in trials_before.items():  # finished trials were not trained again
        assert sorted(os.listdir(experiment.parent / "trials" / trial_id)) == listing
    _, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4  # the parent and trial runs were reopened, not duplicated
    assert parents[0].info.status == "FINISHED"
