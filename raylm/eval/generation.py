"""Greedy, batched text generation for lm-eval's `generate_until`, cut at stop sequences.

Requests are sorted by context length (longest first) and decoded in batches; a row stops when its
text contains one of its stop sequences, or after its `max_gen_toks`; the batch stops when every row
has. The context is left-truncated so that context plus generation fit the model's context length,
as lm-eval's `hf` model does. Decoding steps go through the model's KV cache
(`raylm.model.generate.generate_tokens`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from raylm.model.generate import generate_tokens


class GeneratingLM(Protocol):
    """What generation needs of an lm-eval model (raylm.eval.lm.RaylmLM has it)."""

    model: torch.nn.Module
    device_: torch.device
    eot_token_id: int
    prefix_token_id: int
    max_length: int
    batch_size: int

    def tok_encode(self, text: str) -> list[int]: ...

    def tok_decode(self, tokens: list[int]) -> str: ...


def cut_at_stop(text: str, until: list[str]) -> tuple[str, bool]:
    """The text before the earliest stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(stop) for stop in until if stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _greedy_cached(lm: GeneratingLM, contexts: list[list[int]], budgets: list[int],
                   until: list[list[str]]) -> list[list[int]]:
    """Decode with the model's KV cache (raylm.model.generate)."""
    stop = [lambda ids, u=u: cut_at_stop(lm.tok_decode(ids), u)[1] for u in until]
    return generate_tokens(lm.model, contexts, max_new_tokens=budgets, stop=stop, pad_id=lm.eot_token_id)


def plan_generation(lm: GeneratingLM, jobs: list[tuple[str, list[str], int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Each job's (left-truncated) context ids, and batches of job indices, longest contexts first."""
    encoded = []
    for context, _, max_new in jobs:
        room = max(1, lm.max_length - max_new)
        encoded.append(lm.tok_encode(context)[-room:] or [lm.prefix_token_id])
    order = sorted(range(len(jobs)), key=lambda i: -len(encoded[i]))
    return encoded, [order[s:s + lm.batch_size] for s in range(0, len(order), lm.batch_size)]


def run_generation(lm: GeneratingLM, jobs: list[tuple[str, list[str], int]], encoded: list[list[int]],
                   batches: list[list[int]]) -> dict[int, str]:
    outputs: dict[int, str] = {}
    for chunk in batches:
        contexts = [encoded[i] for i in chunk]
        budgets = [min(jobs[i][2], lm.max_length - len(encoded[i])) for i in chunk]
        until = [jobs[i][1] + [lm.tok_decode([lm.eot_token_id])] for i in chunk]  # like lm-eval's hf model
        generated = _greedy_cached(lm, contexts, budgets, until)
        for i, stops, tokens in zip(chunk, until, generated):
            outputs[i] = cut_at_stop(lm.tok_decode(tokens), stops)[0]
    return outputs


def generate_texts(lm: GeneratingLM, jobs: list[tuple[str, list[str], int]]) -> list[str]:
    """jobs: (context, stop sequences, max new tokens) -> generated text, cut at the first stop."""
    encoded, batches = plan_generation(lm, jobs)
    outputs = run_generation(lm, jobs, encoded, batches)
    return [outputs[i] for i in range(len(jobs))]
