"""Workspaces and sources on other stores: a real S3 server on loopback (moto), an HTTP server on loopback,
globs on object stores, bad storage refused before Ray starts, and two runs of one stage at once."""

from __future__ import annotations

import gzip
import http.server
import json
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from raylm.cli import main
from raylm.data.sources import stdlib_root
from raylm.storage import filesystem_for, glob_regex, list_files
from raylm.workspace import Workspace
from tests.conftest import CONFIGS, REPO


def test_glob_patterns_match_within_one_segment_and_double_star_across():
    single = glob_regex("bucket/corpus/*.jsonl.gz")
    assert single.match("bucket/corpus/part-0.jsonl.gz")
    assert not single.match("bucket/corpus/sub/part-0.jsonl.gz") and not single.match("bucket/corpus/a.jsonl")
    deep = glob_regex("bucket/**/part-[0-9].jsonl.gz")
    assert deep.match("bucket/part-1.jsonl.gz") and deep.match("bucket/a/b/part-2.jsonl.gz")
    assert not deep.match("bucket/a/part-x.jsonl.gz")
    assert glob_regex("b/file?.txt").match("b/file1.txt") and not glob_regex("b/file?.txt").match("b/file12.txt")
    assert glob_regex("b/[!a]*.txt").match("b/b.txt") and not glob_regex("b/[!a]*.txt").match("b/a.txt")


def stdlib_documents(count: int) -> list[dict]:
    files = sorted(Path(stdlib_root()).glob("*.py"))[:count]
    return [{"text": path.read_text(errors="replace")[:6000], "id": path.name} for path in files]


def put_corpus(bucket: str, documents: list[dict]) -> None:
    """Half the documents as two jsonl.gz files under corpus/, half as parquet under pq/ (beside a _SUCCESS)."""
    fs, base = filesystem_for(bucket)
    half = len(documents) // 2
    for part, chunk in enumerate((documents[:half // 2], documents[half // 2:half])):
        lines = "".join(json.dumps(doc) + "\n" for doc in chunk).encode()
        # compression=None: Arrow would otherwise gzip the already gzipped bytes again (it detects by extension)
        with fs.open_output_stream(f"{base}/corpus/part-{part}.jsonl.gz", compression=None) as out:
            out.write(gzip.compress(lines))
    with fs.open_output_stream(f"{base}/corpus/README.txt") as out:  # not matched by the glob
        out.write(b"not a corpus file")
    pq.write_table(pa.Table.from_pylist(documents[half:]), f"{base}/pq/part-0.parquet", filesystem=fs)
    with fs.open_output_stream(f"{base}/pq/_SUCCESS") as out:
        out.write(b"")


def test_s3_globs_and_folders_list_through_one_filesystem_layer(s3_bucket):
    put_corpus(s3_bucket, stdlib_documents(8))
    name = s3_bucket.removeprefix("s3://")
    files, root, _ = list_files(f"{s3_bucket}/corpus/*.jsonl.gz")
    assert files == [f"{name}/corpus/part-0.jsonl.gz", f"{name}/corpus/part-1.jsonl.gz"] and root == f"{name}/corpus"
    assert list_files(f"{s3_bucket}/pq")[0] == [f"{name}/pq/part-0.parquet"]  # markers are not data
    assert list_files(f"{s3_bucket}/nothing/*.jsonl")[0] == []


def run_cli(args: list[str], env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "raylm", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_bad_storage_is_one_line_and_exit_2_before_ray_starts(s3_bucket, tmp_path):
    started = time.monotonic()
    missing = run_cli(["curate", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", "s3://no-such-bucket-x/ws"])
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "workspace.root = 's3://no-such-bucket-x/ws': cannot write" in missing.stderr
    assert "Started a local Ray instance" not in missing.stderr and "Traceback" not in missing.stderr

    config = tmp_path / "glob.yaml"
    config.write_text(yaml.safe_dump({"data": {"sources": [{"path": f"{s3_bucket}/none/*.jsonl.gz"}]}}))
    nothing = run_cli(["curate", "--config", str(config), "--workspace", str(tmp_path / "ws")])
    assert nothing.returncode == 2
    assert f"data.sources[0].path = '{s3_bucket}/none/*.jsonl.gz': no file matches the pattern" in nothing.stderr

    unreachable = run_cli(["curate", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", f"{s3_bucket}/ws"],
                          {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert unreachable.returncode == 2 and f"workspace.root = '{s3_bucket}/ws'" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    assert time.monotonic() - started < 90


def test_an_unwritable_local_workspace_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run_cli(["curate", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(blocker / "ws")])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"workspace.root = '{blocker / 'ws'}': cannot write" in done.stderr


def tiny_config(tmp_path: Path, sources: list[dict], **sections) -> Path:
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    config["data"]["sources"] = sources
    config.update(sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_http_source_is_streamed_and_decompressed(ray_session, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    documents = stdlib_documents(12)
    (served / "part-0.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in documents).encode()))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/part-0.jsonl.gz"
        config = tiny_config(tmp_path, [{"path": url}])
        assert main(["curate", "--config", str(config), "--workspace", str(tmp_path / "ws"),
                     "--set", "data.val_fraction=0.2"]) == 0
    finally:
        server.shutdown()
    manifest = Workspace(str(tmp_path / "ws")).finished_runs("curate")[0].manifest()
    assert manifest["counts"]["input"] == len(documents)
    assert manifest["counts"]["kept"] + manifest["counts"]["rejected"] == len(documents)


def newest_registered_checkpoint(workspace: str) -> str | None:
    """The run folder of a pretrain attempt on the bucket once Ray Train has registered a checkpoint in it
    (its checkpoint manager snapshot is written after the checkpoint's upload), else None."""
    fs, base = filesystem_for(workspace)
    found = fs.get_file_info(pafs.FileSelector(f"{base}/pretrain", recursive=True, allow_not_found=True))
    snapshots = [info.path for info in found if info.base_name == "checkpoint_manager_snapshot.json" and info.size]
    return snapshots[0] if snapshots else None


def plant_stale_checkpoints(workspace: str) -> tuple[pafs.FileSystem, str, int, list[str]]:
    """Beside what the killed run left in its run folder on the bucket, what other kills leave: a newest
    checkpoint whose rank-0 upload was cut off (no DCP metadata) and two older complete ones Ray no longer
    lists; and a folder that is no checkpoint. Returns the filesystem, the run folder, the newest step Ray
    registered, and the planted checkpoint names that must be rotated away (the partial one and the
    oldest: two newer complete checkpoints exist, the registered one and `..._r000_5ca1e2`)."""
    fs, _ = filesystem_for(workspace)
    snapshot = newest_registered_checkpoint(workspace)
    run = snapshot.rsplit("/", 1)[0]
    with fs.open_input_stream(snapshot) as stream:
        registered = json.loads(stream.read())["latest_checkpoint_result"]["checkpoint_dir_name"]
    stale = ["checkpoint_9999990_r000_5ca1e0", "checkpoint_0000001_r000_5ca1e1"]
    for name in [*stale, "checkpoint_0000002_r000_5ca1e2"]:
        pafs.copy_files(f"{run}/{registered}", f"{run}/{name}", source_filesystem=fs, destination_filesystem=fs)
    fs.delete_file(f"{run}/{stale[0]}/.metadata")
    with fs.open_output_stream(f"{run}/checkpoint_notes/keep.txt") as out:
        out.write(b"not a checkpoint")
    return fs, run, int(registered.split("_")[1]), stale


@pytest.mark.slow
def test_pretrain_killed_mid_run_resumes_from_the_bucket_to_the_uninterrupted_loss(ray_session, s3_bucket, tmp_path,
                                                                                   monkeypatch):
    """The corpus, the workspace and the checkpoints on a bucket. Curate reads a glob of jsonl.gz files and a
    parquet folder there. SIGKILL the `raylm pretrain` process (its Ray with it) once a checkpoint is on the
    bucket; the rerun takes the attempt back, rotates away the checkpoint folders Ray never registered that
    resuming does not need (planted ones among them), and Ray Train restores from the bucket; a forced fresh
    run ends at the same loss; generate and export read the best checkpoint from the bucket. (The pipeline
    command on a bucket, eval and the report included, is the cluster job's test in tests/test_cluster_jobs.py.)"""
    import os
    import signal

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts for a SQLite store default to ./mlartifacts
    put_corpus(s3_bucket, stdlib_documents(40))
    config = tiny_config(tmp_path, [{"path": f"{s3_bucket}/corpus/*.jsonl.gz"}, {"path": f"{s3_bucket}/pq"}])
    workspace = f"{s3_bucket}/ws"
    common = ["--config", str(config), "--workspace", workspace,
              "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--set", "train.max_steps=40",
              "--set", "train.checkpoint_every=10", "--set", "train.eval_every=10"]
    assert main(["curate", *common]) == 0 and main(["tokenize", *common]) == 0
    curated = Workspace(workspace).finished_runs("curate")[0].manifest()
    assert curated["counts"]["input"] == 40 and curated["outputs"]["train"].startswith(f"{workspace}/curate/")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    killed = subprocess.Popen([sys.executable, "-m", "raylm", "pretrain", *common], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while newest_registered_checkpoint(workspace) is None and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    stderr = killed.communicate(timeout=60)[1]
    assert killed.returncode == -signal.SIGKILL, f"pretrain ended before it could be killed: {stderr[-2000:]}"
    assert not Workspace(workspace).finished_runs("pretrain")
    fs, run, registered_step, stale = plant_stale_checkpoints(workspace)

    assert main(["pretrain", *common]) == 0
    resumed = Workspace(workspace).finished_runs("pretrain")[0].manifest()
    assert resumed["metrics"]["resumed_from_step"] >= registered_step and resumed["metrics"]["step"] == 40
    left = {info.base_name for info in fs.get_file_info(pafs.FileSelector(run))}
    assert not left & set(stale) and "checkpoint_notes" in left, left  # rotated before the resume; others untouched
    assert resumed["metrics"]["checkpoints_refused"] == 0  # the partial ones were gone before the workers looked
    assert resumed["checkpoint"].startswith(f"{workspace}/pretrain/")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`raylm.stage` = 'pretrain' and tags.`raylm.reused` = 'false'")
    statuses = sorted(run.info.status for run in runs)
    assert statuses == ["FINISHED", "KILLED"], statuses  # the killed process's run is closed on the rerun
    finished = next(run for run in runs if run.info.status == "FINISHED")
    assert finished.data.metrics["system/checkpoints_rotated"] >= len(stale)
    assert main(["pretrain", *common, "--force"]) == 0
    fresh = Workspace(workspace).finished_runs("pretrain")[0].manifest()
    assert fresh["attempt"] != resumed["attempt"] and fresh["metrics"]["resumed_from_step"] == -1
    assert resumed["metrics"]["val_loss"] == pytest.approx(fresh["metrics"]["val_loss"], abs=1e-5)

    checkpoint = fresh["checkpoint"]
    assert checkpoint.startswith(f"{workspace}/pretrain/") and "/best/step-" in checkpoint
    out = tmp_path / "hf"
    assert main(["generate", "--checkpoint", checkpoint, "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert main(["export", "--checkpoint", checkpoint, "--out", str(out)]) == 0
    assert (out / "config.json").exists()


def committed_rows(workspace: str) -> tuple[dict, list[str]]:
    """The committed curate manifest and the ids of every kept row it lists."""
    manifest = Workspace(workspace).finished_runs("curate")[0].manifest()
    ids = []
    for split in ("train", "val"):
        fs, path = filesystem_for(manifest["outputs"][split])
        ids += pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    return manifest, ids


def two_curates_at_once(workspace: str, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    import os

    args = [sys.executable, "-m", "raylm", "curate", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", workspace,
            "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    first = subprocess.Popen(args, cwd=tmp_path, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    time.sleep(3)  # a resubmitted job, a few seconds later
    second = subprocess.Popen(args, cwd=tmp_path, env=dict(os.environ), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    done = []
    for process in (first, second):
        out, err = process.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return done


@pytest.mark.slow
def test_two_runs_of_one_stage_at_once_leave_exactly_one_runs_rows(s3_bucket, tmp_path):
    """Two `raylm curate` processes on one bucket: an object store has no atomic rename, so this is the
    harder case of the commit protocol. (On a local disk the same wait-and-reuse goes through the same
    Workspace calls; tests/test_workspace.py checks it there in seconds, with the writer in a thread.)"""
    workspace = f"{s3_bucket}/ws"
    done = two_curates_at_once(workspace, tmp_path)
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-3000:] for d in done]
    manifest, ids = committed_rows(workspace)
    counts = manifest["counts"]
    assert len(ids) == len(set(ids)) == counts["kept"] == counts["train"] + counts["val"]
    assert counts["input"] == counts["kept"] + counts["rejected"]
    assert "waiting for it to finish" in done[1].stderr  # the second run waited and reused the first's result
    fs, base = filesystem_for(workspace)
    attempts = fs.get_file_info(pafs.FileSelector(f"{base}/curate/{manifest['key']}/attempts"))
    assert [info.base_name for info in attempts] == [manifest["attempt"]]
