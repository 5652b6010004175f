"""The console's own lines: the training progress line, read live from a real MLflow run."""

from __future__ import annotations

import io
import time

from mlflow.tracking import MlflowClient

from raylm.console import TrainingProgress, duration, progress_line
from raylm.tracking import RunLogger


def test_progress_line_says_step_loss_speed_and_time_left():
    line = progress_line("pretrain", {"step": 40, "loss": 5.1234, "val_loss": 5.3, "tokens_per_s": 30120.4,
                                      "mfu": 0.181}, 120, elapsed_s=20.0, steps_done_in_elapsed=40)
    assert line == "pretrain step 40/120 (33%) loss 5.123 val 5.300 | 30,120 tok/s MFU 18.1% | 40s left"
    assert "left" not in progress_line("pretrain", {"step": 120, "loss": 4.0}, 120, 10.0, 100)
    assert "val" not in progress_line("pretrain", {"step": 3, "loss": 6.0, "val_loss": float("nan")}, 10, 1.0, 1)
    assert [duration(s) for s in (0, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]
    # a minutes budget before its step count is fixed: no count, no time left
    assert progress_line("pretrain", {"step": 4, "loss": 6.0}, None, 2.0, 4) == "pretrain step 4 loss 6.000"


def test_progress_follows_a_real_mlflow_run(tmp_path):
    """Written as rank 0 writes (tokens_seen with each report window); printed as plain lines off a terminal."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("progress"), tags={"raylm.stage": "pretrain"}).info.run_id
    rank0 = RunLogger(uri, run_id, flush_every=1)
    console = io.StringIO()
    with TrainingProgress("pretrain", uri, run_id, max_steps=30, tokens_per_step=512, stream=console, poll_s=0.05):
        for step in (10, 20, 30):
            rank0.log({"tokens_seen": step * 512, "loss": 6.0 - step / 10, "val_loss": 6.5 - step / 10}, step=step)
            time.sleep(0.4)
    assert {"train/tokens_seen", "train/loss", "val/loss"} == set(client.get_run(run_id).data.metrics)
    lines = console.getvalue().splitlines()
    assert lines[0].startswith("pretrain step 10/30 (33%) loss 5.000 val 5.500")
    assert lines[-1].startswith("pretrain step 30/30 (100%) loss 3.000 val 3.500")
    assert all("\r" not in line for line in lines)


def test_progress_takes_the_step_count_a_minutes_budget_fixed(tmp_path):
    """A minutes budget logs `budget_max_steps` once it has timed its first steps; until then the line has no
    count (it used to show train.max_steps' default, 300, for any budget)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("budget"), tags={"raylm.stage": "pretrain"}).info.run_id
    rank0 = RunLogger(uri, run_id, flush_every=1)
    console = io.StringIO()
    with TrainingProgress("pretrain", uri, run_id, max_steps=None, tokens_per_step=512, stream=console, poll_s=0.05):
        rank0.log({"tokens_seen": 5 * 512, "loss": 6.0, "val_loss": 6.5}, step=5)  # a new val: a plain line
        time.sleep(0.4)
        rank0.log({"tokens_seen": 12 * 512, "loss": 5.0, "val_loss": 5.5, "budget_max_steps": 48}, step=12)
        time.sleep(0.4)
    lines = console.getvalue().splitlines()
    assert lines[0] == "pretrain step 5 loss 6.000 val 6.500"
    assert lines[-1].startswith("pretrain step 12/48 (25%) loss 5.000 val 5.500"), lines
