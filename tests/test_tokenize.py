"""Tokenizer training, saving for transformers, packing and the `tokenize` stage (issue 4).

Unit tests run without Ray; the stage tests run Ray Data for real on a tiny curated corpus written
in the same layout as the curate stage's output.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raylm.artifacts import Curated
from raylm.config import ConfigError, TokenizerConfig, load_config
from raylm.data.pack import document_tokenizer, encode_and_pack, pack_best_fit, pack_greedy
from raylm.data.sources import list_stdlib_files
from raylm.data.token_files import TokenFileRows
from raylm.data.tokenizer import (ASSISTANT, BOS, CHAT_TOKENS, DEFAULT_SPECIAL_TOKENS, END, EOS, PAD, SYSTEM, USER,
                                  fingerprint, load_tokenizer, save_tokenizer, special_token_ids,
                                  token_byte_lengths, train_tokenizer)
from raylm.train.data import PackedSequences
from tests.conftest import CONFIGS

STDLIB_TEXT = [Path(p).read_text(encoding="utf-8", errors="replace") for p in list_stdlib_files(300_000)]


@pytest.fixture(scope="module")
def stdlib_tokenizer():
    return train_tokenizer(STDLIB_TEXT, TokenizerConfig(vocab_size=600, min_frequency=2))


def corpus_texts(shared_data: Path) -> dict[str, str]:
    corpora = shared_data / "corpora"
    texts = {}
    for path in sorted(corpora.rglob("*")):
        if path.suffix == ".txt" and "LICENSE" not in path.name:
            texts[path.name] = path.read_text(encoding="utf-8", errors="strict")[:40_000]
        elif path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()[:40]
            texts[path.name] = "\n\n".join(json.loads(line)["text"] for line in lines)
        elif path.name.endswith(".json.gz"):
            lines = gzip.decompress(path.read_bytes()).decode().splitlines()[:20]
            texts[path.name] = "\n\n".join(json.loads(line)["text"] for line in lines)
    return texts


# ------------------------------------------------------------------------------------------------
# Tokenizer


def test_default_special_tokens_come_first_in_order(stdlib_tokenizer):
    assert DEFAULT_SPECIAL_TOKENS == (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
    assert TokenizerConfig().special_tokens == list(DEFAULT_SPECIAL_TOKENS)
    assert special_token_ids(stdlib_tokenizer) == {token: i for i, token in enumerate(DEFAULT_SPECIAL_TOKENS)}
    assert stdlib_tokenizer.get_vocab_size() == 600


def test_round_trip_and_exact_bytes_on_real_corpora(stdlib_tokenizer, shared_data):
    texts = corpus_texts(shared_data)
    assert len(texts) >= 8
    lengths = token_byte_lengths(stdlib_tokenizer)
    for name, text in texts.items():
        ids = stdlib_tokenizer.encode(text, add_special_tokens=False).ids
        assert stdlib_tokenizer.decode(ids, skip_special_tokens=False) == text, name
        assert lengths[ids].sum() == len(text.encode()), name


@given(st.text(max_size=300))
@settings(max_examples=200, deadline=None)
def test_round_trip_on_arbitrary_unicode(text):
    # the corpus tokenizer: hypothesis finds texts such as '<|user|>', which the plain tokenizer
    # encodes as one special token of no text bytes
    tokenizer = document_tokenizer(_cached_stdlib_tokenizer().to_str())
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert token_byte_lengths(tokenizer)[ids].sum() == len(text.encode("utf-8", "surrogatepass"))


@given(st.lists(st.sampled_from(["a", " ", "<|eos|>", "<|pad|>", "<|user|>", "\n", "é"]), max_size=30))
@settings(max_examples=50, deadline=None)
def test_special_token_text_inside_documents_is_plain_text(pieces):
    tokenizer = document_tokenizer(_cached_stdlib_tokenizer().to_str())
    text = "".join(pieces)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert not set(ids) & set(range(len(DEFAULT_SPECIAL_TOKENS)))
    assert tokenizer.decode(ids) == text


_CACHE: dict[str, object] = {}


def _cached_stdlib_tokenizer():
    if "tok" not in _CACHE:
        _CACHE["tok"] = train_tokenizer(STDLIB_TEXT, TokenizerConfig(vocab_size=600, min_frequency=2))
    return _CACHE["tok"]


def test_digits_are_split_and_regex_choice_matters():
    texts = ["order 123456 costs 7890 dollars and 42 cents; " * 50]
    single = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1, max_digits=1))
    assert single.encode("123456").tokens == list("123456")
    triple = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1, max_digits=3))
    assert triple.encode("123456").tokens == ["123", "456"]
    gpt2 = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1, pre_tokenizer="gpt2", max_digits=3))
    assert gpt2.encode(" 123456").tokens == ["Ġ123", "456"]


def test_transformers_loads_saved_files_and_encodes_identically(stdlib_tokenizer, tmp_path, shared_data):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    save_tokenizer(stdlib_tokenizer, str(tmp_path / "tok"), model_max_length=256)
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert isinstance(hf, PreTrainedTokenizerFast) and isinstance(auto, PreTrainedTokenizerFast)
    ids = special_token_ids(stdlib_tokenizer)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ids[BOS], ids[EOS], ids[PAD])
    assert set(CHAT_TOKENS) <= set(hf.all_special_tokens)
    assert hf.model_max_length == 256
    chat = f"{SYSTEM}Be brief.{END}{USER}2+2?{END}{ASSISTANT}4{END}"
    for text in [*corpus_texts(shared_data).values(), chat, "  spaces  .  ,  don't ", "naïve ☕ 日本\t\n"]:
        expected = stdlib_tokenizer.encode(text).ids
        assert hf(text)["input_ids"] == expected
        assert auto.encode(text) == expected
        assert hf.decode(expected) == stdlib_tokenizer.decode(expected, skip_special_tokens=False)
    assert hf(chat)["input_ids"][0] == ids[SYSTEM]


def test_fingerprint_names_the_exact_tokenizer(stdlib_tokenizer, tmp_path):
    path = save_tokenizer(stdlib_tokenizer, str(tmp_path))
    assert fingerprint(load_tokenizer(str(tmp_path)).to_str()) == fingerprint(stdlib_tokenizer.to_str())
    assert load_tokenizer(path).get_vocab() == stdlib_tokenizer.get_vocab()


# ------------------------------------------------------------------------------------------------
# Packing


def numbered_documents(lengths: list[int]) -> list[list[int]]:
    """Documents whose tokens are all distinct (so each can be traced to its place)."""
    out, start = [], 10
    for n in lengths:
        out.append(list(range(start, start + n)))
        start += n
    return out


@given(st.lists(st.integers(0, 60), max_size=25), st.integers(2, 24))
@settings(max_examples=150, deadline=None)
def test_best_fit_keeps_every_token_once_and_never_splits_a_fitting_document(lengths, seq_len):
    eos, pad, width = 0, 1, seq_len + 1
    documents = numbered_documents(lengths)
    packed = pack_best_fit(documents, seq_len, eos_id=eos, pad_id=pad)
    assert packed.shape[1] == width and packed.dtype == np.int32
    real = packed[packed != pad]
    assert (real == eos).sum() == len(documents)
    assert sorted(real[real != eos].tolist()) == [t for d in documents for t in d]
    where = {int(token): row for row, tokens in enumerate(packed) for token in tokens if token > pad}
    for document in documents:
        if document and len(document) + 1 <= width:
            rows = {where[t] for t in document}
            assert len(rows) == 1  # not split
            row = packed[rows.pop()].tolist()
            at = row.index(document[0])
            assert row[at:at + len(document) + 1] == [*document, eos]


@given(st.lists(st.integers(0, 60), max_size=25), st.integers(2, 24))
@settings(max_examples=100, deadline=None)
def test_greedy_keeps_order_and_pads_only_the_last_row(lengths, seq_len):
    documents = numbered_documents(lengths)
    packed = pack_greedy(documents, seq_len, eos_id=0, pad_id=1)
    stream = packed.reshape(-1)
    assert stream[stream != 1].tolist() == [t for d in documents for t in [*d, 0]]
    if len(packed):
        assert (packed[:-1] != 1).all()


def test_encode_and_pack_counts_match_the_text(stdlib_tokenizer):
    import pandas as pd

    texts = STDLIB_TEXT[:20] + ["<|eos|> literal", "☕"]
    for packing in ("greedy", "best_fit"):
        table = encode_and_pack(pd.DataFrame({"text": texts}), stdlib_tokenizer.to_str(), 32, packing)
        assert table.schema.field("tokens").type == pa.list_(pa.int32(), 33)
        rows = np.asarray(table.column("tokens").combine_chunks().flatten()).reshape(-1, 33)
        encoded = [stdlib_tokenizer.encode(t).ids for t in texts[:20]]
        assert sum(table.column("n_tokens").to_pylist()) == (rows != 2).sum() == sum(len(e) + 1 for e in encoded) + \
            sum(len(document_tokenizer(stdlib_tokenizer.to_str()).encode(t).ids) + 1 for t in texts[20:])
        assert sum(table.column("n_bytes").to_pylist()) == sum(len(t.encode()) for t in texts)


# ------------------------------------------------------------------------------------------------
# Config and CLI errors


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size = 200 is smaller than the 256-byte alphabet plus 7"):
        load_config(CONFIGS / "tiny.yaml", ["tokenizer.vocab_size=200"])
    with pytest.raises(ConfigError, match=r"tokenizer.special_tokens = .*must include \['<\|pad\|>'\]"):
        load_config(CONFIGS / "tiny.yaml", ["tokenizer.special_tokens=['<|eos|>']"])
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(ConfigError, match=r"tokenizer.path = .*tokenizer.json is not a tokenizer.json that"):
        load_config(CONFIGS / "tiny.yaml", [f"tokenizer.path={bad}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no tokenizer.json in the folder"):
        load_config(CONFIGS / "tiny.yaml", [f"tokenizer.path={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match=r"tokenizer.packing = 'first_fit'"):
        load_config(CONFIGS / "tiny.yaml", ["tokenizer.packing=first_fit"])
    for name in ("tiny.yaml", "laptop.yaml"):
        assert load_config(CONFIGS / name).tokenizer.packing == "greedy"


def test_cli_tokenizer_flag_is_validated_before_work(tmp_path, capsys):
    from raylm.cli import main

    bad = tmp_path / "tok.json"
    bad.write_text("not json")
    assert main(["tokenize", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(tmp_path / "ws"),
                 "--tokenizer", str(bad)]) == 2
    assert "tokenizer.path" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


# ------------------------------------------------------------------------------------------------
# The stage, on Ray Data

MARKER = "Qzvxjwkq"


def write_curated(root: Path, splits: dict[str, list[str]]) -> Curated:
    outputs, counts = {}, {}
    for split, texts in splits.items():
        folder = root / "kept" / split
        folder.mkdir(parents=True)
        half = len(texts) // 2
        for part, chunk in enumerate((texts[:half], texts[half:])):
            if chunk:
                pq.write_table(pa.table({"text": chunk, "n_bytes": [len(t.encode()) for t in chunk]}),
                               folder / f"part-{part}.parquet")
        outputs[split], counts[split] = str(folder), len(texts)
    kept_bytes = sum(len(t.encode()) for texts in splits.values() for t in texts)
    return Curated(outputs=outputs, counts=counts, metrics={"bytes.kept": kept_bytes})


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    train = [t for t in STDLIB_TEXT if MARKER not in t][:36]
    val = [f"{' '.join([MARKER] * 40)}.\n{t[:2000]}" for t in STDLIB_TEXT[36:50]]
    assert len(val) >= 10
    return write_curated(tmp_path_factory.mktemp("curated"), {"train": train, "val": val}), train, val


def run_stage(root: Path, curated: Curated, seq_len: int = 48, **tokenizer) -> dict:
    """The tokenize stage on `curated`; returns the manifest it writes (its keys are the on-disk contract)."""
    from raylm.data.tokenize import tokenize
    from raylm.workspace import Workspace

    config = TokenizerConfig(vocab_size=400, min_frequency=2, sample_bytes=2_000_000, **tokenizer)
    stage = Workspace(str(root / "ws")).stage("tokenize", config.model_dump(mode="json"))
    stage.prepare()
    return tokenize(config, seq_len, curated, stage).to_manifest()


def check_counts(out: dict, splits: dict[str, list[str]], seq_len: int) -> None:
    """Manifest counts == shard contents == the text: every token once, every byte counted."""
    width = seq_len + 1
    tokenizer = load_tokenizer(out["tokenizer"]["path"])
    assert out["tokenizer"]["fingerprint"] == fingerprint(tokenizer.to_str())
    doc_tokenizer = document_tokenizer(tokenizer.to_str())
    for split, texts in splits.items():
        table = pads.dataset(out["outputs"][split], format="parquet").to_table()
        assert table.schema.field("tokens").type == pa.list_(pa.int32(), width)
        rows = np.asarray(table.column("tokens").combine_chunks().flatten()).reshape(-1, width)
        counts = out["splits"][split]
        assert counts["sequences"] == table.num_rows == len(rows)
        assert counts["tokens"] == int((rows != 2).sum()) == sum(table.column("n_tokens").to_pylist())
        expected = sum(len(e.ids) + 1 for e in doc_tokenizer.encode_batch(texts, add_special_tokens=False))
        assert counts["tokens"] == expected
        assert counts["bytes"] == sum(len(t.encode()) for t in texts) == sum(table.column("n_bytes").to_pylist())
        assert counts["documents"] == len(texts) == int((rows == 1).sum())
        reader = PackedSequences(out["outputs"][split])  # the trainer's reader: the stage's token files, same rows
        assert isinstance(reader.source, TokenFileRows) and reader.source.dtype == np.uint16
        assert np.array_equal(reader.take(np.arange(len(rows)))[0], rows)
    val = out["splits"]["val"]
    assert out["metrics"]["val_bytes_per_token"] == pytest.approx(val["bytes"] / val["tokens"])


@pytest.fixture(scope="module")
def tracked_stage(ray_session, curated, tmp_path_factory):
    """One greedy stage run inside an MLflow run (as `raylm tokenize` runs it)."""
    import mlflow

    root = tmp_path_factory.mktemp("stage")
    manifest, _, _ = curated
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    mlflow.set_experiment("tokenize-test")  # this store's own experiment, whatever ran before
    with mlflow.start_run() as run:
        out = run_stage(root, manifest, seq_len=48, packing="greedy", batch_size=7)
    yield out, run.info.run_id, f"sqlite:///{root}/mlflow.db"


@pytest.mark.slow
def test_stage_counts_match_shards_and_val_is_held_out(tracked_stage, curated):
    import mlflow
    from transformers import PreTrainedTokenizerFast

    out, run_id, tracking_uri = tracked_stage
    mlflow.set_tracking_uri(tracking_uri)
    manifest, train, val = curated
    assert out["seq_len"] == 48 and out["packing"] == "greedy"
    assert (out["tokenizer"]["eos_id"], out["tokenizer"]["pad_id"], out["tokenizer"]["bos_id"]) == (1, 2, 0)
    check_counts(out, {"train": train, "val": val}, 48)

    vocab = load_tokenizer(out["tokenizer"]["path"]).get_vocab()
    assert not [token for token in vocab if "Qz" in token or "zvx" in token]
    # the same training with the val text in it does learn the marker: the check above can fail
    leaky = train_tokenizer(train + val, TokenizerConfig(vocab_size=400, min_frequency=2))
    assert [token for token in leaky.get_vocab() if "Qz" in token or "zvx" in token]

    hf = PreTrainedTokenizerFast.from_pretrained(out["tokenizer"]["folder"])
    assert hf.eos_token_id == out["tokenizer"]["eos_id"] and hf.model_max_length == 48
    run = mlflow.get_run(run_id)
    assert run.data.tags["raylm.tokenizer.fingerprint"] == out["tokenizer"]["fingerprint"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "tokenizer")}
    assert artifacts == {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                         "tokenizer/special_tokens_map.json"}


@pytest.mark.slow
def test_stage_reuses_a_tokenizer_from_mlflow_or_a_folder_with_best_fit(tracked_stage, curated, tmp_path):
    import mlflow

    out, run_id, tracking_uri = tracked_stage
    manifest, train, val = curated
    mlflow.set_tracking_uri(tracking_uri)  # `runs:/` resolves against the current tracking store
    from_run = run_stage(tmp_path / "a", manifest, seq_len=48, path=f"runs:/{run_id}/tokenizer")
    assert from_run["tokenizer"]["fingerprint"] == out["tokenizer"]["fingerprint"]
    for split in ("train", "val"):  # sequences differ: one padded row per batch, and batch sizes differ
        assert {k: v for k, v in from_run["splits"][split].items() if k != "sequences"} == \
            {k: v for k, v in out["splits"][split].items() if k != "sequences"}

    best_fit = run_stage(tmp_path / "b", manifest, seq_len=48, path=out["tokenizer"]["folder"], packing="best_fit")
    assert best_fit["tokenizer"]["source"] == out["tokenizer"]["folder"]
    assert best_fit["tokenizer"]["fingerprint"] == out["tokenizer"]["fingerprint"]
    check_counts(best_fit, {"train": train, "val": val}, 48)
    for split in ("train", "val"):
        assert best_fit["splits"][split]["tokens"] == out["splits"][split]["tokens"]

    with pytest.raises(ValueError, match="cannot fetch it from MLflow"):
        run_stage(tmp_path / "c", manifest, path="runs:/0123456789abcdef0123456789abcdef/tokenizer")


def test_empty_train_split_and_tokenizer_without_pad_fail_before_work(tmp_path, stdlib_tokenizer):
    from raylm.data.tokenize import check_tokenizer

    empty = Curated(outputs={"train": str(tmp_path / "none"), "val": str(tmp_path / "none")}, counts={"train": 0, "val": 3})
    with pytest.raises(ValueError, match="train split at .* is empty"):
        run_stage(tmp_path, empty)
    minimal = train_tokenizer(["abc abc"] * 5, TokenizerConfig(vocab_size=300, special_tokens=["<|eos|>", "<|pad|>"]))
    check_tokenizer(minimal, "ok")
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match=r"origin: the tokenizer has no '<\|eos\|>' token"):
        check_tokenizer(Tokenizer(models.BPE()), "origin")


def test_parquet_pieces_cover_every_row_once_largest_first(tmp_path):
    from raylm.data.parquet_pieces import parquet_pieces, read_piece

    folder = tmp_path / "split"
    folder.mkdir()
    small = ["small"] * 3
    big = [f"row {i} " + "".join(chr(97 + (i * j) % 26) for j in range(200)) for i in range(400)]
    pq.write_table(pa.table({"text": small}), folder / "a.parquet")
    pq.write_table(pa.table({"text": big}), folder / "b.parquet", row_group_size=50)
    (folder / "_SUCCESS").write_text("")
    (folder / ".partial.parquet").write_bytes(b"not parquet")
    filesystem, pieces = parquet_pieces(str(folder), piece_bytes=(folder / "b.parquet").stat().st_size // 3)

    sizes = [piece["bytes"] for piece in pieces]
    assert sizes == sorted(sizes, reverse=True)
    split_big = [piece for piece in pieces if piece["path"].endswith("b.parquet")]
    assert len(split_big) >= 2, "a file over piece_bytes is split by row groups"
    assert sorted(g for piece in split_big for g in piece["row_groups"]) == list(range(8))
    rows = [text for piece in pieces for batch in read_piece(piece, filesystem, ["text"], 7)
            for text in batch.column("text").to_pylist()]
    assert sorted(rows) == sorted(small + big)
    with pytest.raises(ValueError, match="missing: no parquet files there"):
        parquet_pieces(str(tmp_path / "missing"))


def test_stage_reads_encodes_packs_and_writes_in_one_fused_task_per_piece(ray_session, curated, stdlib_tokenizer,
                                                                            tmp_path, caplog):
    """Ray Data reserves a CPU for every operator of a pipeline; with a separate read, re-cut and
    write, the tokenize tasks of a 2-CPU machine ran one at a time. The stage is one operator."""
    import logging

    from raylm.data.tokenize import packed_dataset, write_packed

    manifest, train, _ = curated
    config = TokenizerConfig(batch_size=5, concurrency=2)
    packed = packed_dataset(manifest.train_uri, stdlib_tokenizer.to_str(), 48, config).materialize()
    assert packed.num_blocks() == 2  # the split's two files, one task each
    assert sum(packed.to_pandas()["n_bytes"]) == sum(len(t.encode()) for t in train)

    with caplog.at_level(logging.INFO, logger="ray.data"):
        write_packed(manifest.train_uri, stdlib_tokenizer.to_str(), 48, config, str(tmp_path / "out"))
    assert "InputDataBuffer[Input] -> TaskPoolMapOperator[MapBatches(encode_and_pack_pieces)->Write]" in caplog.text
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 2, "one task and one shard per piece"
    written = pq.read_table(tmp_path / "out", columns=["n_bytes"]).column("n_bytes").to_pylist()
    assert sum(written) == sum(len(t.encode()) for t in train)
