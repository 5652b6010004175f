"""Content-addressed stage folders, attempts and commits, and reuse / force / concurrency through `execute`."""

from __future__ import annotations

import json
import threading
import time

import mlflow
import pytest

from raylm.config import TrackingConfig
from raylm.stage import run_stage
from raylm.tracking import Tracker
from raylm.workspace import ATTEMPTS, SUCCESS_MARKER, StageConflict, Workspace, resolve_stage_dir


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
    assert resolve_stage_dir(stage.uri).manifest()["key"] == stage.key


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
    assert all(r.data.metrics["data/rows"] == 5 for r in runs)  # curate's figures: the data section


def test_folder_without_marker_is_recomputed_not_read(tracker):
    stage = tracker.workspace.stage("curate", {"v": 2})
    stage.prepare()
    stage.write_text("out.txt", "half-written by a crashed run")
    calls: list[str] = []
    run_stage(stage, {"v": 2}, tracker, counting_body(calls))
    assert calls == [stage.key]
    assert stage.read_text("out.txt") == "result"
    assert stage.fs.get_file_info(stage.key_fs_path(SUCCESS_MARKER)).size > 0


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


def test_each_run_writes_its_own_attempt_and_readers_follow_the_commit(tracker, workspace_dir):
    stage = tracker.workspace.stage("curate", {"v": 4})
    manifest = run_stage(stage, {"v": 4}, tracker, counting_body([]))
    record = json.loads((workspace_dir / "curate" / stage.key / SUCCESS_MARKER).read_text())
    attempt_dir = workspace_dir / "curate" / stage.key / ATTEMPTS / record["attempt"]
    assert (attempt_dir / "out.txt").read_text() == "result" and manifest["attempt"] == record["attempt"]
    assert not (attempt_dir / "_OWNER.json").exists()  # released: nobody writes it any more
    stray = workspace_dir / "curate" / stage.key / ATTEMPTS / "0-stray"  # e.g. a run that lost the race
    stray.mkdir()
    (stray / "out.txt").write_text("not the result")
    reader = Workspace(str(workspace_dir)).stage("curate", {"v": 4})
    assert reader.read_text("out.txt") == "result" and reader.path("out.txt") == str(attempt_dir / "out.txt")


def test_a_second_commit_of_the_same_stage_is_refused(workspace_dir):
    first, second = (Workspace(str(workspace_dir)).stage("tokenize", {"v": 1}) for _ in range(2))
    first.begin()
    second.begin()
    assert first.attempt != second.attempt
    first.finish({"rows": 1})
    with pytest.raises(StageConflict, match="committed by another run first"):
        second.finish({"rows": 2})
    second.finish({"rows": 2}, replace=True)  # --force replaces it
    assert Workspace(str(workspace_dir)).stage("tokenize", {"v": 1}).manifest()["rows"] == 2
    first.release()
    second.release()


def test_a_run_waits_for_a_live_run_of_the_same_stage_and_reuses_its_result(tracker):
    writer = tracker.workspace.stage("curate", {"v": 5})
    writer.begin()  # a live run of this process (the same host and a live pid: it counts as alive)
    calls: list[str] = []
    results = {}
    waiting = threading.Thread(target=lambda: results.update(
        manifest=run_stage(tracker.workspace.stage("curate", {"v": 5}), {"v": 5}, tracker, counting_body(calls))))
    waiting.start()
    time.sleep(3)
    assert waiting.is_alive() and not calls  # still waiting for the writer
    writer.write_text("out.txt", "the writer's result")
    writer.finish({"rows": 7})
    writer.release()
    waiting.join(timeout=30)
    assert not calls and results["manifest"]["rows"] == 7


def test_a_resumable_stage_takes_back_the_attempt_an_interrupted_run_left(tracker):
    stage = tracker.workspace.stage("pretrain", {"v": 6})

    def interrupted(stage):
        stage.write_text("train/checkpoint.txt", "step 10")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, {"v": 6}, tracker, interrupted, resumable=True)
    left = stage.attempt
    seen = {}

    def resumed(stage):
        seen["checkpoint"] = stage.read_text("train/checkpoint.txt")
        return {}

    run_stage(tracker.workspace.stage("pretrain", {"v": 6}), {"v": 6}, tracker, resumed, resumable=True)
    assert seen["checkpoint"] == "step 10"
    assert tracker.workspace.stage("pretrain", {"v": 6}).commit_record()["attempt"] == left


def test_stages_written_by_older_versions_still_read(workspace_dir):
    folder = workspace_dir / "curate" / "oldkey"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"key": "oldkey", "rows": 3}))
    (folder / SUCCESS_MARKER).write_text("2026-01-01T00:00:00Z\n")
    stage = resolve_stage_dir(str(folder))
    assert stage.manifest()["rows"] == 3 and stage.path("kept") == str(folder / "kept")


def test_runs_a_killed_process_left_running_are_closed_killed_when_the_stage_starts_again(tracker):
    """SIGKILL leaves the stage's MLflow run RUNNING; the next start ends it KILLED with the reason. A run
    whose attempt a live process still writes (another job on the cluster) is left alone."""
    import os
    import socket

    from raylm.workspace import OWNER

    stage = tracker.workspace.stage("pretrain", {"v": 9})
    client = tracker.client

    def open_run(attempt: str, owner_pid: int, heartbeat_at: float) -> str:
        folder = tracker.workspace.root + f"/pretrain/{stage.key}/{ATTEMPTS}/{attempt}"
        os.makedirs(folder)
        with open(f"{folder}/{OWNER}", "w") as handle:
            json.dump({"host": socket.gethostname(), "pid": owner_pid, "started_at": "2026-12-05T00:00:00Z",
                       "heartbeat_at": heartbeat_at}, handle)
        tags = {"raylm.stage": "pretrain", "raylm.fingerprint": stage.fingerprint, "raylm.reused": "false",
                "raylm.output": stage.attempt_uri(attempt)}
        return client.create_run(tracker.experiment_id, tags=tags, run_name="pretrain").info.run_id

    dead_pid = 2 ** 22 + 12345  # above pid_max's default: no such process
    killed = open_run("20261205T000000-dead", dead_pid, time.time())
    stale = open_run("20261205T000001-stale", os.getpid(), time.time() - 3600)  # no heartbeat for an hour
    live = open_run("20261205T000002-live", os.getpid(), time.time())
    reused = client.create_run(tracker.experiment_id, tags={"raylm.stage": "pretrain", "raylm.reused": "true",
                                                            "raylm.fingerprint": stage.fingerprint}).info.run_id

    run_stage(stage, {"v": 9}, tracker, lambda stage: {}, force=True)
    for run_id in (killed, stale):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and "no live process writes" in run.data.tags["raylm.closed_because"]
    assert client.get_run(live).info.status == client.get_run(reused).info.status == "RUNNING"
