"""End to end: `raylm pipeline` on the tiny config with real Ray, real MLflow and CPU torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.dataset as pads
import pytest
from mlflow.tracking import MlflowClient

from raylm.cli import main
from tests.conftest import CONFIGS, REPO

pytestmark = pytest.mark.slow
EVAL_AT_START = ["--set", "train.eval_at_start=true"]  # val_loss_initial, for "training lowered val loss"


@pytest.fixture(scope="module")
def finished_pipeline(ray_session, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("pipeline")
    assert main(["pipeline", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(workspace), *EVAL_AT_START]) == 0
    return workspace


def runs_by_name(workspace):
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    experiment = client.get_experiment_by_name("raylm")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def test_parent_and_nested_runs_with_params_and_metrics(finished_pipeline):
    client, runs = runs_by_name(finished_pipeline)
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"curate", "tokenize", "pretrain", "eval"}
    assert parents[0].data.params["train.max_steps"] == "30"
    assert children["curate"].data.params["curate.val_fraction"] == "0.1"
    assert children["curate"].data.metrics["rows_input"] > 0
    assert children["tokenize"].data.metrics["vocab_size"] == 512
    assert children["eval"].data.metrics["val_bpb"] > 0
    assert children["tokenize"].data.tags["raylm.input.curated"].startswith("curate:")
    history = client.get_metric_history(children["pretrain"].info.run_id, "loss")
    assert len(history) >= 3  # logged live from the rank-0 worker
    artifacts = {a.path for a in client.list_artifacts(children["curate"].info.run_id)}
    assert "manifest.json" in artifacts


def test_curation_accounts_for_every_row(finished_pipeline):
    client, runs = runs_by_name(finished_pipeline)
    curate = next(r for r in runs if r.info.run_name == "curate")
    metrics = curate.data.metrics
    assert metrics["rows_input"] == metrics["rows_kept"] + metrics["rows_rejected"]
    output = curate.data.tags["raylm.output"]
    kept = sum(pads.dataset(f"{output}/kept/{s}", format="parquet").count_rows() for s in ("train", "val"))
    assert kept == metrics["rows_kept"]
    by_reason = {k.removeprefix("rows."): v for k, v in metrics.items() if k.startswith("rows.")}
    assert by_reason["kept"] == metrics["rows_kept"]
    assert sum(v for k, v in by_reason.items() if k != "kept") == metrics["rows_rejected"]
    assert by_reason.get("empty", 0) > 0  # the standard library has empty __init__.py files


def test_checkpoint_exists_and_training_lowered_val_loss(finished_pipeline):
    client, runs = runs_by_name(finished_pipeline)
    pretrain = next(r for r in runs if r.info.run_name == "pretrain")
    checkpoint = pretrain.data.tags["raylm.checkpoint"]
    assert os.path.exists(os.path.join(checkpoint, ".metadata"))
    assert os.path.exists(os.path.join(checkpoint, "trainer_state.json"))
    metrics = pretrain.data.metrics
    assert metrics["val_loss"] < metrics["val_loss_initial"] - 0.5


def test_encoder_decoder_trains_and_evaluates_through_the_same_stages(finished_pipeline):
    """The guide's encoder-decoder learns prefix-to-continuation over the same packed data."""
    overrides = ["--set", "model.arch=encoder-decoder", "--set", "model.n_layers=1", "--set", "train.max_steps=20",
                 *EVAL_AT_START]
    for stage in ("pretrain", "eval"):
        assert main([stage, "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(finished_pipeline),
                     *overrides]) == 0
    _, runs = runs_by_name(finished_pipeline)
    pretrain = [r for r in runs if r.info.run_name == "pretrain"][-1]
    assert pretrain.data.params.get("model.arch", "encoder-decoder") == "encoder-decoder"
    assert pretrain.data.metrics["val_loss"] < pretrain.data.metrics["val_loss_initial"] - 0.3
    evaluation = [r for r in runs if r.info.run_name == "eval"][-1]
    assert 0 < evaluation.data.metrics["val_bpb"] < 8


def test_encoder_decoder_trains_by_span_corruption_and_evaluates_on_prefix(finished_pipeline):
    """T5's span corruption through the trainer: the sentinels sit above the tokenizer's vocabulary."""
    overrides = ["--set", "model.arch=encoder-decoder", "--set", "model.n_layers=1", "--set", "train.max_steps=20",
                 "--set", "model.seq2seq_objective=span_corruption", *EVAL_AT_START]
    for stage in ("pretrain", "eval"):
        assert main([stage, "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(finished_pipeline),
                     *overrides]) == 0
    _, runs = runs_by_name(finished_pipeline)
    pretrain = [r for r in runs if r.info.run_name == "pretrain"][-1]
    assert pretrain.data.params.get("model.seq2seq_objective", "span_corruption") == "span_corruption"
    assert pretrain.data.metrics["val_loss"] < pretrain.data.metrics["val_loss_initial"]
    evaluation = [r for r in runs if r.info.run_name == "eval"][-1]
    assert 0 < evaluation.data.metrics["val_bpb"] < 10


def test_rerun_reuses_every_stage(finished_pipeline):
    assert main(["pipeline", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(finished_pipeline),
                 *EVAL_AT_START]) == 0
    _, runs = runs_by_name(finished_pipeline)
    latest_parent = [r for r in runs if r.info.run_name == "pipeline"][-1]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == latest_parent.info.run_id]
    assert len(children) == 4
    assert {r.data.tags["raylm.reused"] for r in children} == {"true"}


def test_single_stage_command_needs_its_inputs(tmp_path, capsys):
    """One line and exit 2, before Ray starts (it used to be a StageNotReady traceback after Ray's start)."""
    import ray

    started = ray.is_initialized()
    for command, missing in (("tokenize", "curate"), ("pretrain", "tokenize"), ("eval", "pretrain"), ("tune", "tokenize")):
        assert main([command, "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(tmp_path)]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].startswith(f"raylm: stage '{missing}' has not finished") and f"run `raylm {missing}`" in error[-1]
    assert ray.is_initialized() == started


def test_cli_help_and_config_errors_exit_before_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown = subprocess.run([sys.executable, "-m", "raylm", "--help"], capture_output=True, text=True, env=env)
    for command in ("curate", "tokenize", "pretrain", "eval", "pipeline"):
        assert command in shown.stdout
    workspace = tmp_path / "never-created"
    refused = subprocess.run([sys.executable, "-m", "raylm", "pipeline", "--config", str(CONFIGS / "tiny.yaml"),
                              "--set", "train.lr=-1", "--workspace", str(workspace)],
                             capture_output=True, text=True, env=env)
    assert refused.returncode == 2
    assert "train.lr = -1" in refused.stderr and "greater than 0" in refused.stderr
    assert not workspace.exists()
