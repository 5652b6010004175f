"""Distributed training with real Ray Train on CPU (gloo): the issue's tests 1-4, 6 and 7, and issue 18's
pretraining run on a train split several times larger than the worker's memory budget.

Runs are tiny (2 layers, width 32, 20 steps) and shared between tests through module fixtures, each
one a real `TorchTrainer.fit()` built by `build_trainer`. Per-step losses come from the MLflow run the
rank-0 worker logs to. Tolerances: 1 vs 2 workers and FSDP2 vs DDP agree within 2e-3 nats per step
(fp32; only the all-reduce summation order differs); an exact resume agrees within 1e-5.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from raylm.artifacts import Packed
from raylm.data.pack import packed_table
from raylm.data.token_files import token_dtype, write_index, write_shard_files
from raylm.data.tokenizer import token_byte_lengths, tokenizer_from_json
from raylm.train.checkpoint import load_training_state, verify_checkpoint
from raylm.train.launch import BEST_DIR, best_checkpoint, build_trainer
from raylm.model import Transformer, TransformerConfig
from raylm.train.optim import build_optimizer
from tests.train_helpers import SEQ_LEN, make_packed, tiny_model, tiny_train

pytestmark = pytest.mark.slow

CURVE_TOLERANCE = 2e-3
RESUME_TOLERANCE = 1e-5


class Runs:
    """Trains named runs into one folder, each with its own MLflow run; remembers results."""

    def __init__(self, folder: Path, packed: Packed):
        self.folder, self.packed = folder, packed
        self.tracking_uri = f"sqlite:///{folder}/mlflow.db"
        self.client = MlflowClient(self.tracking_uri)
        self.experiment = self.client.create_experiment("train-tests")
        self.results, self.run_ids = {}, {}

    def fit(self, name: str, run_name: str | None = None, extra: dict | None = None, storage: str | None = None,
            model: TransformerConfig | None = None, packed: Packed | None = None, **train):
        run_name = run_name or name
        if run_name not in self.run_ids:
            self.run_ids[run_name] = self.client.create_run(self.experiment, run_name=run_name).info.run_id
        trainer = build_trainer(model or tiny_model(), tiny_train(**train), packed or self.packed,
                                storage or str(self.folder / "runs"),
                                run_name,
                                self.tracking_uri, self.run_ids[run_name], **(extra or {}))
        result = trainer.fit()
        assert result.error is None, result.error
        self.results[name] = result
        return result

    def curve(self, run_name: str, metric: str = "step_loss") -> dict[int, float]:
        """The last value logged at each step (a redone step keeps its latest value)."""
        history = sorted(self.client.get_metric_history(self.run_ids[run_name], metric), key=lambda m: m.timestamp)
        return {m.step: m.value for m in history}

    def run_dir(self, run_name: str) -> Path:
        return self.folder / "runs" / run_name

    def copy_run(self, source: str, target: str) -> Path:
        """A copy of run folder `source` as run `target` (Ray's snapshot pointed at the copy's checkpoints)."""
        source_dir, target_dir = self.run_dir(source), self.run_dir(target)
        shutil.copytree(source_dir, target_dir)
        snapshot = target_dir / "checkpoint_manager_snapshot.json"
        snapshot.write_text(snapshot.read_text().replace(str(source_dir), str(target_dir)))
        return target_dir


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    return Runs(folder, make_packed(folder))


@pytest.fixture(scope="module")
def ddp1(runs):
    return runs.fit("ddp1", workers=1)


@pytest.fixture(scope="module")
def ddp2(runs):
    return runs.fit("ddp2", workers=2)


@pytest.fixture(scope="module")
def fsdp2(runs):
    result = runs.fit("fsdp2", workers=2, strategy="fsdp")
    runs.copy_run("fsdp2", "fsdp2-saved")  # as the 2 workers left it, whatever later tests add to "fsdp2"
    return result


def assert_curves_agree(a: dict[int, float], b: dict[int, float], tolerance: float) -> float:
    assert sorted(a) == sorted(b) == list(range(1, 21))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= tolerance, f"loss curves differ by up to {worst:.2e} (> {tolerance})"
    return worst


def test_ddp_on_two_workers_matches_one_worker(runs, ddp1, ddp2):
    assert ddp1.metrics["workers"] == 1 and ddp2.metrics["workers"] == 2
    assert ddp2.metrics["grad_accum_steps"] == 1 and ddp1.metrics["grad_accum_steps"] == 2  # 8 seqs, micro 4
    curve = runs.curve("ddp1")
    assert curve[20] < curve[1] - 0.5  # it learns
    assert_curves_agree(curve, runs.curve("ddp2"), CURVE_TOLERANCE)
    assert ddp1.metrics["val_loss"] == pytest.approx(ddp2.metrics["val_loss"], abs=CURVE_TOLERANCE)
    for key in ("loss", "val_loss", "val_bpb", "lr", "step", "tokens_seen", "mfu", "tokens_per_s", "grad_norm"):
        assert key in ddp2.metrics and math.isfinite(ddp2.metrics[key]), key
    assert ddp2.metrics["tokens_seen"] == 20 * 8 * 32


def test_fsdp2_matches_ddp_on_two_workers(runs, ddp2, fsdp2):
    assert_curves_agree(runs.curve("ddp2"), runs.curve("fsdp2"), CURVE_TOLERANCE)
    state = verify_checkpoint(fsdp2.checkpoint.path)
    assert state["world_size"] == 2 and state["step"] == 20
    assert sorted(p.name for p in Path(fsdp2.checkpoint.path).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_modern_recipe_with_muon_trains_under_fsdp2_for_a_token_budget(runs):
    """Issue 23 through Ray Train: the `modern` recipe (Muon on the block matrices, WSD, QK norm, ...) on two
    FSDP2 workers, where GatheredMuon orthogonalises gathered matrices (equal to one unsharded worker within
    1e-5: tests/test_recipe.py) learn; `train.budget.tokens` fixes the run at 20 steps of 8 sequences, and
    both workers' shards are in the checkpoint."""
    from raylm.config import BudgetConfig
    from raylm.recipe import RECIPES

    model = TransformerConfig(**{**tiny_model().to_dict(), **RECIPES["modern"]["model"]})
    recipe = {**RECIPES["modern"]["train"], "budget": BudgetConfig(tokens=20 * 8 * model.seq_len)}
    result = runs.fit("modern-fsdp", model=model, workers=2, strategy="fsdp", max_steps=None, **recipe)
    curve = runs.curve("modern-fsdp")
    assert sorted(curve) == list(range(1, 21))  # the budget's 20 steps
    assert curve[20] < curve[1] - 0.5  # it learns
    state = verify_checkpoint(result.checkpoint.path)
    assert state["world_size"] == 2 and state["step"] == 20
    assert sorted(p.name for p in Path(result.checkpoint.path).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_exact_resume_after_a_failure_matches_an_uninterrupted_run(runs, ddp1):
    # checkpoints at 5, 10, ...; the worker dies at step 12 and Ray restarts it from step 10
    result = runs.fit("resumed", workers=1, checkpoint_every=5, max_failures=1, extra={"fail_at_step": 12})
    assert result.metrics["restarts"] == 1 and result.metrics["resumed_from_step"] == 10
    resumed, uninterrupted = runs.curve("resumed"), runs.curve("ddp1")
    assert abs(resumed[20] - uninterrupted[20]) <= RESUME_TOLERANCE
    assert_curves_agree(resumed, uninterrupted, RESUME_TOLERANCE)
    assert result.metrics["val_loss"] == pytest.approx(ddp1.metrics["val_loss"], abs=RESUME_TOLERANCE)


def test_exact_resume_from_checkpoints_on_s3_matches_an_uninterrupted_run(runs, ddp1, s3_bucket):
    # the same failure with the run's storage on the loopback S3 server: the restart reads checkpoint 10 back
    result = runs.fit("resumed-s3", workers=1, checkpoint_every=5, max_failures=1, extra={"fail_at_step": 12},
                      storage=f"{s3_bucket}/runs")
    assert result.metrics["restarts"] == 1 and result.metrics["resumed_from_step"] == 10
    assert result.checkpoint.path.startswith(s3_bucket.removeprefix("s3://") + "/runs/resumed-s3/")
    assert_curves_agree(runs.curve("resumed-s3"), runs.curve("ddp1"), RESUME_TOLERANCE)
    assert result.metrics["val_loss"] == pytest.approx(ddp1.metrics["val_loss"], abs=RESUME_TOLERANCE)
    best = best_checkpoint(f"{s3_bucket}/runs/resumed-s3")
    assert best is not None and "/best/step-" in best


def _offline_state(path: str):
    model = Transformer(TransformerConfig.from_dict(json.loads((Path(path) / "model_config.json").read_text())))
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()  # materialise optimizer state to load into
    optimizer.step()
    state = load_training_state(path, model, optimizer, rank=0)
    return state, model.state_dict(), optimizer.state_dict()


def assert_same_training_state(saved_path: str, resumed_path: str) -> None:
    """Parameters, the trainer's step and AdamW's moments and step are bit-identical after resharding."""
    before, after = _offline_state(saved_path), _offline_state(resumed_path)
    assert before[0]["step"] == after[0]["step"] == 20
    for name, tensor in before[1].items():
        assert torch.equal(tensor, after[1][name]), name
    for index, slot in before[2]["state"].items():
        assert int(slot["step"]) == int(after[2]["state"][index]["step"]) == 20
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(slot[key], after[2]["state"][index][key]), (index, key)


def test_checkpoint_saved_by_two_workers_resumes_on_one(runs, fsdp2):
    saved_path = fsdp2.checkpoint.path
    # same run folder, one worker: Ray hands the 2-worker checkpoint to the new worker group
    result = runs.fit("reshard", run_name="fsdp2", workers=1, strategy="fsdp")
    assert result.metrics["restarts"] == 1 and result.metrics["workers"] == 1
    assert result.checkpoint.path != saved_path and verify_checkpoint(result.checkpoint.path)["world_size"] == 1
    assert_same_training_state(saved_path, result.checkpoint.path)


def test_checkpoint_saved_by_two_workers_resumes_on_three(runs, fsdp2):
    # the 2-worker run folder, resumed by 3 FSDP2 workers (half a CPU each on the session's 2-CPU Ray):
    # DCP reshards every parameter and optimizer moment from 2 shards to 3 uneven ones (32 rows: 11/11/10)
    runs.copy_run("fsdp2-saved", "fsdp2-to-3")
    saved_path = str(runs.run_dir("fsdp2-to-3") / Path(fsdp2.checkpoint.path).name)
    assert verify_checkpoint(saved_path)["world_size"] == 2
    result = runs.fit("reshard3", run_name="fsdp2-to-3", workers=3, strategy="fsdp", cpus_per_worker=0.5)
    assert result.metrics["restarts"] == 1 and result.metrics["workers"] == 3
    assert result.metrics["resumed_from_step"] == 20 and result.metrics["step"] == 20
    state = verify_checkpoint(result.checkpoint.path)
    assert result.checkpoint.path != saved_path and state["world_size"] == 3
    assert sorted(p.name for p in Path(result.checkpoint.path).glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]
    assert_same_training_state(saved_path, result.checkpoint.path)


def checkpoint_at(run_dir: Path, step: int) -> Path:
    """The one checkpoint folder of `step` in a run (`checkpoint_<step>_r<restarts>_<worker group>`)."""
    found = sorted(run_dir.glob(f"checkpoint_{step:07d}_r*"))
    assert len(found) == 1, found
    return found[0]


def forget_checkpoint(run_dir: Path, step: int) -> None:
    """Ray's snapshot as if the run had died after checkpoint `step` was uploaded but before Ray recorded it."""
    snapshot_file = run_dir / "checkpoint_manager_snapshot.json"
    snapshot = json.loads(snapshot_file.read_text())
    kept = [(result, index) for result, index in zip(snapshot["checkpoint_results"], snapshot["checkpoint_report_indices"])
            if not result["checkpoint_dir_name"].startswith(f"checkpoint_{step:07d}_")]
    snapshot["checkpoint_results"] = [result for result, _ in kept]
    snapshot["checkpoint_report_indices"] = [index for _, index in kept]
    snapshot["latest_checkpoint_result"] = kept[-1][0]
    snapshot_file.write_text(json.dumps(snapshot))


@pytest.mark.parametrize("ray_knows", ["an older checkpoint", "no checkpoint"])
def test_resume_takes_the_newest_complete_checkpoint_on_disk_whatever_ray_registered(ray_knows, runs, ddp1):
    """A run killed after checkpoint 20 reached storage but before Ray recorded it (Ray's snapshot names
    checkpoint 10, or the run died before Ray wrote any snapshot) resumes from 20, the newest checkpoint
    that verifies; folders carry their worker group's id, so no two groups share one."""
    name = f"unrecorded-{ray_knows.split()[0]}"
    target = runs.copy_run("ddp1", name)
    if ray_knows == "no checkpoint":
        (target / "checkpoint_manager_snapshot.json").unlink()
    else:
        forget_checkpoint(target, 20)
    runs.run_ids[name] = runs.run_ids["ddp1"]
    result = runs.fit(name, workers=1, max_steps=20)
    assert result.metrics["resumed_from_step"] == 20 and result.metrics["checkpoints_refused"] == 0
    groups = {folder.name.rsplit("_", 1)[1] for folder in target.glob("checkpoint_*")}
    assert len(groups) >= 2  # the resumed group saved its final checkpoint beside ddp1's, under its own id


def test_corrupted_newest_checkpoint_is_refused_and_the_previous_used(runs, ddp1):
    source = runs.run_dir("ddp1")
    target = runs.run_dir("corrupt")
    shutil.copytree(source, target)
    snapshot = target / "checkpoint_manager_snapshot.json"
    snapshot.write_text(snapshot.read_text().replace(str(source), str(target)))
    newest = checkpoint_at(target, 20)
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    runs.run_ids["corrupt"] = runs.run_ids["ddp1"]  # log beside the original curve
    result = runs.fit("corrupt", workers=1, max_steps=20)
    assert result.metrics["checkpoints_refused"] == 1
    assert result.metrics["resumed_from_step"] == 10 and result.metrics["step"] == 20
    assert result.metrics["val_loss"] == pytest.approx(runs.results["ddp1"].metrics["val_loss"], abs=RESUME_TOLERANCE)


def test_a_crafted_newest_checkpoint_runs_no_code_on_resume_and_the_previous_is_used(runs, ddp1, tmp_path):
    """The newest checkpoint verifies (its lists were rewritten) but its metadata is a crafted pickle: the
    worker refuses it while loading, counts it, and resumes from the one before, running nothing."""
    import os

    from tests.test_checkpoint_safety import RunsCode, plant_in_metadata

    target = runs.copy_run("ddp1", "crafted")
    marker = tmp_path / "PWNED"
    plant_in_metadata(checkpoint_at(target, 20), RunsCode(os.system, f"touch {marker}"))
    assert verify_checkpoint(str(checkpoint_at(target, 20)))["step"] == 20
    runs.run_ids["crafted"] = runs.run_ids["ddp1"]
    result = runs.fit("crafted", workers=1, max_steps=20)
    assert result.metrics["checkpoints_refused"] == 1 and not marker.exists()
    assert result.metrics["resumed_from_step"] == 10 and result.metrics["step"] == 20
    assert result.metrics["val_loss"] == pytest.approx(runs.results["ddp1"].metrics["val_loss"], abs=RESUME_TOLERANCE)


def test_early_stopping_keeps_the_best_checkpoint(runs):
    # a learning rate far too high: val loss stops improving after the first evaluations
    result = runs.fit("early", workers=1, lr=0.5, warmup_steps=0, max_steps=60, eval_every=2, checkpoint_every=2,
                      early_stopping_patience=2, grad_clip=0.0)
    assert result.metrics.get("early_stopped") == 1 and result.metrics["step"] < 60
    val = {step: loss for step, loss in runs.curve("early", "val_loss").items() if step > 0}  # 0: the baseline
    best_step = min(val, key=val.get)
    best = json.loads((runs.run_dir("early") / BEST_DIR / "best.json").read_text())
    assert best["step"] == best_step and best["val_loss"] == pytest.approx(val[best_step])
    assert verify_checkpoint(str(runs.run_dir("early") / BEST_DIR / best["folder"]))["step"] == best_step
    assert best_checkpoint(str(runs.run_dir("early"))) == str(runs.run_dir("early") / BEST_DIR / best["folder"])
    copies = [p.name for p in (runs.run_dir("early") / BEST_DIR).iterdir() if p.is_dir()]
    assert copies == [best["folder"]]  # earlier bests are deleted once best.json names the new one
    evaluations_after_best = [s for s in val if s > best_step]
    assert len(evaluations_after_best) == 2


LARGE_SPLIT_ROWS = 2_400_000  # x 33 tokens: 302 MiB as int32, what the whole-split reader held; 151 MiB of uint16 files
LARGE_SPLIT_SHARDS = 8


def write_random_train_split(folder: Path, packed: Packed, rows: int, shards: int) -> Packed:
    """`packed` with its train split replaced by `rows` rows of random token ids, written as the tokenize stage
    writes a split: parquet shards of `packed_table`'s columns, each shard's token files, and their index."""
    tokenizer_json = Path(packed.tokenizer.path).read_text()
    byte_lengths = token_byte_lengths(tokenizer_from_json(tokenizer_json))
    vocab_size, width = packed.tokenizer.vocab_size, packed.seq_len + 1
    filesystem, dtype, root = pafs.LocalFileSystem(), token_dtype(vocab_size).str, str(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for shard in range(shards):
        tokens = rng.integers(0, vocab_size, size=(rows // shards, width), dtype=np.int32)
        table = packed_table(tokens, packed.tokenizer.pad_id, byte_lengths)
        path = f"{root}/part-{shard}.parquet"
        pq.write_table(table, path)
        entries.append(write_shard_files(table.to_batches(), filesystem, root, path, False, dtype, width))
    write_index(filesystem, root, entries, dtype, width)
    return replace(packed, outputs={**packed.outputs, "train": root})


def data_memory_growth(metrics: dict) -> float:
    """Bytes the worker's resident memory rose above what it held before it opened the data (its peak since)."""
    return (metrics["rss_peak_gib"] - metrics["rss_before_data_gib"]) * 2**30


def test_a_train_split_four_times_the_workers_memory_budget_trains_and_resumes_exactly(runs, tmp_path):
    """Issue 18: pretraining on a train split whose rows (as int32, what the old whole-split reader held) are
    more than 4 times what the worker's memory may grow by; the worker dies at step 12, resumes from its
    checkpoint at 10 and ends on the uninterrupted run's loss curve, neither run's worker growing past the budget."""
    large = write_random_train_split(tmp_path / "train", runs.packed, LARGE_SPLIT_ROWS, LARGE_SPLIT_SHARDS)
    split_bytes = LARGE_SPLIT_ROWS * (SEQ_LEN + 1) * 4
    budget = split_bytes // 4
    uninterrupted = runs.fit("large-split", workers=1, packed=large)
    resumed = runs.fit("large-split-resumed", workers=1, checkpoint_every=5, max_failures=1,
                       extra={"fail_at_step": 12}, packed=large)
    assert resumed.metrics["restarts"] == 1 and resumed.metrics["resumed_from_step"] == 10
    assert resumed.metrics["step"] == 20
    assert_curves_agree(runs.curve("large-split-resumed"), runs.curve("large-split"), RESUME_TOLERANCE)
    assert resumed.metrics["val_loss"] == pytest.approx(uninterrupted.metrics["val_loss"], abs=RESUME_TOLERANCE)
    for result in (uninterrupted, resumed):
        growth = data_memory_growth(result.metrics)
        assert growth < budget, (
            f"the worker's RSS rose {growth / 2**20:.0f} MiB (from {result.metrics['rss_before_data_gib'] * 1024:.0f} "
            f"MiB before opening the data to a {result.metrics['rss_peak_gib'] * 1024:.0f} MiB peak), over the "
            f"{budget / 2**20:.0f} MiB budget: a quarter of the {split_bytes / 2**20:.0f} MiB split as int32")
