"""Greedy, batched text generation for lm-eval's `generate_until`, cut at stop sequences.

Requests are sorted by context length (longest first) and decoded in batches; a row stops when its
text contains one of its stop sequences, or after its `max_gen_toks`; the batch stops when every row
has. The context is left-truncated so that context plus generation fit the model's context length,
as lm-eval's `hf` model does. Decoding steps go through the model's KV cache when
`raylm.model.generate` provides one; otherwise every step recomputes the (right-padded, causal)
batch, which gives the same tokens, more slowly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from raylm.eval.lm import RaylmLM


def cut_at_stop(text: str, until: list[str]) -> tuple[str, bool]:
    """The text before the earliest stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(stop) for stop in until if stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def _greedy_recompute(lm: "RaylmLM", contexts: list[list[int]], budgets: list[int],
                      until: list[list[str]]) -> list[list[int]]:
    rows = [list(c) for c in contexts]
    generated: list[list[int]] = [[] for _ in rows]
    done = [budget <= 0 for budget in budgets]
    while not all(done):
        live = [i for i, d in enumerate(done) if not d]
        width = max(len(rows[i]) for i in live)
        batch = torch.full((len(live), width), lm.eot_token_id, dtype=torch.long)
        for j, i in enumerate(live):
            batch[j, :len(rows[i])] = torch.tensor(rows[i])
        logits = lm.model(batch.to(lm.device_))
        for j, i in enumerate(live):
            token = int(logits[j, len(rows[i]) - 1].argmax())
            rows[i].append(token)
            generated[i].append(token)
            if (len(generated[i]) >= budgets[i] or len(rows[i]) >= lm.max_length
                    or cut_at_stop(lm.tok_decode(generated[i]), until[i])[1]):
                done[i] = True
    return generated


def _greedy_cached(lm: "RaylmLM", contexts: list[list[int]], budgets: list[int],
                   until: list[list[str]]) -> list[list[int]] | None:
    """Decode with the model's KV cache (raylm.model.generate), when that module provides it."""
    try:
        from raylm.model import generate as model_generate
    except ImportError:
        return None
    greedy = getattr(model_generate, "generate_tokens", None)
    if greedy is None:
        return None
    stop = [lambda ids, u=u: cut_at_stop(lm.tok_decode(ids), u)[1] for u in until]
    return greedy(lm.model, contexts, max_new_tokens=budgets, stop=stop, pad_id=lm.eot_token_id)


def plan_generation(lm: "RaylmLM", jobs: list[tuple[str, list[str], int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Each job's (left-truncated) context ids, and batches of job indices, longest contexts first."""
    encoded = []
    for context, _, max_new in jobs:
        room = max(1, lm.max_length - max_new)
        encoded.append(lm.tok_encode(context)[-room:] or [lm.prefix_token_id])
    order = sorted(range(len(jobs)), key=lambda i: -len(encoded[i]))
    return encoded, [order[s:s + lm.batch_size] for s in range(0, len(order), lm.batch_size)]


def run_generation(lm: "RaylmLM", jobs: list[tuple[str, list[str], int]], encoded: list[list[int]],
                   batches: list[list[int]]) -> dict[int, str]:
    outputs: dict[int, str] = {}
    for chunk in batches:
        contexts = [encoded[i] for i in chunk]
        budgets = [min(jobs[i][2], lm.max_length - len(encoded[i])) for i in chunk]
        until = [jobs[i][1] + [lm.tok_decode([lm.eot_token_id])] for i in chunk]  # like lm-eval's hf model
        generated = _greedy_cached(lm, contexts, budgets, until)
        if generated is None:
            generated = _greedy_recompute(lm, contexts, budgets, until)
        for i, stops, tokens in zip(chunk, until, generated):
            outputs[i] = cut_at_stop(lm.tok_decode(tokens), stops)[0]
    return outputs


def generate_texts(lm: "RaylmLM", jobs: list[tuple[str, list[str], int]]) -> list[str]:
    """jobs: (context, stop sequences, max new tokens) -> generated text, cut at the first stop."""
    encoded, batches = plan_generation(lm, jobs)
    outputs = run_generation(lm, jobs, encoded, batches)
    return [outputs[i] for i in range(len(jobs))]
