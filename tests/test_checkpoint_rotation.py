"""Rotation of the checkpoint folders a killed run left unused (raylm.train.rotation), on planted run folders.

The checkpoints are real ones (`save_checkpoint` of a tiny model, copied and re-listed per step) and Ray's
snapshot has the shape Ray Train 2 writes; the partial ones are what an interrupted upload leaves: a rank's
files missing, the rank-0 list not yet written, a shard cut short."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from raylm.model import Transformer, TransformerConfig
from raylm.train.checkpoint import CheckpointError, good_checkpoints, newest_first, save_checkpoint, verify_checkpoint
from raylm.train.rotation import SNAPSHOT, rotate_unused_checkpoints, unused_checkpoints


def relist(directory: Path, rank: int, names: list[str]) -> None:
    """Write rank `rank`'s file list of `names`, as `save_checkpoint` does."""
    listing = {}
    for name in names:
        data = (directory / name).read_bytes()
        listing[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / f"files_rank{rank}.json").write_text(json.dumps(listing))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One real checkpoint, as rank 0 of a one-worker run writes it."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, seq_len=8))
    directory = tmp_path_factory.mktemp("saved") / "checkpoint"
    save_checkpoint(str(directory), model, torch.optim.AdamW(model.parameters()), {"step": 0}, model.config.to_dict(),
                    '{"model": {}}', rank=0)
    return directory


def plant(saved: Path, run: Path, name: str, workers: int = 1) -> Path:
    """A complete checkpoint named `name` (its step in the trainer state), written by `workers` ranks."""
    target = run / name
    shutil.copytree(saved, target)
    state = json.loads((target / "trainer_state.json").read_text())
    step = int(name.split("_")[1])
    (target / "trainer_state.json").write_text(json.dumps({**state, "step": step, "world_size": workers}))
    relist(target, 0, sorted(json.loads((saved / "files_rank0.json").read_text())))
    for rank in range(1, workers):  # what rank r adds beside rank 0's part (its RNG state; shards left out)
        shutil.copy(target / "rng_rank0.json", target / f"rng_rank{rank}.json")
        relist(target, rank, [f"rng_rank{rank}.json"])
    assert verify_checkpoint(str(target))["step"] == step
    return target


def write_snapshot(run: Path, registered: list[str]) -> None:
    """Ray Train 2's checkpoint_manager_snapshot.json naming `registered` (oldest first)."""
    results = [{"version": 0, "checkpoint_dir_name": name, "metrics": {"step": int(name.split("_")[1]), "loss": 3.5}}
               for name in registered]
    (run / SNAPSHOT).write_text(json.dumps({
        "ray_version": "2.60.0", "checkpoint_results": results,
        "checkpoint_report_indices": list(range(len(results))), "latest_checkpoint_result": results[-1],
        "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(results),
        "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": []}))


def test_a_killed_runs_unregistered_partial_and_older_checkpoints_go_the_newest_complete_ones_stay(saved, tmp_path):
    run = tmp_path / "train"
    registered = ["checkpoint_0000010_r000_aaaaaa", "checkpoint_0000020_r000_aaaaaa"]
    for name in registered:
        plant(saved, run, name)
    write_snapshot(run, registered)
    # uploaded after Ray's last snapshot: the newest complete state (one and two workers)
    plant(saved, run, "checkpoint_0000030_r000_aaaaaa")
    plant(saved, run, "checkpoint_0000035_r001_bbbbbb", workers=2)
    # evicted by Ray's snapshot, killed before Ray deleted it
    plant(saved, run, "checkpoint_0000005_r000_aaaaaa")
    # uploads cut off: rank 1 never arrived; rank 0's list not yet written; a shard short
    rank1_missing = plant(saved, run, "checkpoint_0000040_r001_bbbbbb", workers=2)
    (rank1_missing / "files_rank1.json").unlink()
    (rank1_missing / "rng_rank1.json").unlink()
    no_list = plant(saved, run, "checkpoint_0000040_r002_cccccc")
    (no_list / "files_rank0.json").unlink()
    short = plant(saved, run, "checkpoint_0000045_r002_cccccc")
    (short / "__0_0.distcp").write_bytes((short / "__0_0.distcp").read_bytes()[:100])
    for partial in (rank1_missing, no_list, short):
        with pytest.raises(CheckpointError):
            verify_checkpoint(str(partial))
    # not checkpoints of this run, whatever they hold
    for name in ("best", "checkpoint_notes", "checkpoint_0000050_r002_NOT-HEX"):
        (run / name).mkdir()
        (run / name / "keep.txt").write_text("x")
    (run / "checkpoint_0000060_r002_dddddd").write_text("a file, not a folder")

    removed = rotate_unused_checkpoints(str(run), keep=2)

    assert removed == ["checkpoint_0000045_r002_cccccc", "checkpoint_0000040_r002_cccccc",
                       "checkpoint_0000040_r001_bbbbbb", "checkpoint_0000005_r000_aaaaaa"]
    assert sorted(p.name for p in run.iterdir()) == [
        "best", "checkpoint_0000010_r000_aaaaaa", "checkpoint_0000020_r000_aaaaaa", "checkpoint_0000030_r000_aaaaaa",
        "checkpoint_0000035_r001_bbbbbb", "checkpoint_0000050_r002_NOT-HEX", "checkpoint_0000060_r002_dddddd",
        SNAPSHOT, "checkpoint_notes"]
    assert all((run / name / "keep.txt").exists() for name in ("best", "checkpoint_notes", "checkpoint_0000050_r002_NOT-HEX"))
    assert rotate_unused_checkpoints(str(run), keep=2) == []  # nothing left to rotate
    refusals: list[str] = []  # resuming takes the newest good checkpoint and meets no partial or foreign folder
    assert next(good_checkpoints(str(run), refusals=refusals)).endswith("/checkpoint_0000035_r001_bbbbbb")
    assert refusals == []


def test_without_a_snapshot_the_newest_complete_stay_and_an_unreadable_one_deletes_nothing(saved, tmp_path):
    run = tmp_path / "train"
    for step in (10, 20, 30):
        plant(saved, run, f"checkpoint_{step:07d}_r000_aaaaaa")
    (plant(saved, run, "checkpoint_0000040_r000_aaaaaa") / ".metadata").unlink()
    (run / SNAPSHOT).write_text('{"ray_version": "2.60.0", "checkpoint_res')  # cut off mid-write
    assert rotate_unused_checkpoints(str(run), keep=1) == []
    assert len(list(run.glob("checkpoint_0*"))) == 4
    (run / SNAPSHOT).unlink()  # killed before Ray registered any checkpoint: it starts afresh, raylm resumes from 30
    assert rotate_unused_checkpoints(str(run), keep=1) == ["checkpoint_0000040_r000_aaaaaa", "checkpoint_0000020_r000_aaaaaa",
                                                          "checkpoint_0000010_r000_aaaaaa"]
    assert [p.name for p in run.iterdir()] == ["checkpoint_0000030_r000_aaaaaa"]
    assert rotate_unused_checkpoints(str(tmp_path / "no-run-yet"), keep=1) == []


def test_order_is_by_step_then_restart_not_by_name():
    assert newest_first(["checkpoint_9999990_r001_aa", "checkpoint_10000000_r000_aa"])[0] == "checkpoint_10000000_r000_aa"
    complete = {"checkpoint_10000000_r000_aa": True, "checkpoint_9999990_r001_aa": True, "checkpoint_9999990_r000_aa": True}
    assert unused_checkpoints(complete, set(), keep=2) == ["checkpoint_9999990_r000_aa"]
    assert unused_checkpoints(complete, {"checkpoint_9999990_r000_aa"}, keep=1) == ["checkpoint_9999990_r001_aa"]
