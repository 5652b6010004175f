"""Chat data: row validation, the template, the loss mask (labels and a gradient) and whole-conversation packing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from raylm.config import TokenizerConfig
from raylm.data.chat import (TEMPLATE_TOKENS, ChatDataError, chat_token_ids, conversation_of, looks_like_chat,
                             pack_chat_batch, pack_conversations, read_chat_jsonl, render)
from raylm.data.tokenizer import train_tokenizer
from raylm.model import Transformer, TransformerConfig
from raylm.model.loss import lm_batch

TEXTS = ["What is the capital of France? The capital of France is Paris.",
         "Add two and three. Two plus three is five.", "Say hello. Hello there!"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, TokenizerConfig(vocab_size=300, min_frequency=1,
                                                  special_tokens=list(TEMPLATE_TOKENS.values())))


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_both_layouts_become_the_same_turns():
    pair = conversation_of({"prompt": "hi", "response": "hello"}, system_prompt="be brief")
    messages = conversation_of({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]})
    assert pair == messages


@pytest.mark.parametrize("row, expected", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"prompt": "hi"}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles out of order at messages[0]"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles out of order at messages[1]"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "last turn must be the assistant"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "messages[0].role = 'bot'"),
    ({"text": "plain"}, "expected `messages` or `prompt`/`response`"),
])
def test_bad_rows_are_errors_naming_file_and_line(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "ok", "response": "fine"}, row])
    with pytest.raises(ChatDataError) as caught:
        list(read_chat_jsonl(path))
    assert f"{path}:2: " in str(caught.value)
    assert expected in str(caught.value)


def test_invalid_json_line_is_named(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", ['{"prompt": "a", "response": "b"}', "{not json"])
    with pytest.raises(ChatDataError, match=r"chat.jsonl:2: "):
        list(read_chat_jsonl(path))


def test_looks_like_chat(tmp_path):
    assert looks_like_chat(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "response": "b"}]))
    assert not looks_like_chat(write_jsonl(tmp_path / "b.jsonl", [{"text": "a"}]))
    (tmp_path / "c.txt").write_text("plain text")
    assert not looks_like_chat(str(tmp_path / "c.txt"))


def test_tokenizer_without_chat_tokens_names_the_missing_ones():
    plain = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=300, min_frequency=1,
                                                   special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"]))
    with pytest.raises(ChatDataError, match=r"<\|system\|>.*<\|user\|>.*<\|assistant\|>.*<\|end\|>"):
        chat_token_ids(plain)


def test_template_and_mask_cover_only_assistant_tokens_and_their_end(tokenizer):
    ids = chat_token_ids(tokenizer)
    turns = conversation_of({"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Say hello."},
                                          {"role": "assistant", "content": "Hello there!"},
                                          {"role": "user", "content": "Add two and three."},
                                          {"role": "assistant", "content": "Five."}]})
    tokens, mask = render(turns, tokenizer, ids)
    assert tokens[0] == ids["bos"] and tokens[-1] == ids["eos"] and len(tokens) == len(mask)
    assert tokenizer.decode(tokens, skip_special_tokens=False).startswith("<|bos|><|system|>Be brief.<|end|><|user|>")
    counted = [t for t, m in zip(tokens, mask) if m]
    assert tokenizer.decode(counted, skip_special_tokens=False) == "Hello there!<|end|>Five.<|end|>"
    assistant_positions = [i for i, t in enumerate(tokens) if t == ids["assistant"]]
    assert all(mask[i] == 0 for i in assistant_positions)


def test_packing_keeps_conversations_whole(tokenizer):
    ids = chat_token_ids(tokenizer)
    conversations = [render(conversation_of({"prompt": p, "response": r}), tokenizer, ids)
                     for p, r in [("Say hello.", "Hello there!"), ("Add two and three.", "Two plus three is five."),
                                  ("What is the capital of France?", "Paris."), ("hi", "hello")]]
    lengths = [len(t) for t, _ in conversations]
    seq_len = max(lengths) + 3
    packed, masks, too_long = pack_conversations(conversations + [([1] * (seq_len + 2), [0] * (seq_len + 2))],
                                                 seq_len, ids["pad"])
    assert too_long == 1
    assert packed.shape[1] == seq_len + 1
    rebuilt = []
    for row, mask in zip(packed, masks):
        starts = np.flatnonzero(row == ids["bos"])
        ends = np.flatnonzero(row == ids["eos"])
        assert len(starts) == len(ends) and (starts < ends).all()  # every conversation inside one row
        for start, end in zip(starts, ends):
            rebuilt.append((row[start:end + 1].tolist(), mask[start:end + 1].tolist()))
        assert (mask[row == ids["pad"]] == 0).all()
    assert rebuilt == [(list(t), list(m)) for t, m in conversations]


def test_pack_chat_batch_writes_tokens_and_loss_mask(tokenizer):
    ids = chat_token_ids(tokenizer)
    rendered = [render(conversation_of({"prompt": "Say hello.", "response": "Hello there!"}), tokenizer, ids)] * 5
    batch = pd.DataFrame({"tokens": [t for t, _ in rendered], "loss_mask": [m for _, m in rendered]})
    table = pack_chat_batch(batch, tokenizer.to_str(), seq_len=40)
    assert isinstance(table, pa.Table)
    assert table.column("loss_mask").type == pa.list_(pa.int8(), 41)
    assert sum(table.column("n_conversations").to_pylist()) == 5
    assert sum(table.column("n_targets").to_pylist()) == 5 * sum(rendered[0][1])


def test_prompt_tokens_contribute_nothing_to_loss_or_gradient(tokenizer):
    ids = chat_token_ids(tokenizer)
    turns = conversation_of({"prompt": "What is the capital of France?", "response": "Paris."}, "Be brief.")
    tokens, mask = render(turns, tokenizer, ids)
    packed, masks, _ = pack_conversations([(tokens, mask)] * 2, seq_len=2 * len(tokens) + 4, pad_id=ids["pad"])
    rows, row_masks = torch.from_numpy(packed).long(), torch.from_numpy(masks)
    _, labels = lm_batch(rows, None, loss_mask=row_masks, ignore_id=-100)  # what the training loop computes
    labels = labels.numpy()
    counted = labels[labels != -100]
    assert tokenizer.decode(counted.tolist(), skip_special_tokens=False) == "Paris.<|end|>Paris.<|end|>"

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=1, n_heads=2,
                                          seq_len=packed.shape[1] - 1))
    logits = model(torch.from_numpy(packed[:, :-1]).long())
    logits.retain_grad()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(labels).reshape(-1),
                           ignore_index=-100, reduction="sum")
    loss.backward()
    per_position = logits.grad.abs().sum(-1)  # [batch, time]
    target_counts = torch.from_numpy(masks[:, 1:] == 1)
    assert (per_position[~target_counts] == 0).all()
    assert (per_position[target_counts] > 0).all()
    # the loss does not depend on what the prompt's positions predict: perturb their logits only
    with torch.no_grad():
        noisy = logits + torch.randn_like(logits) * (~target_counts)[..., None]
        again = F.cross_entropy(noisy.reshape(-1, noisy.shape[-1]), torch.from_numpy(labels).reshape(-1),
                                ignore_index=-100, reduction="sum")
    assert torch.equal(again, loss.detach())
