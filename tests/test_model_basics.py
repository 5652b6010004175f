"""The decoder: shapes, causality, tied weights, and that it can learn."""

from __future__ import annotations

import pytest
import torch

from raylm.model import Transformer, TransformerConfig
from raylm.model.loss import bits_per_byte, loss_and_bytes, summed_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, seq_len=16, **overrides))


def test_logits_shape_and_length_limit():
    model = tiny()
    assert model(torch.randint(0, 97, (3, 16))).shape == (3, 16, 97)
    with pytest.raises(ValueError, match="longer than the model's seq_len"):
        model(torch.randint(0, 97, (1, 17)))


def test_causality():
    model = tiny().eval()
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(tokens)[:, :9], model(changed)[:, :9], atol=1e-6)
        assert not torch.allclose(model(tokens)[:, 9:], model(changed)[:, 9:])


def test_tied_embeddings_share_storage():
    model = tiny()
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    untied = tiny(tie_embeddings=False)
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_config_round_trip_refuses_unknown_keys():
    config = TransformerConfig(vocab_size=10)
    assert TransformerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        TransformerConfig.from_dict({"vocab_size": 10, "colour": "red"})


def test_overfits_a_batch():
    model = tiny()
    batch = torch.randint(0, 97, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss, count = summed_loss(model(batch[:, :-1]), batch[:, 1:], pad_id=-1)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach() / count))
    assert losses[-1] < 0.2 * losses[0]


def test_loss_and_bytes_ignores_pad_and_zero_byte_targets():
    logits = torch.zeros(1, 4, 5)
    targets = torch.tensor([[1, 2, 4, 3]])  # 4 is pad, 3 is a special (0 bytes)
    token_bytes = torch.tensor([1, 2, 3, 0, 0])
    nll, count, nll_bytes, n_bytes = loss_and_bytes(logits, targets, pad_id=4, token_bytes=token_bytes)
    uniform = torch.log(torch.tensor(5.0)).item()
    assert count == 3 and nll == pytest.approx(3 * uniform)
    assert n_bytes == 5 and nll_bytes == pytest.approx(2 * uniform)
    assert bits_per_byte(nll_bytes, n_bytes) == pytest.approx(2 * uniform / (5 * torch.log(torch.tensor(2.0)).item()))


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_formula_matches_the_module(tie):
    from raylm.model.sizing import flops_per_token, parameter_count

    config = TransformerConfig(vocab_size=101, d_model=48, n_layers=3, n_heads=4, seq_len=32, tie_embeddings=tie)
    model = Transformer(config)
    assert parameter_count(config).total == model.num_parameters()
    matmuls = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops_per_token(config) == 6 * matmuls + 12 * 3 * 32 * 48
