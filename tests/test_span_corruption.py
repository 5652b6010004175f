"""Span corruption (T5) as the encoder-decoder's second sequence-to-sequence objective: the corruption
is invertible, keeps its density and span lengths, is deterministic per row seed, refuses a vocabulary
without room for its sentinels, and trains a tiny encoder-decoder."""

from __future__ import annotations

import pytest
import torch

from raylm.model import TransformerConfig, build_model
from raylm.model.config import span_counts
from raylm.model.loss import lm_batch, summed_loss
from raylm.model.span_corruption import restore_rows, row_seeds, segment_ids, span_corrupt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


BASE = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, seq_len=24, arch="encoder-decoder",
            seq2seq_objective="span_corruption")


@pytest.mark.parametrize("row_len, density, mean", [(25, 0.15, 3.0), (65, 0.15, 3.0), (257, 0.3, 2.0), (40, 0.5, 8.0)])
def test_source_and_targets_rebuild_the_row_exactly(row_len, density, mean):
    vocab = 1000
    noise, spans = span_counts(row_len, density, mean)
    rows = torch.randint(0, vocab - spans, (16, row_len), generator=torch.Generator().manual_seed(row_len))
    out = span_corrupt(rows, vocab, density, mean, seeds=range(100, 116))
    assert out.source.shape == (16, row_len - noise + spans) and out.targets.shape == (16, noise + spans)
    assert torch.equal(restore_rows(out.source, out.targets, vocab, spans), rows)
    sentinels = torch.arange(vocab - 1, vocab - 1 - spans, -1)
    for source, targets in zip(out.source, out.targets):  # sentinels in order, once each, in both
        assert torch.equal(source[source >= vocab - spans], sentinels)
        assert torch.equal(targets[targets >= vocab - spans], sentinels)
    assert torch.equal(out.targets[:, 0], torch.full((16,), vocab - 1))  # targets open with the first sentinel
    assert torch.equal(out.decoder_inputs, torch.cat([out.source[:, -1:], out.targets[:, :-1]], 1))
    kept = out.target_positions[out.targets < vocab - spans]
    assert torch.equal(rows.gather(1, out.target_positions)[out.targets < vocab - spans],
                       out.targets[out.targets < vocab - spans]) and len(kept) == 16 * noise


def test_noise_density_and_span_lengths_hold_on_average():
    row_len, density, mean = 257, 0.15, 3.0
    noise, spans = span_counts(row_len, density, mean)
    lengths, first_dropped, last_dropped, dropped = [], 0, 0, torch.zeros(row_len)
    for seed in range(300):
        segments = segment_ids(row_len, noise, spans, torch.Generator().manual_seed(seed))
        is_dropped = segments % 2 == 1
        assert int(is_dropped.sum()) == noise
        lengths += torch.bincount(segments[is_dropped])[1::2].tolist()
        first_dropped += int(is_dropped[0])
        last_dropped += int(is_dropped[-1])
        dropped += is_dropped
    assert abs(noise / row_len - density) < 0.005
    assert len(lengths) == 300 * spans and sum(lengths) / len(lengths) == pytest.approx(mean, abs=0.05)
    assert min(lengths) == 1 and max(lengths) >= 3 * mean  # lengths vary around the mean
    # Spans fall anywhere: unlike T5 (never the first token, always the last), either end may be dropped
    # (less often than a middle token: a span must start or end exactly there).
    assert 0.02 < first_dropped / 300 < 0.2 and 0.02 < last_dropped / 300 < 0.2
    assert 0.08 < float(dropped[1:-1].mean()) / 300 < 0.22


def test_corruption_is_fixed_by_each_rows_seed():
    rows = torch.randint(0, 900, (4, 65))
    first = span_corrupt(rows, 1000, seeds=[1, 2, 3, 4])
    again = span_corrupt(rows, 1000, seeds=[1, 2, 3, 4])
    assert all(torch.equal(a, b) for a, b in zip(vars(first).values(), vars(again).values()))
    other = span_corrupt(rows, 1000, seeds=[5, 6, 7, 8])
    assert not torch.equal(first.source, other.source)
    alone = span_corrupt(rows[2:3], 1000, seeds=[3])  # a row's corruption does not depend on its batch
    assert torch.equal(alone.source[0], first.source[2]) and torch.equal(alone.targets[0], first.targets[2])
    # The trainer seeds each row from (train.seed, stream position): the same on 1 worker or 2.
    positions = range(40, 48)
    assert row_seeds(7, positions)[1::2] == row_seeds(7, positions[1::2]) and len(set(row_seeds(7, positions))) == 8
    assert row_seeds(7, positions) != row_seeds(8, positions)


def test_sentinels_are_refused_when_the_vocabulary_cannot_hold_them():
    config = TransformerConfig(**BASE)
    assert config.span_sentinels == span_counts(25, 0.15, 3.0)[1] == 1
    rows = torch.randint(0, 60, (2, 25))
    rows[1, 3] = 60  # the sentinel's id
    with pytest.raises(ValueError, match=r"model.vocab_size = 61 cannot hold the 1 sentinel ids .*ids 60..60"):
        lm_batch(rows, config)
    with pytest.raises(ValueError, match="model.vocab_size = 3 cannot hold the 4 sentinel"):
        TransformerConfig(**{**BASE, "vocab_size": 3, "seq_len": 64, "noise_density": 0.2})
    with pytest.raises(ValueError, match="model.seq2seq_objective = 'span_corruption' needs model.arch"):
        TransformerConfig(**{**BASE, "arch": "decoder"})
    with pytest.raises(ValueError, match="model.seq2seq_objective = 'mlm': expected one of prefix, span_corruption"):
        TransformerConfig(**{**BASE, "seq2seq_objective": "mlm"})
    with pytest.raises(ValueError, match="model.noise_density = 1.5"):
        TransformerConfig(**{**BASE, "noise_density": 1.5})
    with pytest.raises(ValueError, match="model.mean_span_length = 1.*must fit model.seq_len = 24"):
        TransformerConfig(**{**BASE, "mean_span_length": 1})  # a source as long as the row
    with pytest.raises(ValueError, match="needs model.arch = 'encoder-decoder'"):
        TransformerConfig(seq2seq_objective="span_corruption")
    with pytest.raises(ValueError, match="seq2seq_objective"):
        TransformerConfig(arch="encoder-decoder", seq2seq_objective="masked")
    with pytest.raises(ValueError, match="noise_density"):
        TransformerConfig(arch="encoder-decoder", seq2seq_objective="span_corruption", noise_density=0)


def test_the_trainer_reserves_the_sentinels_above_the_tokenizer():
    section = TransformerConfig(arch="encoder-decoder", seq2seq_objective="span_corruption", seq_len=64, d_model=32,
                          n_heads=2, n_layers=1)
    model = section.for_tokenizer(512)
    assert model.span_sentinels == 3 and model.vocab_size == 515
    assert TransformerConfig(arch="encoder-decoder", seq_len=64).for_tokenizer(512).vocab_size == 512
    with pytest.raises(ValueError, match="smaller than the tokenizer's 514 plus the 3 span-corruption sentinels"):
        model.for_tokenizer(514)


def test_loss_mask_and_prefix_evaluation_through_lm_batch():
    config = TransformerConfig(**{**BASE, "seq_len": 16, "noise_density": 0.3})  # rows of 17: 5 dropped, 2 spans
    rows = torch.arange(17)[None]
    inputs, targets = lm_batch(rows, config, seeds=[0])
    out = span_corrupt(rows, 61, 0.3, 3.0, seeds=[0])
    assert torch.equal(inputs["source"], out.source) and torch.equal(inputs["tokens"], out.decoder_inputs)
    assert torch.equal(targets, out.targets) and targets.shape == (1, 7)
    loss_mask = torch.ones(1, 17, dtype=torch.long)
    loss_mask[0, out.target_positions[0, 0]] = 0  # the first span's first token: it and its sentinel drop out
    masked = lm_batch(rows, config, loss_mask, ignore_id=-1, seeds=[0])[1]
    assert masked[0, :2].tolist() == [-1, -1] and torch.equal(masked[0, 2:], targets[0, 2:])
    inputs, targets = lm_batch(rows, config, objective="prefix")  # what evaluation (bits-per-byte) uses
    assert inputs["source"].tolist() == [list(range(8))] and targets.tolist() == [list(range(8, 17))]


def test_encoder_decoder_learns_under_span_corruption():
    torch.manual_seed(0)
    config = TransformerConfig(**{**BASE, "noise_density": 0.3})  # rows of 25: 8 dropped in 3 spans
    model = build_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(150):  # counting rows with a random start: a dropped span follows from its neighbours
        rows = (torch.randint(0, 50, (8, 1), generator=generator) + torch.arange(25)) % 50
        inputs, targets = lm_batch(rows, config, seeds=row_seeds(0, range(8 * step, 8 * step + 8)))
        loss, count = summed_loss(model(**inputs), targets, pad_id=-100)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss / count).item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5  # about 4.0 -> 1.9


def test_generation_never_emits_a_sentinel():
    """Sentinels mark dropped spans in training, not text: even a model that prefers them most is
    steered to the best text token."""
    from raylm.model.generate import generate

    config = TransformerConfig(**BASE)
    model = build_model(config)
    sentinels = config.span_sentinels
    assert sentinels > 0
    class Ones(torch.nn.Module):
        def forward(self, x):
            return torch.ones_like(x)

    model.norm = Ones()  # the head then reads a vector of ones: logit = the sum of its weight row
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[-sentinels:] = 1.0  # every sentinel scores above every text token
        model.head.weight[3] = 0.5  # the best text token
    out = generate(model, [[5, 6, 7]], max_new_tokens=4)
    assert out[0] == [3, 3, 3, 3]
