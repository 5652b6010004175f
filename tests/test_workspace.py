"""Content-addressed stage folders, success markers, and reuse / force through `execute`."""

from __future__ import annotations

import mlflow
import pytest

from raylm.config import TrackingConfig
from raylm.stage import run_stage
from raylm.tracking import Tracker
from raylm.workspace import SUCCESS_MARKER, Workspace, resolve_stage_dir


def test_stage_key_depends_on_config_and_inputs(workspace_dir):
    workspace = Workspace(str(workspace_dir))
    base = workspace.stage("curate", {"a": 1, "b": [1, 2]}, {"x": "up:1"})
    assert base.key == workspace.stage("curate", {"b": [1, 2], "a": 1}, {"x": "up:1"}).key
    assert base.key != workspace.stage("curate", {"a": 2, "b": [1, 2]}, {"x": "up:1"}).key
    assert base.key != workspace.stage("curate", {"a": 1, "b": [1, 2]}, {"x": "up:2"}).key
    assert base.uri == f"{workspace_dir}/curate/{base.key}"


def test_marker_is_written_last_and_required(workspace_dir):
    stage = Workspace(str(workspace_dir)).stage("tokenize", {"v": 1})
    stage.prepare()
    stage.write_json("partial.json", {"half": True})
    assert not stage.is_complete()
    with pytest.raises(FileNotFoundError, match="no success marker"):
        stage.manifest()
    manifest = stage.finish({"counts": {"rows": 3}})
    assert stage.is_complete() and manifest["counts"] == {"rows": 3}
    assert resolve_stage_dir(stage.workspace, stage.uri).manifest()["key"] == stage.key


@pytest.fixture()
def tracker(workspace_dir):
    tracker = Tracker(TrackingConfig(experiment="test"), Workspace(str(workspace_dir)))
    yield tracker
    while mlflow.active_run():
        mlflow.end_run()


def counting_body(calls):
    def body(stage):
        calls.append(stage.key)
        stage.write_text("out.txt", "result")
        return {"metrics": {"rows": 5}}
    return body


def test_finished_stage_is_reused_and_force_reruns(tracker, workspace_dir):
    stage = tracker.workspace.stage("curate", {"v": 1})
    calls: list[str] = []
    first = run_stage(stage, {"v": 1}, tracker, counting_body(calls))
    second = run_stage(stage, {"v": 1}, tracker, counting_body(calls))
    assert len(calls) == 1 and second["key"] == first["key"]
    run_stage(stage, {"v": 1}, tracker, counting_body(calls), force=True)
    assert len(calls) == 2

    runs = mlflow.search_runs(experiment_ids=[tracker.experiment_id], output_format="list")
    reused = [r.data.tags["raylm.reused"] for r in runs]
    assert sorted(reused) == ["false", "false", "true"]
    assert all(r.data.params["curate.v"] == "1" for r in runs)
    assert all(r.data.metrics["rows"] == 5 for r in runs)


def test_folder_without_marker_is_recomputed_not_read(tracker):
    stage = tracker.workspace.stage("curate", {"v": 2})
    stage.prepare()
    stage.write_text("out.txt", "half-written by a crashed run")
    calls: list[str] = []
    run_stage(stage, {"v": 2}, tracker, counting_body(calls))
    assert calls == [stage.key]
    assert stage.read_text("out.txt") == "result"
    assert stage.fs.get_file_info(stage.fs_path(SUCCESS_MARKER)).size > 0


def test_failed_body_leaves_no_marker(tracker):
    stage = tracker.workspace.stage("curate", {"v": 3})

    def failing(stage):
        stage.write_text("out.txt", "partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage(stage, {"v": 3}, tracker, failing)
    assert not stage.is_complete()
    failed = mlflow.search_runs(experiment_ids=[tracker.experiment_id], output_format="list")
    assert [r.info.status for r in failed] == ["FAILED"]


def test_remote_workspace_needs_a_tracking_server():
    from raylm.config import ConfigError
    from raylm.tracking import resolve_tracking_uri

    class Remote:
        is_local = False
        root = "s3://bucket/ws"

    with pytest.raises(ConfigError, match="tracking.uri"):
        resolve_tracking_uri(TrackingConfig(), Remote())
