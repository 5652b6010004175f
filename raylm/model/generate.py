"""Text generation for both architectures: greedy or sampled, batched, with a KV cache.

Prompts of different lengths are left-padded into one batch, with an attention mask that hides the
padding and position ids that start at each prompt's first real token, so a prompt continues the
same way alone or in a batch. Decoding picks the next token greedily (`temperature=0`) or samples
from the softmax at `temperature`, optionally restricted to the `top_k` tokens or the smallest set
whose probability reaches `top_p`. A sequence stops at `eos_id`, at any of `stop_sequences` (token
ids; neither is part of the output), after `max_new_tokens`, or when the context is full.

With `use_cache` the decoder keeps every layer's keys and values (`KVCache`) and feeds one new token
per step; the encoder-decoder also runs its encoder once and keeps the cross-attention keys and
values. Without it, each step recomputes everything (the baseline the cache is measured against).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the nucleus is already full
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [batch, longest], mask [batch, longest]) with each prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    return tokens, mask


def _ends_with_stop(generated: list[int], stops: Sequence[Sequence[int]]) -> int:
    """Length of the stop sequence the generated tokens end with, or 0."""
    for stop in stops:
        if stop and len(generated) >= len(stop) and generated[-len(stop):] == list(stop):
            return len(stop)
    return 0


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_sequences: Sequence[Sequence[int]] = (), eos_id: int | None = None, pad_id: int = 0,
             use_cache: bool = True, generator: torch.Generator | None = None,
             stop_when: Sequence[Callable[[list[int]], bool]] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (decoder: a continuation; encoder-decoder: the target for the
    prompt as source). `max_new_tokens` may differ per prompt; `stop_when[row](generated)` may end a
    row too (its tokens are kept, e.g. for a caller that cuts text at a stop string)."""
    batch = len(prompts)
    limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != batch:
        raise ValueError(f"{len(limits)} max_new_tokens values for {batch} prompts")
    was_training = model.training
    model.eval()
    encoder_decoder = getattr(model.config, "arch", "decoder") == "encoder-decoder"
    sentinels = getattr(model.config, "span_sentinels", 0)
    steps = (_encoder_decoder_steps if encoder_decoder else _decoder_steps)(model, prompts, pad_id, use_cache, limits)
    try:
        rooms = next(steps)
        limits = [min(limit, room) for limit, room in zip(limits, rooms)]
        generated: list[list[int]] = [[] for _ in range(batch)]
        done = [limit <= 0 for limit in limits]
        next_tokens = None
        while not all(done):
            logits = _without_sentinels(steps.send(next_tokens), sentinels)
            chosen = sample_next(logits, temperature, top_k, top_p, generator).tolist()
            was_done = list(done)
            for row, token in enumerate(chosen):
                if done[row]:
                    chosen[row] = pad_id
                    continue
                if eos_id is not None and token == eos_id:
                    done[row] = True
                    continue
                generated[row].append(token)
                cut = _ends_with_stop(generated[row], stop_sequences)
                if cut:
                    del generated[row][-cut:]
                done[row] = bool(cut) or len(generated[row]) >= limits[row] or bool(
                    stop_when is not None and stop_when[row](generated[row]))
            # A finished row goes on being fed padding (masked out, so its positions stop growing).
            next_tokens = (torch.tensor(chosen, dtype=torch.long), torch.tensor([not d for d in was_done], dtype=torch.long))
        return generated
    finally:
        steps.close()
        model.train(was_training)


def _without_sentinels(logits: torch.Tensor, sentinels: int) -> torch.Tensor:
    """A span-corruption model's sentinel ids (the top of its vocabulary) mark dropped spans in training;
    they are no text, so generation never picks them."""
    if not sentinels:
        return logits
    return torch.cat([logits[:, :-sentinels], logits.new_full((logits.shape[0], sentinels), float("-inf"))], dim=-1)


def generate_tokens(model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                    stop: Sequence[Callable[[list[int]], bool]] | None = None, pad_id: int = 0) -> list[list[int]]:
    """Greedy decoding with the KV cache, for evaluation harnesses: per-context budgets and stop
    predicates over the generated ids (the tokens that satisfied a predicate are kept)."""
    return generate(model, contexts, max_new_tokens, stop_when=stop, pad_id=pad_id)


def _decoder_steps(model: nn.Module, prompts, pad_id: int, use_cache: bool, limits: list[int]):
    """A coroutine: first yields each prompt's room left in the context, then takes each step's new
    tokens and which rows are still live (None first) and yields the last-position logits."""
    device = model.embed.weight.device
    seq_len = model.config.seq_len
    too_long = [len(p) for p in prompts if len(p) > seq_len]
    if too_long:
        raise ValueError(f"prompt of {too_long[0]} tokens is longer than the model's seq_len {seq_len}")
    tokens, mask = left_pad(prompts, pad_id, device)
    rooms = [seq_len - len(p) for p in prompts]
    width = tokens.shape[1] + max(min(limit, room) for limit, room in zip(limits, rooms))
    cache = model.new_cache(len(prompts), width) if use_cache else None
    new = yield rooms
    step_input = tokens
    while True:
        if new is not None:
            new, live = new[0].to(device)[:, None], new[1].to(device)[:, None]
            tokens = torch.cat([tokens, new], dim=1)
            mask = torch.cat([mask, live], dim=1)
            step_input = new
        padded = None if bool(mask.all()) else mask
        if use_cache:
            logits = model(step_input, attention_mask=padded, cache=cache)
        else:
            logits = model(tokens, attention_mask=padded)
        new = yield logits[:, -1]


def _encoder_decoder_steps(model: nn.Module, prompts, pad_id: int, use_cache: bool, limits: list[int]):
    device = model.embed.weight.device
    source, source_mask = left_pad(prompts, pad_id, device)
    if source.shape[1] > model.config.seq_len:
        raise ValueError(f"source of {source.shape[1]} tokens is longer than the model's seq_len {model.config.seq_len}")
    source_mask = None if bool(source_mask.all()) else source_mask
    tokens = source[:, -1:]  # the decoder starts from the source's last token, as in training
    cache = model.new_cache(len(prompts), model.config.seq_len) if use_cache else None
    memory = model.encode(source, source_mask) if use_cache else None
    new = yield [model.config.seq_len - 1] * len(prompts)
    step_input = tokens
    while True:
        if new is not None:
            new = new[0].to(device)[:, None]  # a finished row's extra tokens are never read
            tokens = torch.cat([tokens, new], dim=1)
            step_input = new
        if use_cache:
            logits = model.decode(step_input, memory, source_mask, cache=cache)
        else:
            logits = model(source, tokens, source_mask)
        new = yield logits[:, -1]


def generate_text(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
                  stop: Sequence[str] = (), **options) -> list[str]:
    """Prompts as text in, continuations as text out (a `tokenizers.Tokenizer`); the text is also cut
    at the first stop string, which token-level matching can miss across token boundaries."""
    eos_id = tokenizer.token_to_id("<|eos|>")
    pad_id = tokenizer.token_to_id("<|pad|>")
    encoded = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    stop_ids = [tokenizer.encode(s, add_special_tokens=False).ids for s in stop]
    outputs = generate(model, encoded, max_new_tokens, stop_sequences=stop_ids, eos_id=eos_id,
                       pad_id=0 if pad_id is None else pad_id, **options)
    texts = []
    for ids in outputs:
        text = tokenizer.decode(ids)
        for s in stop:
            if s and s in text:
                text = text[:text.index(s)]
        texts.append(text)
    return texts
