"""The report card's rendering (plain functions of gathered data) and `raylm report`'s bad-input path."""

from __future__ import annotations

import re

from raylm.cli import main
from raylm.report import SECTIONS, ReportData, figures, render_html, render_markdown
from tests.conftest import CONFIGS


def gathered(**extra) -> ReportData:
    curate = {"fingerprint": "curate:1", "mlflow_run_id": "run-curate", "code_version": "abc",
              "metrics": {"rows_input": 10, "rows_kept": 7, "bytes_input": 1000, "bytes.kept": 700, "rows.empty": 1,
                          "bytes.empty": 0, "rows.near_duplicate": 2, "bytes.near_duplicate": 300, "pii.email": 4,
                          "near_dup.clusters": 1, "near_dup.pairs": 3, "near_dup.bands": 20, "near_dup.rows_per_band": 6}}
    pretrain = {"fingerprint": "pretrain:2", "mlflow_run_id": "run-pretrain", "model": {"arch": "decoder", "n_layers": 2},
                "metrics": {"step": 30, "val_loss_initial": 6.2, "val_loss": 5.0, "mfu": 0.2, "stage_seconds": 12.0}}
    data = ReportData(experiment="exp", workspace="/ws", plan_table="model  tiny",
                      manifests={"curate": curate, "pretrain": pretrain},
                      curves={"step_loss": [(1, 6.0), (2, 5.5)], "val_loss": [(0, 6.2), (2, 5.0)]})
    for key, value in extra.items():
        setattr(data, key, value)
    return data


def test_every_section_is_there_and_says_what_did_not_run():
    markdown = render_markdown(gathered(), [])
    assert [line[3:] for line in markdown.splitlines() if line.startswith("## ")] == \
        ["Plan", "Data accounting", "Tokenizer", "Training", "Tuning", "Fine-tuning", "Scores", "Samples", "Lineage"]
    assert "| rejected: near_duplicate | 2 | 300 |" in markdown and "| email | 4 |" in markdown
    assert "| val loss | 6.2000 -> 5.0000 |" in markdown
    assert "not run for this config (set finetune.data)" in markdown
    assert "| pretrain | pretrain:2 |" in markdown


def test_hostile_text_is_escaped_and_tables_hold():
    """Samples are model output and task names come from user files: neither may inject markup or break a table."""
    data = gathered(samples=[("<script>alert(1)</script>", "a | b\n`c`")],
                    scores=[{"task": "x|y<b>", "metric": "acc", "score": 0.5, "clean": None}])
    page = render_html(data, {})
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "x|y&lt;b&gt;" in page
    markdown = render_markdown(data, [])
    assert "| x\\|y<b> | acc | 0.5000 |  |" in markdown
    sample_line = next(line for line in markdown.splitlines() if line.startswith("- `"))
    assert "\n" not in sample_line and sample_line.count("`") == 4


def test_html_is_self_contained_with_figures_embedded():
    data = gathered(trials=[{"trial_id": "t1", "params": {"train.lr": 1e-3}, "metric": 5.1, "step": 10},
                            {"trial_id": "t2", "params": {"train.lr": 1e-2}, "metric": 5.9, "step": 4,
                             "stopped_early": True}],
                    scores=[{"task": "arc_easy", "metric": "acc", "score": 0.3, "clean": 0.28}])
    pictures = figures(data)
    assert set(pictures) == {"loss.png", "tuning.png", "scores.png"}
    assert all(png.startswith(b"\x89PNG") for png in pictures.values())
    page = render_html(data, pictures)
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"(src|href)=['\"](https?:)?//", page)  # nothing fetched from outside
    for name in SECTIONS:
        assert f"<section id='{name}'>" in page


def test_report_before_any_stage_is_one_line_and_touches_nothing(tmp_path, capsys):
    workspace = tmp_path / "ws"
    assert main(["report", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(workspace)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no stage of this config has finished" in error[0] and "raylm pipeline" in error[0]
    assert not (workspace / "mlflow.db").exists()


def test_a_damaged_manifest_is_one_line_naming_the_file(tmp_path, capsys):
    """A finished stage whose manifest.json was truncated: the file and the fix, exit 2, no traceback."""
    from raylm.config import load_config
    from raylm.stage_plan import plan_stages
    from raylm.workspace import Workspace

    config = load_config(str(CONFIGS / "tiny.yaml"), [], str(tmp_path / "ws"))
    stage = plan_stages(config, Workspace(config.workspace.root)).curate
    stage.begin()
    stage.finish({"outputs": {}, "counts": {}, "metrics": {}})
    manifest = tmp_path / "ws" / "curate" / stage.key / "attempts" / stage.attempt / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    stage.release()
    assert main(["report", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(tmp_path / "ws")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(manifest) in error[0] and "--force curate" in error[0]
