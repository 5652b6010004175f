"""Held-out loss and bits-per-byte of a checkpoint on packed sequences.

Bits-per-byte divides the summed next-token loss (in bits) by the bytes of text the target tokens
stand for, so models with different tokenizers can be compared. An encoder-decoder is measured on the
prefix objective whatever it trained on (`model.seq2seq_objective`): span corruption's targets are
sentinels and isolated spans, not the next text token, so their loss is not a bits-per-byte figure. The computation runs in a Ray task,
next to the data, and returns three numbers.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from raylm.artifacts import Evaluated, Packed, Pretrained
from raylm.data.tokenizer import token_byte_lengths, tokenizer_from_json
from raylm.model.loss import bits_per_byte, lm_batch, loss_and_bytes
from raylm.train.checkpoint import load_model, load_model_config, load_tokenizer_json, local_checkpoint
from raylm.train.data import PackedSequences


@torch.no_grad()
def evaluate_bpb(checkpoint: str, data_uri: str, pad_id: int, batch_size: int = 16,
                 limit: int | None = None) -> dict[str, float]:
    with local_checkpoint(checkpoint) as directory:
        model = load_model(directory)
        model_config = load_model_config(directory)
        tokenizer_json = load_tokenizer_json(directory)
    if tokenizer_json is None:
        raise FileNotFoundError(f"checkpoint {checkpoint} has no tokenizer.json")
    token_bytes = torch.from_numpy(token_byte_lengths(tokenizer_from_json(tokenizer_json)))
    data = PackedSequences(data_uri)
    sequences = len(data) if limit is None else min(limit, len(data))
    nll = count = nll_bytes = n_bytes = 0.0
    for start in range(0, sequences, batch_size):
        rows, _ = data.take(np.arange(start, min(start + batch_size, sequences)))
        inputs, targets = lm_batch(torch.from_numpy(rows).long(), model_config, ignore_id=pad_id, objective="prefix")
        a, b, c, d = loss_and_bytes(model(**inputs), targets, pad_id, token_bytes)
        nll, count, nll_bytes, n_bytes = nll + a, count + b, nll_bytes + c, n_bytes + d
    return {"val_loss": nll / max(count, 1), "val_bpb": bits_per_byte(nll_bytes, int(n_bytes)),
            "val_tokens": count, "val_bytes": n_bytes, "val_sequences": sequences}


def evaluate_stage(trained: Pretrained, packed: Packed, batch_size: int, limit: int | None) -> Evaluated:
    task = ray.remote(num_cpus=1)(evaluate_bpb)
    val_uri = packed.require_val("raise data.val_fraction or add data")
    figures = ray.get(task.remote(trained.checkpoint, val_uri, packed.tokenizer.pad_id, batch_size, limit))
    return Evaluated(checkpoint=trained.checkpoint, metrics=figures)
