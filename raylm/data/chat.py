"""Instruction (chat) data: reading jsonl, the chat template, the loss mask, and whole-conversation packing.

Rows are in any layout of `raylm.data.chat_layouts` (messages, prompt/completion, prompt/response,
ShareGPT, Alpaca), read there into one list of {role, content} turns.
Roles: an optional `system` first, then `user` and `assistant` strictly alternating, starting with
`user` and ending with `assistant`. A row that breaks this is an error naming the file and line.

The template is built on the tokenizer's special tokens:

    <|bos|> <|system|> .. <|end|> <|user|> .. <|end|> <|assistant|> .. <|end|> ... <|eos|>

The loss mask is aligned with the tokens: `loss_mask[i] == 1` iff token `i` is a target that counts,
which is exactly the assistant's content tokens and the `<|end|>` closing each assistant turn (so the
model learns to stop). Packing puts whole conversations into rows of `seq_len + 1` tokens, never
splitting one across rows; a conversation longer than a row is a counted rejection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from tokenizers import Tokenizer

from raylm.data.chat_layouts import (ACCEPTED, LayoutError, choose_format, layout_of, read_records, rename_columns,
                                     turns_of)
from raylm.data.tokenizer import (
    ASSISTANT,
    BOS,
    END,
    EOS,
    PAD,
    SYSTEM,
    USER,
    fingerprint,
    token_byte_lengths,
    tokenizer_from_json,
)

TEMPLATE_TOKENS = {"bos": BOS, "eos": EOS, "pad": PAD, "system": SYSTEM, "user": USER, "assistant": ASSISTANT, "end": END}
ROLES = ("system", "user", "assistant")


class ChatDataError(ValueError):
    """Chat rows that cannot be used; the message names the file and line of each."""


def chat_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of the chat template's special tokens; a clear error lists the ones the tokenizer lacks."""
    ids = {name: tokenizer.token_to_id(token) for name, token in TEMPLATE_TOKENS.items()}
    missing = [TEMPLATE_TOKENS[name] for name, index in ids.items() if index is None]
    if missing:
        raise ChatDataError(f"the tokenizer lacks the chat special tokens {missing}: train it with "
                            f"tokenizer.special_tokens including {list(TEMPLATE_TOKENS.values())}")
    return ids


def conversation_of(row: Any, system_prompt: str | None = None, layout: str | None = None) -> list[dict[str, str]]:
    """A validated list of {role, content} turns from one row read as `layout` (None: the layout its keys
    match); ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    layout = layout or layout_of(row)
    if layout is None:
        raise ValueError(f"expected `messages` or `prompt`/`response` (or another layout: {ACCEPTED}), "
                         f"got keys {sorted(row)}")
    turns = turns_of(row, layout, system_prompt)
    if not turns:
        raise ValueError("row has no assistant turn (no turns at all)")
    check_roles(turns)
    return turns


def check_roles(turns: list[dict[str, str]]) -> None:
    if not any(turn["role"] == "assistant" for turn in turns):
        raise ValueError("row has no assistant turn")
    start = 1 if turns[0]["role"] == "system" else 0
    for index, turn in enumerate(turns[start:], start):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if turn["role"] != expected:
            order = " -> ".join(t["role"] for t in turns)
            raise ValueError(f"roles out of order at messages[{index}] ({order}): expected {expected!r} "
                             f"(an optional system turn first, then user and assistant alternating)")
    if turns[-1]["role"] != "assistant":
        raise ValueError("roles out of order: the last turn must be the assistant's")


@dataclass
class ChatRow:
    where: str  # file:line (file[index] in a JSON array)
    turns: list[dict[str, str]]
    layout: str


def read_chat(path: str, system_prompt: str | None = None, layout: str | None = None,
              columns: dict[str, str] | None = None, max_errors: int = 10) -> Iterator[ChatRow]:
    """Validated conversations of a chat file or hf:// set (any layout of raylm.data.chat_layouts; `layout`
    None: each row by its keys); raises ChatDataError naming file:line of each bad row, after reading all."""
    problems, bad = [], 0
    for where, record in read_records(path):
        try:
            if isinstance(record, Exception):  # a line that is not JSON
                raise ValueError(f"not valid JSON ({record})")
            row = rename_columns(record, columns or {}) if isinstance(record, dict) else record
            row_layout = layout or (layout_of(row) if isinstance(row, dict) else None)
            yield ChatRow(where, conversation_of(row, system_prompt, row_layout), row_layout or "")
        except ValueError as error:
            bad += 1
            if len(problems) < max_errors:
                problems.append(f"{where}: {error}")
    if problems:
        more = f"\n  ... and {bad - len(problems)} more" if bad > len(problems) else ""
        raise ChatDataError(f"{bad} bad chat row(s):\n  " + "\n  ".join(problems) + more)


def read_chat_jsonl(path: str, system_prompt: str | None = None, max_errors: int = 10) -> Iterator[ChatRow]:
    """`read_chat` with each row read by the layout its keys match."""
    return read_chat(path, system_prompt, max_errors=max_errors)


def looks_like_chat(path: str) -> bool:
    """True for a record file whose first rows match a chat layout."""
    try:
        return choose_format(path, "auto") != "text"
    except LayoutError:
        return False


def render(turns: list[dict[str, str]], tokenizer: Tokenizer, ids: dict[str, int]) -> tuple[list[int], list[int]]:
    """(tokens, loss_mask) of one conversation under the chat template."""
    tokens, mask = [ids["bos"]], [0]
    contents = tokenizer.encode_batch([turn["content"] for turn in turns], add_special_tokens=False)
    for turn, encoding in zip(turns, contents):
        body = encoding.ids
        tokens += [ids[turn["role"]], *body, ids["end"]]
        counted = 1 if turn["role"] == "assistant" else 0
        mask += [0, *([counted] * len(body)), counted]
    tokens.append(ids["eos"])
    mask.append(0)
    return tokens, mask


def pack_conversations(rendered: list[tuple[list[int], list[int]]], seq_len: int,
                       pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Whole conversations, in order, into rows of seq_len + 1; returns (tokens, mask, too_long)."""
    width = seq_len + 1
    rows_tokens, rows_mask, current_tokens, current_mask, too_long = [], [], [], [], 0
    for tokens, mask in rendered:
        if len(tokens) > width:
            too_long += 1
            continue
        if len(current_tokens) + len(tokens) > width:
            rows_tokens.append(current_tokens)
            rows_mask.append(current_mask)
            current_tokens, current_mask = [], []
        current_tokens = current_tokens + tokens
        current_mask = current_mask + mask
    if current_tokens:
        rows_tokens.append(current_tokens)
        rows_mask.append(current_mask)
    packed = np.full((len(rows_tokens), width), pad_id, dtype=np.int32)
    masks = np.zeros((len(rows_tokens), width), dtype=np.int8)
    for index, (tokens, mask) in enumerate(zip(rows_tokens, rows_mask)):
        packed[index, :len(tokens)] = tokens
        masks[index, :len(mask)] = mask
    return packed, masks, too_long


def pack_chat_batch(batch: pd.DataFrame, tokenizer_json: str, seq_len: int) -> pa.Table:
    """Ray Data batch function: rendered conversations (`tokens`, `loss_mask` lists, each at most
    seq_len + 1 long) -> packed rows with `tokens`, `loss_mask` and counts."""
    tokenizer = tokenizer_from_json(tokenizer_json)
    ids = chat_token_ids(tokenizer)
    rendered = [(list(tokens), list(mask)) for tokens, mask in zip(batch["tokens"], batch["loss_mask"])]
    packed, masks, too_long = pack_conversations(rendered, seq_len, ids["pad"])
    if too_long:
        raise ChatDataError(f"{too_long} conversation(s) longer than seq_len + 1 = {seq_len + 1} reached packing")
    width = seq_len + 1
    return pa.table({
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(packed.reshape(-1), pa.int32()), width),
        "loss_mask": pa.FixedSizeListArray.from_arrays(pa.array(masks.reshape(-1), pa.int8()), width),
        "n_tokens": pa.array((packed != ids["pad"]).sum(axis=1), pa.int64()),
        "n_bytes": pa.array(_byte_lengths(tokenizer_json)[packed].sum(axis=1), pa.int64()),
        "n_targets": pa.array(masks[:, 1:].sum(axis=1).astype(np.int64), pa.int64()),
        "n_conversations": pa.array((packed == ids["bos"]).sum(axis=1).astype(np.int64), pa.int64()),
    })


_BYTE_LENGTHS: dict[str, np.ndarray] = {}


def _byte_lengths(tokenizer_json: str) -> np.ndarray:
    key = fingerprint(tokenizer_json)
    if key not in _BYTE_LENGTHS:
        _BYTE_LENGTHS[key] = token_byte_lengths(tokenizer_from_json(tokenizer_json))
    return _BYTE_LENGTHS[key]

