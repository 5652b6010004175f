"""Next-token loss over packed sequences, and the sums that make bits-per-byte exact.

A packed row holds `seq_len + 1` tokens: inputs are `row[:-1]`, targets `row[1:]`. Targets equal to
the pad id are ignored. For bits-per-byte, only targets that stand for text bytes count (special
tokens have zero bytes), so the figure does not depend on the tokenizer's vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raylm.model.config import SEQ2SEQ_OBJECTIVES
from raylm.model.span_corruption import span_corrupt


def split_inputs_targets(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[:, :-1], rows[:, 1:]


def summed_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL over non-pad targets, number of those targets)."""
    flat_targets = targets.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_targets, ignore_index=pad_id, reduction="sum")
    return loss, (flat_targets != pad_id).sum()


@torch.no_grad()
def loss_and_bytes(logits: torch.Tensor, targets: torch.Tensor, pad_id: int,
                   token_bytes: torch.Tensor) -> tuple[float, int, float, int]:
    """(NLL sum, target count, NLL sum over byte-bearing targets, their bytes) for one batch."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=pad_id, reduction="none")
    flat = targets.reshape(-1)
    valid = flat != pad_id
    nbytes = token_bytes[flat]
    with_bytes = nbytes > 0
    return (float(nll[valid].sum()), int(valid.sum()), float(nll[with_bytes].sum()), int(nbytes.sum()))


def bits_per_byte(nll_sum_nats: float, n_bytes: int) -> float:
    return nll_sum_nats / (math.log(2) * n_bytes) if n_bytes else math.nan


def seq2seq_split(rows: torch.Tensor, source_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix-to-continuation over packed rows of seq_len + 1 tokens: (source, decoder inputs, targets).
    The source is `rows[:, :source_len]`; the decoder predicts `rows[:, source_len:]`, reading the
    target shifted right by one with the source's last token as its start token."""
    return rows[:, :source_len], rows[:, source_len - 1:-1], rows[:, source_len:]


def lm_batch(rows: torch.Tensor, config, loss_mask: torch.Tensor | None = None, ignore_id: int = -100,
             objective: str | None = None, seeds=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(keyword inputs of the model's forward, targets) for a batch of packed rows, for either
    architecture: `logits = model(**inputs)`, then `summed_loss(logits, targets, ignore_id)`.
    `loss_mask` (aligned with the full rows; 1 = train on this token) sets the other targets to `ignore_id`.

    The encoder-decoder's objective is `objective`, else `config.seq2seq_objective`: `prefix`
    (`seq2seq_split`) or `span_corruption` (span_corruption.py; `seeds`, one per row, fix where the
    spans fall; default 0..batch-1). Evaluation passes `objective="prefix"`: bits-per-byte needs every
    target to be the next text token, and the prefix figure compares with the decoder's and across runs."""
    objective = objective or getattr(config, "seq2seq_objective", "prefix")
    if getattr(config, "arch", "decoder") == "encoder-decoder" and objective == "span_corruption":
        corrupted = span_corrupt(rows, config.vocab_size, config.noise_density, config.mean_span_length, seeds)
        targets = corrupted.targets
        if loss_mask is not None:  # a sentinel counts when its span's first token does
            targets = targets.masked_fill(loss_mask.gather(1, corrupted.target_positions) != 1, ignore_id)
        return {"source": corrupted.source, "tokens": corrupted.decoder_inputs}, targets
    if objective not in SEQ2SEQ_OBJECTIVES:
        raise ValueError(f"model.seq2seq_objective = {objective!r}: expected one of {', '.join(SEQ2SEQ_OBJECTIVES)}")
    if getattr(config, "arch", "decoder") == "encoder-decoder":
        start = config.source_len
        source, tokens, targets = seq2seq_split(rows, start)
        inputs = {"source": source, "tokens": tokens}
    else:
        start = 1
        tokens, targets = split_inputs_targets(rows)
        inputs = {"tokens": tokens}
    if loss_mask is not None:
        targets = targets.masked_fill(loss_mask[:, start:] != 1, ignore_id)
    return inputs, targets
