"""The per-batch data functions, without Ray: decoding, cleaning, exact dedup, splits, packing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from raylm.config import SourceConfig, TokenizerConfig
from raylm.data.clean import clean_batch, normalize_whitespace
from raylm.data.curate import split_of
from raylm.data.dedup import add_dedup_key, mark_exact_duplicates
from raylm.data.pack import encode_and_pack, pack_greedy
from raylm.data.sources import decode_file, document, list_stdlib_files
from raylm.data.tokenizer import EOS, PAD, special_id, token_byte_lengths, train_tokenizer


def decode(name: str, raw: bytes, **source) -> list[dict]:
    return list(decode_file({"path": f"/corpus/{name}", "bytes": raw}, SourceConfig(path="python-stdlib", **source), "/corpus"))


def test_jsonl_bad_lines_become_parse_errors_with_file_and_line():
    raw = b'{"text": "good one"}\n{"text": broken\n\n{"body": "no text"}\n\xff\xfe\n[1, 2]\n{"text": 5}\n'
    rows = decode("a.jsonl", raw)
    assert [r["reason"] for r in rows] == ["", "parse_error", "parse_error", "parse_error", "parse_error", "parse_error"]
    details = [r["detail"] for r in rows[1:]]
    assert details[0].startswith("a.jsonl:2: not valid JSON")
    assert details[1] == "a.jsonl:4: text field 'text' missing"
    assert details[2].startswith("a.jsonl:5: not valid UTF-8")
    assert details[3] == "a.jsonl:6: expected a JSON object, got list"
    assert "not a string (int)" in details[4]
    assert len({r["id"] for r in rows}) == len(rows)


def test_text_files_invalid_utf8_binary_and_paragraphs():
    assert decode("bad.txt", b"caf\xe9")[0]["detail"] == "bad.txt: not valid UTF-8 at byte 3"
    assert decode("blob.txt", b"\x00\x01\x02binary")[0]["reason"] == "parse_error"
    blocks = decode("book.md", b"one\n\ntwo\nlines\n\n\n\nthree", doc_per="paragraph")
    assert [b["text"] for b in blocks] == ["one", "two\nlines", "three"]
    assert json.loads(blocks[1]["meta"])["locator"] == "book.md#1"


def test_custom_text_and_id_fields():
    rows = decode("x.jsonl", b'{"body": "hello", "uid": 7, "lang": "en"}\n', text_field="body", id_field="uid")
    assert rows[0]["text"] == "hello" and json.loads(rows[0]["meta"])["lang"] == "en"
    again = decode("y.jsonl", b'{"body": "other text", "uid": 7}\n', text_field="body", id_field="uid")
    assert rows[0]["id"] == again[0]["id"]  # the id comes from the id field, not the content


def test_normalize_whitespace_keeps_indentation():
    text = "def f():\r\n    return 1   \n\n\n\n\tx = 2\t\n\n"
    assert normalize_whitespace(text) == "def f():\n    return 1\n\n\tx = 2"


def frame(texts: list[str], reasons: list[str] | None = None) -> pd.DataFrame:
    rows = [document("src", f"doc{i}", t) for i, t in enumerate(texts)]
    batch = pd.DataFrame(rows)
    if reasons:
        batch["reason"] = reasons
    return batch


def test_clean_batch_marks_empty_and_skips_rejected_rows():
    batch = clean_batch(frame(["  text  \n\n\n\nmore", " \n\t\n", "x"], ["", "", "parse_error"]), min_chars=1)
    assert batch["text"].tolist()[0] == "  text\n\nmore"
    assert batch["reason"].tolist() == ["", "empty", "parse_error"]


def test_exact_dedup_keeps_smallest_id_whatever_the_order():
    batch = add_dedup_key(frame(["same", "same", "other", "same"], ["", "", "", "parse_error"]))
    keys = batch.groupby("dedup_key")
    results = []
    for shuffled in (batch, batch.iloc[::-1]):
        marked = pd.concat(mark_exact_duplicates(g.copy()) for _, g in shuffled.groupby("dedup_key"))
        results.append(dict(zip(marked["id"], marked["reason"])))
    assert results[0] == results[1]
    same_ids = sorted(batch.loc[[0, 1], "id"])
    assert results[0][same_ids[0]] == "" and results[0][same_ids[1]] == "exact_dup"
    assert results[0][batch.loc[3, "id"]] == "parse_error"
    assert len(keys) == 3


def test_split_is_stable_and_near_the_fraction():
    ids = [f"doc-{i}" for i in range(5000)]
    splits = [split_of(i, 0.1, seed=0) for i in ids]
    assert splits == [split_of(i, 0.1, seed=0) for i in ids]
    assert 0.08 < splits.count("val") / len(ids) < 0.12
    assert splits != [split_of(i, 0.1, seed=1) for i in ids]


@given(st.lists(st.lists(st.integers(0, 99), max_size=40), max_size=20), st.integers(2, 16))
@settings(max_examples=60, deadline=None)
def test_packing_keeps_every_token_once(documents, seq_len):
    packed = pack_greedy(documents, seq_len, eos_id=100, pad_id=101)
    assert packed.shape[1] == seq_len + 1
    stream = packed.reshape(-1)
    real = stream[stream != 101]
    expected = [t for doc in documents for t in [*doc, 100]]
    assert real.tolist() == expected
    if len(packed):
        assert (packed[:-1] != 101).all()  # only the last row is padded


def test_stdlib_sample_is_stable_and_bounded():
    sample = list_stdlib_files(200_000)
    assert sample == list_stdlib_files(200_000)
    assert all("site-packages" not in path for path in sample)
    assert {p.rsplit(".", 1)[1] for p in list_stdlib_files(None)} == {"py", "rst", "txt"}


def tiny_tokenizer():
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.", "naïve café ☕ 日本"] * 20
    return train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1))


def test_tokenizer_round_trip_and_exact_byte_lengths():
    tokenizer = tiny_tokenizer()
    lengths = token_byte_lengths(tokenizer)
    for text in ["def add(a, b):", "naïve café ☕ 日本 \x00 \U0001f600", "  indented\n\ttabs"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids) == text
        assert lengths[ids].sum() == len(text.encode())
    assert lengths[special_id(tokenizer, EOS)] == 0


def test_encode_and_pack_counts_tokens_and_bytes():
    tokenizer = tiny_tokenizer()
    texts = ["hello world", "def f(x):\n    return x", "☕☕"]
    table = encode_and_pack(pd.DataFrame({"text": texts}), tokenizer.to_str(), seq_len=8)
    rows = np.asarray(table.column("tokens").combine_chunks().flatten()).reshape(table.num_rows, 9)
    pad = special_id(tokenizer, PAD)
    assert table.column("n_tokens").to_pylist() == (rows != pad).sum(axis=1).tolist()
    assert sum(table.column("n_bytes").to_pylist()) == sum(len(t.encode()) for t in texts)
