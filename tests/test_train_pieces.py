"""Training pieces without Ray: data order, worker partition, schedule, optimizer groups, checkpoints."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raylm.model import Transformer, TransformerConfig
from raylm.train.checkpoint import CheckpointError, load_model, load_training_state, save_checkpoint
from raylm.train.data import PackedSequences
from raylm.train.optim import build_optimizer, learning_rate, parameter_groups


@pytest.fixture()
def shards(tmp_path):
    rows = np.arange(50 * 5, dtype=np.int32).reshape(50, 5)
    folder = tmp_path / "train"
    folder.mkdir()
    for part in range(2):
        chunk = rows[part * 25:(part + 1) * 25]
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), 5)
        pq.write_table(pa.table({"tokens": tokens}), folder / f"part-{part}.parquet")
    return str(folder), rows


def test_reader_loads_all_rows(shards):
    folder, rows = shards
    data = PackedSequences(folder)
    assert len(data) == 50 and data.width == 5
    assert sorted(map(tuple, data.take(np.arange(50))[0].tolist())) == sorted(map(tuple, rows.tolist()))


def test_every_epoch_is_a_permutation_and_order_is_deterministic(shards):
    data = PackedSequences(shards[0])
    stream = data.order(np.arange(150), seed=3)
    for epoch in range(3):
        assert sorted(stream[epoch * 50:(epoch + 1) * 50]) == list(range(50))
    assert (stream == data.order(np.arange(150), seed=3)).all()
    assert not (stream == data.order(np.arange(150), seed=4)).all()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_workers_split_the_global_batch_exactly(shards, world):
    data = PackedSequences(shards[0])
    expected, _ = data.take(data.global_batch(position=40, batch_size=16, seed=0))
    parts = [data.worker_rows(40, 16, 0, rank, world) for rank in range(world)]
    assert sum(len(p) for p in parts) == 16
    assert sorted(map(tuple, np.concatenate(parts).tolist())) == sorted(map(tuple, expected.tolist()))


def test_schedule_warms_up_then_decays():
    lrs = [learning_rate(s, peak=1.0, warmup=10, total=100, min_ratio=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, seq_len=8))


def test_no_weight_decay_on_norms_and_embeddings():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.embed.weight for p in no_decay["params"])
    assert not any(p is model.embed.weight for p in decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()


def test_checkpoint_round_trip_without_a_process_group(tmp_path):
    model = tiny_model()
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    loss = model(torch.randint(0, 50, (2, 8))).sum()
    loss.backward()
    optimizer.step()
    save_checkpoint(str(tmp_path / "ckpt"), model, optimizer, {"step": 7}, model.config.to_dict(), '{"t": 1}', rank=0)

    restored = load_model(str(tmp_path / "ckpt"))
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name

    fresh = tiny_model(seed=1)
    fresh_optimizer = build_optimizer(fresh, 1e-3, 0.1, (0.9, 0.95))
    state = load_training_state(str(tmp_path / "ckpt"), fresh, fresh_optimizer, rank=0)
    assert state["step"] == 7
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match="incomplete: missing trainer_state.json"):
        load_model(str(tmp_path / "half"))
