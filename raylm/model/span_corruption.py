"""T5's span corruption over packed rows: plain torch, deterministic per row, no Ray.

Every packed row of `L = seq_len + 1` tokens loses `noise` tokens in `spans` spans (`span_counts`:
`noise = round(L * noise_density)`, `spans = round(noise / mean_span_length)`, the same for every row,
so a batch stacks without padding). Where the spans fall and how long each is are random per row:
the dropped tokens are cut into `spans` non-empty pieces, the kept ones into `spans + 1` pieces (the
first and last may be empty), uniformly, and the two interleave (kept, dropped, kept, ..., kept).

- source: the row with each dropped span replaced by one sentinel (`L - noise + spans` tokens);
- targets: each sentinel followed by the span it stands for (`noise + spans` tokens);
- decoder inputs: the targets shifted right by one, starting from the source's last token, as the
  prefix objective does and as `generate` starts the decoder.

Sentinels are the top ids of the model's vocabulary, as T5's extra ids: the i-th span of a row is
marked by `vocab_size - 1 - i`. The trainer reserves them by making the model's vocabulary the
tokenizer's plus `config.span_sentinels` (`TransformerConfig.for_tokenizer`), so the tokenizer
never produces them; rows holding a token at a sentinel id are refused.

A row's corruption depends only on its seed: the trainer seeds each row from (train.seed, the row's
position in the data stream), so a resumed run, or the same run on another number of workers,
corrupts every row exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from raylm.model.config import span_counts


@dataclass
class SpanCorruption:
    source: torch.Tensor  # [batch, L - noise + spans]
    decoder_inputs: torch.Tensor  # [batch, noise + spans]
    targets: torch.Tensor  # [batch, noise + spans]: sentinel, span, sentinel, span, ...
    target_positions: torch.Tensor  # [batch, noise + spans]: each target's position in the row (a sentinel: its span's first)


def row_seeds(seed: int, positions: Sequence[int]) -> list[int]:
    """One seed per row from the run's seed and each row's position in the data stream."""
    return [(int(seed) * 1_000_003 + int(p)) % 2 ** 63 for p in positions]


def _random_parts(total: int, parts: int, generator: torch.Generator) -> torch.Tensor:
    """`total` split into `parts` positive integers, uniformly over all such splits."""
    cuts = (torch.randperm(total - 1, generator=generator)[:parts - 1] + 1).sort().values
    return torch.diff(torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([total])]))


def segment_ids(row_len: int, noise: int, spans: int, generator: torch.Generator) -> torch.Tensor:
    """[row_len] segment index of each position: even = kept, odd = dropped span (2 i + 1 for span i)."""
    dropped = _random_parts(noise, spans, generator)
    kept = _random_parts(row_len - noise + 2, spans + 1, generator)  # first and last may be empty
    kept[0] -= 1
    kept[-1] -= 1
    lengths = torch.cat([torch.stack([kept[:-1], dropped], 1).reshape(-1), kept[-1:]])
    return torch.repeat_interleave(torch.arange(2 * spans + 1), lengths)


def span_corrupt(rows: torch.Tensor, vocab_size: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                 seeds: Sequence[int] | None = None) -> SpanCorruption:
    """Span-corrupt packed rows [batch, L]; `seeds` (one per row, default 0..batch-1) fix where the spans fall."""
    batch, row_len = rows.shape
    noise, spans = span_counts(row_len, noise_density, mean_span_length)
    if row_len - noise < spans - 1:
        raise ValueError(f"model.noise_density = {noise_density}: {noise} of {row_len} tokens in {spans} spans "
                         "leaves too few kept tokens to separate the spans")
    first_sentinel = vocab_size - spans
    if first_sentinel <= 0 or (batch and int(rows.max()) >= first_sentinel):
        raise ValueError(f"model.vocab_size = {vocab_size} cannot hold the {spans} sentinel ids of "
                         f"model.seq2seq_objective = 'span_corruption' (ids {max(first_sentinel, 0)}..{vocab_size - 1}) "
                         f"apart from the data's tokens (largest id {int(rows.max()) if batch else None}): the "
                         "model's vocabulary must be the tokenizer's plus model.span_sentinels")
    seeds = list(range(batch)) if seeds is None else list(seeds)
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} rows")
    segments = torch.stack([segment_ids(row_len, noise, spans, torch.Generator().manual_seed(int(s)))
                            for s in seeds]).to(rows.device) if batch else torch.zeros(0, row_len, dtype=torch.long)
    dropped = segments % 2 == 1
    starts = dropped & torch.cat([torch.ones_like(dropped[:, :1]), segments[:, 1:] != segments[:, :-1]], 1)
    sentinels = vocab_size - 1 - segments // 2
    # Slot 0 of each position is a sentinel (kept where a span starts), slot 1 the token itself;
    # selecting slots in row-major order keeps everything in row order.
    pairs = torch.stack([sentinels, rows], -1)
    positions = torch.arange(row_len, device=rows.device).expand(batch, row_len)
    source = pairs[torch.stack([starts, ~dropped], -1)].view(batch, row_len - noise + spans)
    in_target = torch.stack([starts, dropped], -1)
    targets = pairs[in_target].view(batch, noise + spans)
    target_positions = torch.stack([positions, positions], -1)[in_target].view(batch, noise + spans)
    decoder_inputs = torch.cat([source[:, -1:], targets[:, :-1]], 1)
    return SpanCorruption(source, decoder_inputs, targets, target_positions)


def restore_rows(source: torch.Tensor, targets: torch.Tensor, vocab_size: int, spans: int) -> torch.Tensor:
    """The inverse of `span_corrupt`: each sentinel in the source replaced by its span from the targets."""
    first_sentinel = vocab_size - spans
    restored = []
    for src, tgt in zip(source.tolist(), targets.tolist()):
        filled, current = {}, None
        for token in tgt:
            if token >= first_sentinel:
                current = filled.setdefault(token, [])
            else:
                current.append(token)
        restored.append([t for token in src for t in (filled[token] if token >= first_sentinel else [token])])
    return torch.tensor(restored, dtype=source.dtype)
