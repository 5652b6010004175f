"""MLflow metric names: raylm's flat figure names get the chart section MLflow's UI groups them by."""

from __future__ import annotations

import pytest

from raylm.tracking import metric_name


@pytest.mark.parametrize("key, stage, expected", [
    ("loss", "pretrain", "train/loss"),
    ("step_loss", "tune-trial", "train/step_loss"),
    ("val_loss", "pretrain", "val/loss"),
    ("val_loss_initial", "finetune", "val/loss_initial"),
    ("val_bpb", "eval", "val/bpb"),
    ("arc_easy/acc", "eval", "arc_easy/acc"),  # already in its task's section
    ("tokens_per_s", "pretrain", "system/tokens_per_s"),
    ("checkpoint_wait_s", "pretrain", "system/checkpoint_wait_s"),
    ("workers", "finetune", "system/workers"),
    ("rss_peak_gib", "pretrain", "system/rss_peak_gib"),
    ("rss_before_data_gib", "finetune", "system/rss_before_data_gib"),
    ("stage_seconds", "curate", "system/stage_seconds"),
    ("rows_input", "curate", "data/rows_input"),
    ("pii.email", "curate", "data/pii.email"),
    ("val_tokens", "tokenize", "data/val_tokens"),  # a split's size is data, not a validation score
    ("data_rows_layout_alpaca", "finetune", "data/rows_layout_alpaca"),
    ("trials", "tune", "tune/trials"),
    ("parameters.total", "plan", "plan/parameters.total"),
    ("loss", None, "loss"),  # a run raylm did not tag (a test's, a user's) keeps the name it was given
])
def test_every_figure_gets_its_section(key, stage, expected):
    assert metric_name(key, stage) == expected
