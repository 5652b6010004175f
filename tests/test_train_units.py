"""Fast checks of the training pieces added for distributed training (no Ray cluster needed)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from raylm.config import ConfigError, load_config
from raylm.model import Transformer, TransformerConfig
from raylm.model.loss import lm_batch, split_inputs_targets, summed_loss
from raylm.train.checkpoint import CheckpointError, newest_good_checkpoint, save_checkpoint, verify_checkpoint
from raylm.train.data import PackedSequences
from raylm.train.mfu import measure_matmul_flops, mfu, peak_flops
from raylm.train.optim import build_optimizer
from tests.train_helpers import SEQ_LEN, make_packed


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, seq_len=8))


@pytest.fixture(scope="module")
def masked_packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("masked"), loss_mask=True)


def test_reader_returns_the_loss_mask_aligned_with_tokens(masked_packed):
    data = PackedSequences(masked_packed.train_uri)
    assert data.has_mask
    all_rows, all_mask = data.take(np.arange(len(data)))
    assert all_mask.shape == all_rows.shape and set(np.unique(all_mask)) == {0, 1}
    rows, mask = data.worker_batch(0, 6, seed=0, rank=1, world=2)
    assert len(rows) == 3 and (mask == all_mask[data.worker_indices(0, 6, 0, 1, 2)]).all()
    assert (all_rows[data.worker_indices(0, 6, 0, 1, 2)] == rows).all()


def test_masked_targets_only_count_where_the_mask_is_one(masked_packed):
    data = PackedSequences(masked_packed.train_uri)
    pad = masked_packed.tokenizer.pad_id
    rows, mask = data.worker_batch(0, 4, seed=0, rank=0, world=1)
    rows_t = torch.from_numpy(rows).long()
    _, targets = split_inputs_targets(rows_t)
    _, masked = lm_batch(rows_t, None, loss_mask=torch.from_numpy(mask), ignore_id=pad)  # what the loop computes
    width = SEQ_LEN + 1
    # target j is token j+1: it counts iff loss_mask[j+1] == 1, i.e. j + 1 >= width // 2
    assert (masked[:, : width // 2 - 1] == pad).all()
    assert (masked[:, width // 2 - 1:] == targets[:, width // 2 - 1:]).all()
    model = Transformer(TransformerConfig(vocab_size=masked_packed.tokenizer.vocab_size, d_model=16,
                                          n_layers=1, n_heads=2, seq_len=SEQ_LEN))
    _, count = summed_loss(model(rows_t[:, :-1]), masked, pad)
    assert int(count) == int(((mask[:, 1:] == 1) & (rows[:, 1:] != pad)).sum())


def test_mask_of_the_wrong_shape_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokens = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(10, dtype=np.int32)), 5)
    mask = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8, dtype=np.int8)), 4)
    pq.write_table(pa.table({"tokens": tokens, "loss_mask": mask}), tmp_path / "part.parquet")
    with pytest.raises(ValueError, match="loss_mask"):
        PackedSequences(str(tmp_path))


def _save(directory, step: int, model=None) -> None:
    model = model or tiny()
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    model(torch.randint(0, 40, (2, 8))).sum().backward()
    optimizer.step()
    save_checkpoint(str(directory), model, optimizer, {"step": step}, model.config.to_dict(), None, rank=0)


def test_truncated_shard_is_refused_and_the_previous_checkpoint_chosen(tmp_path):
    for step in (10, 20):
        _save(tmp_path / f"checkpoint_{step:07d}_r000", step)
    newest = tmp_path / "checkpoint_0000020_r000"
    assert verify_checkpoint(str(newest))["step"] == 20
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: os.path.getsize(shard) // 2])
    with pytest.raises(CheckpointError, match="corrupted: __0_0.distcp has .* bytes, expected .*truncated"):
        verify_checkpoint(str(newest))
    chosen, refusals = newest_good_checkpoint(str(newest))
    assert chosen.endswith("checkpoint_0000010_r000") and len(refusals) == 1


def test_flipped_byte_fails_the_hash_and_no_good_checkpoint_is_an_error(tmp_path):
    only = tmp_path / "checkpoint_0000010_r000"
    _save(only, 10)
    data = bytearray((only / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (only / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify_checkpoint(str(only))
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        newest_good_checkpoint(str(only))


def test_activation_checkpointing_is_the_model_switch_and_keeps_gradients():
    from raylm.config import TrainConfig
    from raylm.train.launch import run_model_config

    section = TransformerConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8)
    config = run_model_config(section, TrainConfig(activation_checkpointing=True), 40)
    assert config.activation_checkpointing and config.vocab_size == 40
    plain = tiny()
    torch.manual_seed(0)
    checkpointed = Transformer(TransformerConfig(**{**plain.config.to_dict(), "activation_checkpointing": True}))
    tokens = torch.randint(0, 40, (2, 8))
    plain(tokens).sum().backward()
    checkpointed(tokens).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_frozen_parameters_stay_out_of_the_optimizer():
    model = tiny()
    for param in model.blocks[0].parameters():
        param.requires_grad_(False)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in model.blocks[0].parameters())
    assert all(id(p) in in_optimizer for p in model.blocks[1].parameters())


def test_cpu_peak_is_measured_and_mfu_is_a_fraction():
    measured = measure_matmul_flops(torch.device("cpu"), size=256, repeats=2)
    assert 1e8 < measured < 1e14
    peak = peak_flops(torch.device("cpu"), bf16=False)
    assert peak == peak_flops(torch.device("cpu"), bf16=False)  # measured once, then cached
    assert 0 < mfu(1e6, 1e3, peak) < 1


def test_global_batch_in_tokens_must_be_a_multiple_of_the_context():
    config = load_config(None, ["train.global_batch_tokens=4096", "model.seq_len=256"])
    assert config.train.global_batch_sequences(config.model.seq_len) == 16
    with pytest.raises(ConfigError, match="train.global_batch_tokens = 1000: expected a multiple of model.seq_len"):
        load_config(None, ["train.global_batch_tokens=1000", "model.seq_len=256"])  # refused with the config
    with pytest.raises(ConfigError, match="train.strategy"):
        load_config(None, ["train.strategy=zero3"])


def test_loss_curve_plot_uses_the_last_value_of_redone_steps(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from raylm.train.launch import plot_loss_curve

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("plot")).info.run_id
    points = [Metric("step_loss", 5.0 - 0.1 * s, 1000 + s, s) for s in range(1, 11)]
    points += [Metric("step_loss", 9.0, 2000 + s, s) for s in (9, 10)]  # redone after a restart
    points += [Metric("val_loss", 4.5, 1005, 5), Metric("val_loss", 4.2, 2010, 10)]
    client.log_batch(run_id, metrics=points)
    figure = plot_loss_curve(uri, run_id)
    train_line, val_line = figure.axes[0].get_lines()
    assert list(train_line.get_xdata()) == list(range(1, 11)) and list(train_line.get_ydata())[-2:] == [9.0, 9.0]
    assert list(val_line.get_xdata()) == [5, 10]
    assert plot_loss_curve(uri, client.create_run(client.get_experiment_by_name("plot").experiment_id).info.run_id) is None


def test_resume_picks_the_most_recently_written_pretrain_run_and_reopens_it(tmp_path):
    from raylm.train.launch import RUN_NAME, latest_run_stage
    from raylm.workspace import SUCCESS_MARKER, Workspace

    workspace = Workspace(str(tmp_path))
    planned = workspace.stage("pretrain", {"train": {"max_steps": 50}})
    for key, stamp in (("older", 1_000_000_000), ("newer", 2_000_000_000)):
        run = tmp_path / "pretrain" / key / RUN_NAME
        run.mkdir(parents=True)
        (tmp_path / "pretrain" / key / SUCCESS_MARKER).write_text("done\n")
        os.utime(run, (stamp, stamp))
    stage = latest_run_stage(workspace, planned)
    assert stage.key == "newer" and not stage.is_complete()
    assert (tmp_path / "pretrain" / "older" / SUCCESS_MARKER).exists()
    with pytest.raises(FileNotFoundError, match="--resume: no pretrain run"):
        latest_run_stage(Workspace(str(tmp_path / "empty")), planned)


def test_failure_detection_settings_reach_ray_train_and_an_elastic_run_gives_up_on_a_lost_size_sooner():
    """Measured in test_train_elastic's scenario: 71 s to continue on 1 worker after a node loss with Ray's
    defaults (2 s polls, 60 s start timeout), 25 s with these."""
    from raylm.config import TrainConfig
    from raylm.train.launch import ray_train_env

    assert ray_train_env(TrainConfig()) == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}  # fixed size: Ray's 60 s
    elastic = ray_train_env(TrainConfig(workers=(1, 2)))
    assert elastic == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15.0"}
    chosen = ray_train_env(TrainConfig(workers=2, health_check_interval_s=0.5, worker_group_start_timeout_s=300))
    assert chosen["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "300.0"
    with pytest.raises(ConfigError, match="train.worker_group_start_timeout_s"):
        load_config(None, ["train.worker_group_start_timeout_s=0"])


def test_failure_detection_settings_at_their_defaults_leave_stage_hashes_alone(tmp_path):
    """Finished pretrain stages of earlier versions stay reusable; setting a key is a new stage."""
    from raylm.stage_plan import plan_stages
    from raylm.workspace import Workspace

    def pretrain_key(*overrides: str) -> str:
        config = load_config(None, list(overrides), str(tmp_path))
        return plan_stages(config, Workspace(str(tmp_path))).pretrain.key

    assert "health_check_interval_s" not in load_config(None, [], str(tmp_path)).section("train")
    assert pretrain_key() == pretrain_key("train.health_check_interval_s=1.0")
    assert pretrain_key() != pretrain_key("train.worker_group_start_timeout_s=30")


def test_a_fixed_size_run_after_an_elastic_one_in_one_process_gets_rays_start_timeout_back(monkeypatch):
    """build_trainer sets these in os.environ; an elastic run's 15 s must not outlive it."""
    import raylm.train.launch as launch
    from raylm.config import TrainConfig

    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    monkeypatch.setitem(launch._USER_RAY_TRAIN_ENV, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", None)
    launch.apply_ray_train_env(TrainConfig(workers=(1, 2)))
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "15.0"
    launch.apply_ray_train_env(TrainConfig(workers=2))
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" not in os.environ
    monkeypatch.setitem(launch._USER_RAY_TRAIN_ENV, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    launch.apply_ray_train_env(TrainConfig(workers=2))
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "120"  # the user's own setting stands


# ------------------------------------------------------------------------------------------------
# Worker resources (raylm.train.resources): CPUs per worker and torch threads, without Ray


def _train(**kwargs):
    from raylm.config import TrainConfig

    return TrainConfig(use_gpu=False, **kwargs)


def test_cpu_workers_share_the_free_cpus_and_threads_follow():
    from raylm.train.resources import NodeResources, resolve_worker_resources

    one_node = [NodeResources(cpus=8)]
    alone = resolve_worker_resources(_train(workers=1), one_node, free_cpus=8)
    assert (alone.cpus_per_worker, alone.torch_threads, alone.chosen_by) == (8, 8, "cluster")
    assert alone.ray_resources() == {"CPU": 8}
    assert resolve_worker_resources(_train(workers=3), one_node, free_cpus=8).cpus_per_worker == 2
    # elastic: the share of the max group, so that it can grow on the same nodes
    assert resolve_worker_resources(_train(workers=(1, 4)), one_node, free_cpus=8).cpus_per_worker == 2
    # what other work holds is not taken
    assert resolve_worker_resources(_train(workers=1), one_node, free_cpus=3).cpus_per_worker == 3
    # more workers than CPUs: an equal fraction, one thread each (used to wait for ever on 1 CPU each)
    crowded = resolve_worker_resources(_train(workers=3, global_batch_size=16), [NodeResources(cpus=2)], free_cpus=2)
    assert (crowded.cpus_per_worker, crowded.torch_threads) == (0.66, 1)
    # Tune: concurrent trials split the CPUs
    assert resolve_worker_resources(_train(workers=1), one_node, free_cpus=8, concurrent_runs=2).cpus_per_worker == 4


def test_no_worker_is_asked_for_more_cpus_than_a_node_has():
    from raylm.train.resources import NodeResources, resolve_worker_resources

    nodes = [NodeResources(cpus=4), NodeResources(cpus=4)]
    assert resolve_worker_resources(_train(workers=1), nodes, free_cpus=8).cpus_per_worker == 4
    assert resolve_worker_resources(_train(workers=3), nodes, free_cpus=8).cpus_per_worker == 2
    uneven = [NodeResources(cpus=6), NodeResources(cpus=2)]
    assert resolve_worker_resources(_train(workers=2), uneven, free_cpus=8).cpus_per_worker == 3


def test_gpu_workers_take_their_node_cpus_split_among_its_gpus():
    from raylm.config import TrainConfig
    from raylm.train.resources import NodeResources, resolve_worker_resources

    nodes = [NodeResources(cpus=0), NodeResources(cpus=32, gpus=4), NodeResources(cpus=16, gpus=4)]
    resources = resolve_worker_resources(TrainConfig(workers=4), nodes, free_cpus=48)
    assert (resources.use_gpu, resources.cpus_per_worker, resources.torch_threads) == (True, 4, 4)
    # a GPU cluster whose GPU nodes are not up yet (an autoscaler adds them): Ray's defaults
    waiting = resolve_worker_resources(TrainConfig(workers=2, use_gpu=True), [NodeResources(cpus=0)], free_cpus=0,
                                       fixed=False)
    assert waiting.chosen_by == "ray" and waiting.ray_resources() is None


def test_a_set_cpus_per_worker_is_kept_and_checked_on_a_fixed_cluster():
    from raylm.train.resources import NodeResources, resolve_worker_resources

    node = [NodeResources(cpus=2)]
    half = resolve_worker_resources(_train(workers=3, cpus_per_worker=0.5), node, free_cpus=2)
    assert (half.cpus_per_worker, half.torch_threads, half.chosen_by) == (0.5, 1, "train.cpus_per_worker")
    with pytest.raises(ConfigError, match=r"train.cpus_per_worker = 4: no node of the Ray cluster has that many"):
        resolve_worker_resources(_train(cpus_per_worker=4), node, free_cpus=2)
    with pytest.raises(ConfigError, match=r"train.cpus_per_worker = 2 with train.workers = 2: .* holds 1"):
        resolve_worker_resources(_train(workers=2, cpus_per_worker=2), node, free_cpus=2)
    # a cluster that may grow is not second-guessed
    assert resolve_worker_resources(_train(cpus_per_worker=4), node, free_cpus=2, fixed=False).cpus_per_worker == 4


def test_step_zero_validation_only_when_asked_and_always_for_fine_tuning():
    from raylm.config import FinetuneConfig, TrainConfig, section_data
    from raylm.finetune.stage import finetune_train_config

    assert TrainConfig().eval_at_start is False
    assert "eval_at_start" not in section_data(TrainConfig())  # at its default it moves no stage hash
    assert finetune_train_config(TrainConfig(), FinetuneConfig()).eval_at_start  # val_loss_before
