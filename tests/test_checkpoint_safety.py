"""Checkpoints from someone else: a crafted pickle in any file a loader reads runs no code and is refused
naming the file, for every command that loads one; every file a checkpoint needs is in its integrity
list, and a damaged list or a verified checkpoint that cannot be read falls back to the previous one.

The attacker here also rewrites the file lists (sizes and SHA-256 are a check against damage, not a
signature), so only the restricted unpicklers stand between the payload and the process."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from eval_helpers import make_checkpoint
from raylm.cli import main
from raylm.model import Transformer, TransformerConfig
from raylm.train.checkpoint import (
    CheckpointError,
    load_model,
    load_training_state,
    newest_good_checkpoint,
    verify_checkpoint,
)
from tests.conftest import CONFIGS


class RunsCode:
    """Unpickling this calls `callable(*args)`: what a malicious pickle does."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def relist(directory: Path, rank: int = 0) -> None:
    """Rewrite a rank's file list to match the files now on disk, as an attacker would."""
    listing = json.loads((directory / f"files_rank{rank}.json").read_text())
    for name in listing:
        data = (directory / name).read_bytes()
        listing[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / f"files_rank{rank}.json").write_text(json.dumps(listing))


def plant_in_metadata(directory: Path, payload) -> None:
    with open(directory / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)  # our own, freshly written file
    metadata.planner_data = {"model.embed.weight": payload}
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    relist(directory)


def plant_in_shard(directory: Path, payload) -> None:
    """Rewrite the shards so that a weight and the optimizer's `lr` are non-tensor items that unpickle to
    the payload (DCP stores any non-tensor value as a pickle, whatever the loader expects there)."""
    config = TransformerConfig.from_dict(json.loads((directory / "model_config.json").read_text()))
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters())
    model_state, optim_state = get_state_dict(model, optimizer)
    model_state[next(iter(model_state))] = payload
    optim_state["param_groups"][0]["lr"] = payload
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))
    relist(directory)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("clean") / "checkpoint_0000010_r000", seq_len=32)


def crafted(clean: Path, tmp_path: Path, where: str, marker: Path) -> Path:
    target = tmp_path / "crafted" / "checkpoint_0000010_r000"
    shutil.copytree(clean, target)
    if where == "metadata":
        plant_in_metadata(target, RunsCode(os.system, f"touch {marker}"))
    elif where == "metadata-dotted-name":  # a method of a class the unpickler admits is still refused
        plant_in_metadata(target, RunsCode(Path.touch, marker))
    else:
        plant_in_shard(target, RunsCode(os.system, f"touch {marker}"))
    return target


PLANTED = {"metadata": ".metadata", "metadata-dotted-name": ".metadata", "shard": "__0_0.distcp"}


@pytest.mark.parametrize("where", list(PLANTED))
def test_a_crafted_pickle_runs_no_code_in_any_loader(where, clean, tmp_path, capsys):
    from raylm.eval.lm import RaylmLM

    marker = tmp_path / "PWNED"
    checkpoint = crafted(clean, tmp_path, where, marker)
    named = PLANTED[where]
    assert verify_checkpoint(str(checkpoint))["step"] == 0  # the lists were rewritten: only the unpickler stands

    # raylm generate and raylm export: one line naming the file, exit 2
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a", "--max-new-tokens", "2"]) == 2
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(named in line and "refus" in line for line in errors), errors
    # an eval actor's model
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        RaylmLM(checkpoint=str(checkpoint), batch_size=2)
    # a training worker: --resume (model and optimizer) and `--from` (weights only)
    model = Transformer(TransformerConfig.from_dict(json.loads((checkpoint / "model_config.json").read_text())))
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_training_state(str(checkpoint), model, torch.optim.AdamW(model.parameters()), rank=0)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_training_state(str(checkpoint), model, None, rank=0)
    assert not marker.exists()


def test_finetune_from_a_crafted_checkpoint_is_refused_before_ray_starts(clean, tmp_path, capsys):
    import ray

    marker = tmp_path / "PWNED"
    checkpoint = crafted(clean, tmp_path, "metadata", marker)
    data = tmp_path / "domain"
    data.mkdir()
    (data / "a.txt").write_text("some text to tune on\n")
    started = ray.is_initialized()
    code = main(["finetune", "--from", str(checkpoint), "--config", str(CONFIGS / "tiny.yaml"),
                 "--workspace", str(tmp_path / "ws"), "--set", f"finetune.data={data}",
                 "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "--from" in error and ".metadata" in error and "refusing to load posix.system" in error
    assert ray.is_initialized() == started and not marker.exists()


def test_metadata_naming_a_shard_outside_its_folder_is_refused(clean, tmp_path):
    target = tmp_path / "checkpoint_0000010_r000"
    shutil.copytree(clean, target)
    with open(target / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (target / ".metadata").write_bytes(pickle.dumps(metadata))
    relist(target)
    with pytest.raises(CheckpointError, match=r"names shard file '\.\./\.\./elsewhere\.distcp' outside"):
        load_model(str(target))


def _copy(clean: Path, tmp_path: Path, step: int) -> Path:
    target = tmp_path / "run" / f"checkpoint_{step:07d}_r000"
    shutil.copytree(clean, target)
    state = json.loads((target / "trainer_state.json").read_text())
    (target / "trainer_state.json").write_text(json.dumps({**state, "step": step}))
    relist(target)
    return target


def test_every_file_a_loader_reads_is_in_the_integrity_list(clean, tmp_path):
    listed = json.loads((clean / "files_rank0.json").read_text())
    assert {".metadata", "trainer_state.json", "model_config.json", "tokenizer.json", "rng_rank0.json",
            "__0_0.distcp"} <= set(listed)
    for name, edit in [("trainer_state.json", lambda s: s.replace('"step": 0', '"step": 9')),
                       ("model_config.json", lambda s: s.replace('"n_layers": 2', '"n_layers": 3')),
                       ("tokenizer.json", lambda s: s.replace('"model"', '"MODEL"', 1))]:
        target = tmp_path / name / "checkpoint_0000010_r000"
        shutil.copytree(clean, target)
        (target / name).write_text(edit((target / name).read_text()))
        with pytest.raises(CheckpointError, match=f"{name} fails its SHA-256 check"):
            verify_checkpoint(str(target))


@pytest.mark.parametrize("damage, message", [
    ("world_size 0", r"world_size 0, expected an integer >= 1"),
    ("list not json", r"files_rank0\.json is not valid JSON"),
    ("empty list", r"files_rank0\.json lists no files"),
    ("no list", r"missing files_rank0\.json"),
    ("older list", r"files_rank0\.json does not cover trainer_state\.json"),
])
def test_a_damaged_or_emptied_list_is_refused_and_the_previous_checkpoint_chosen(damage, message, clean, tmp_path):
    _copy(clean, tmp_path, 10)
    newest = _copy(clean, tmp_path, 20)
    files = newest / "files_rank0.json"
    if damage == "world_size 0":
        state = json.loads((newest / "trainer_state.json").read_text())
        (newest / "trainer_state.json").write_text(json.dumps({**state, "world_size": 0}))
        relist(newest)
    elif damage == "list not json":
        files.write_text(files.read_text()[:40])
    elif damage == "empty list":
        files.write_text("{}")
    elif damage == "no list":
        files.unlink()
    else:
        listing = json.loads(files.read_text())
        del listing["trainer_state.json"]
        files.write_text(json.dumps(listing))
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(str(newest))
    chosen, refusals = newest_good_checkpoint(str(newest))
    assert chosen.endswith("checkpoint_0000010_r000") and len(refusals) == 1


def test_pretrain_and_finetune_from_a_checkpoint_of_another_shape_are_refused_before_ray_starts(clean, tmp_path, capsys):
    """`clean` is d_model 32, 4 heads, seq_len 32; tiny.yaml asks for d_model 64, 2 heads."""
    import ray

    started = ray.is_initialized()
    common = ["--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(tmp_path / "ws"),
              "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    assert main(["pretrain", "--from", str(clean), *common]) == 2
    error = capsys.readouterr().err
    assert f"model.d_model = 64 but --from {clean} has d_model = 32" in error
    assert "its weights do not fit this model (model." in error
    data = tmp_path / "domain"
    data.mkdir()
    (data / "a.txt").write_text("some text to tune on\n")
    assert main(["finetune", "--from", str(clean), *common, "--set", f"finetune.data={data}"]) == 2
    assert f"model.d_model = 64 but the base checkpoint {clean} has d_model = 32" in capsys.readouterr().err
    # the same architecture passes the check and stops, in one line, at the missing tokenize stage
    fitting = ["--set", "model.d_model=32", "--set", "model.n_heads=4", "--set", "model.seq_len=32"]
    assert main(["pretrain", "--from", str(clean), *common, *fitting]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("raylm: stage 'tokenize' has not finished") and "Traceback" not in "".join(lines)
    assert ray.is_initialized() == started


def test_a_garbled_metadata_file_whose_list_matches_is_one_line_for_every_command(clean, tmp_path, capsys):
    """Damage the file list cannot see (a writer that listed a truncated file): one line, no traceback."""
    target = tmp_path / "garbled" / "checkpoint_0000010_r000"
    shutil.copytree(clean, target)
    (target / ".metadata").write_bytes((target / ".metadata").read_bytes()[:200])
    relist(target)
    common = ["--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(tmp_path / "ws"),
              "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    assert main(["generate", "--checkpoint", str(target), "--prompt", "a"]) == 2
    assert main(["pretrain", "--from", str(target), *common]) == 2
    errors = capsys.readouterr().err
    assert errors.count("not readable as DCP metadata") == 2 and "Traceback" not in errors
