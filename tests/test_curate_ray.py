"""The curate stage on a real Ray instance: determinism of dedup, hostile input, decontamination, real corpora."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.config import DataConfig, SourceConfig
from raylm.data.curate import curate, mark_documents
from raylm.data.decontam import load_contamination_index
from raylm.workspace import Workspace

pytestmark = pytest.mark.slow




def read_kept(result: dict) -> pd.DataFrame:
    """Both kept splits (a split without rows has no folder)."""
    return pd.concat([pd.read_parquet(result["outputs"][s]) for s in ("train", "val") if result["counts"][s]])


def planted_corpus(folder: Path, seed: int = 0) -> None:
    """Base documents, exact copies, and near copies at several word-substitution levels."""
    rng = random.Random(seed)
    rows = []
    for i in range(40):
        words = [f"w{rng.randrange(50000)}" for _ in range(150)]
        rows.append(" ".join(words))
        if i % 4 == 0:
            rows.append(" ".join(words))
        if i % 2 == 0:
            near = list(words)
            for _ in range((i % 8) + 1):  # 1..8 substitutions: Jaccard from ~0.94 down to ~0.65
                near[rng.randrange(len(near))] = f"x{rng.randrange(10**6)}"
            rows.append(" ".join(near))
            if i % 6 == 0:  # a chain: a copy of the near copy, one more substitution
                near[rng.randrange(len(near))] = f"y{rng.randrange(10**6)}"
                rows.append(" ".join(near))
    rng.shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    for part in range(3):
        with open(folder / f"part{part}.jsonl", "w") as handle:
            for text in rows[part::3]:
                handle.write(json.dumps({"text": text}) + "\n")


def test_kept_set_is_the_same_for_any_blocks_and_workers(ray_light, tmp_path):
    from ray.data import DataContext, ExecutionResources

    planted_corpus(tmp_path / "corpus")
    context = DataContext.get_current()
    saved = context.execution_options.resource_limits
    outcomes = []
    try:
        for blocks, cpus in ((1, 1), (8, 2)):  # 1 block on 1 worker against 8 blocks on 2 (a third case cost CI 30 s)
            context.execution_options.resource_limits = ExecutionResources(cpu=cpus)
            config = DataConfig(sources=[SourceConfig(path=str(tmp_path / "corpus"))], num_blocks=blocks)
            marked, stats = mark_documents(config)
            frame = marked.select_columns(["id", "reason", "detail"]).to_pandas()
            outcomes.append(dict(zip(frame["id"], zip(frame["reason"], frame["detail"]))))
            assert stats["near_dedup"]["pairs"] > 0
    finally:
        context.execution_options.resource_limits = saved
    assert all(outcome == outcomes[0] for outcome in outcomes[1:])
    reasons = pd.Series([r for r, _ in outcomes[0].values()]).value_counts().to_dict()
    assert reasons.get("exact_dup", 0) == 10 and reasons.get("near_dup", 0) >= 10


def test_hostile_input_is_accounted_for_and_decontamination_writes_the_index(ray_light, tmp_path, shared_data):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    from raylm.data.benchmarks import read_gsm8k

    leaked = next(iter(read_gsm8k(shared_data / "benchmarks" / "gsm8k" / "test.jsonl")))
    texts = [("The harbour town held its autumn fair on the first weekend of October, and every stall sold "
              "apples, cider and honey from the farms along the river valley."),
             ("A new footbridge now links the two halves of the old market square, so that children can walk "
              "to school without crossing the busy road."),
             ("Volunteers planted four hundred oak saplings on the hillside above the reservoir, hoping to slow "
              "the erosion that followed last year's fires."),
             ("The orchestra rehearsed in the converted grain store all summer and gave its first concert to an "
              "audience of farmers, students and curious tourists."),
             ("Engineers replaced the worn cables of the funicular railway during the quiet weeks of January, and "
              "the cars will run again at Easter.")]
    lines = [json.dumps({"text": texts[1] + " Contact: jane.doe@example.org, card 4111 1111 1111 1111."}),
             json.dumps({"text": "Worked example. " + leaked.record["question"] + " The answer follows."}),
             '{"text": broken json', json.dumps({"body": "no text field"}), json.dumps({"text": texts[0]})]
    (corpus / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (corpus / "blob.txt").write_bytes(b"\x00\x01binary" * 100)
    (corpus / "empty.jsonl").write_bytes(b"")
    (corpus / "huge.txt").write_text("word " * (50 * 1024 * 1024 // 5))
    page = "<html><body><p>" + texts[0] + "</p><p>Accept all cookies to continue.</p></body></html>"
    (corpus / "page.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": page}).encode()))
    import zstandard

    (corpus / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(json.dumps({"text": texts[2]}).encode()))
    pq.write_table(pa.table({"text": [texts[3], None], "uid": [1, 2]}), corpus / "rows.parquet")
    cut = gzip.compress((json.dumps({"text": texts[4]}) + "\n").encode())
    (corpus / "cut.jsonl.gz").write_bytes(cut[:len(cut) - 8])  # truncated (no trailer): its line survives
    (corpus / "nofooter.parquet").write_bytes((corpus / "rows.parquet").read_bytes()[:200])

    config = DataConfig(sources=[SourceConfig(path=str(corpus), id_field="uid")], val_fraction=0.01,
                        decontam={"benchmarks": str(shared_data / "benchmarks"), "tasks": ["gsm8k"]})
    stage = Workspace(str(tmp_path / "ws")).stage("curate", {"t": 1})
    stage.prepare(force=True)
    result = curate(config, stage).to_manifest()  # the keys the stage's manifest.json holds

    kept = read_kept(result)
    rejected = pd.read_parquet(result["outputs"]["rejected"])
    assert list(kept.columns) == ["id", "text", "source", "meta", "n_bytes"]
    assert result["counts"]["input"] == len(kept) + len(rejected) == 15
    reasons = rejected["reason"].value_counts().to_dict()  # empty.jsonl gives no row; stats count it
    assert reasons == {"parse_error": 7, "too_large": 1, "contaminated": 1, "exact_dup": 1}, rejected
    assert len(kept) == 5
    details = " ".join(rejected["detail"])
    assert "mixed.jsonl:3: not valid JSON" in details and "mixed.jsonl:4: text field 'text' missing" in details
    assert "cut.jsonl.gz:2: compressed stream ends early" in details
    assert "nofooter.parquet: cannot be opened as parquet" in details
    assert "latin1.txt: not valid UTF-8" in details and "blob.txt: binary file" in details
    assert f"shares a 13-gram with {leaked.item_id}" in details
    assert rejected.loc[rejected["reason"] == "too_large", "text"].iloc[0] == ""
    everything = " ".join(kept["text"]) + " ".join(rejected["text"])
    assert "jane.doe@example.org" not in everything and "4111 1111" not in everything and "<EMAIL>" in everything
    assert "cookies" not in everything and "<p>" not in everything
    index = load_contamination_index(result["outputs"]["contamination"])
    assert index == {"gsm8k": {leaked.item_id}}
    assert result["metrics"]["pii.email"] == 1 and result["metrics"]["pii.credit_card"] == 1
    stats = json.loads(Path(stage.fs_path("stats.json")).read_text())
    assert stats["accounting"]["holds"] and Path(stage.fs_path("stats.png")).stat().st_size > 1000
    assert stats["empty_files"] == {"count": 1, "files": ["empty.jsonl"]}


def test_a_failed_curate_says_what_failed_in_one_line_and_logs_the_traceback(ray_light, tmp_path, capfd):
    """A corpus of one oversize document: every step takes zero live rows, kept/ is an empty dataset,
    rejected/ holds the row, and the command ends with one line naming stage, step and log (no trace).
    Then a failure inside a Ray worker (the language filter without `langid`): the worker's traceback
    goes to the run log only."""
    import importlib.util

    from raylm.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "big.txt").write_text("word " * 400)  # over max_doc_bytes: rejected before near dedup
    workspace = tmp_path / "ws"
    common = ["--config", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"), "--workspace", str(workspace),
              "--set", f"data.sources=[{{path: {corpus}}}]"]
    assert main(["curate", *common, "--set", "data.max_doc_bytes=1000"]) == 1
    console = capfd.readouterr()
    last = console.err.strip().splitlines()[-1]
    assert last.startswith("raylm: curate failed in step 'accounting': AccountingError: no document survived"), last
    log_file = last.split("; full log: ")[1]
    assert "Traceback" not in console.err + console.out and "Traceback" in Path(log_file).read_text()
    attempt = next((workspace / "curate").glob("*/attempts/*"))
    assert pd.read_parquet(attempt / "kept" / "train").empty  # an empty dataset with the columns
    assert pd.read_parquet(attempt / "rejected")["reason"].tolist() == ["too_large"]

    if importlib.util.find_spec("langid") is not None:
        return  # the worker failure below needs langid to be absent
    assert main(["curate", *common, "--set", "data.quality.languages=[en]"]) == 1
    console = capfd.readouterr()
    last = console.err.strip().splitlines()[-1]
    assert last.startswith("raylm: curate failed in step 'read, clean and filter': ImportError: "
                           "data.quality.languages needs the `langid` package"), last
    log_text = Path(last.split("; full log: ")[1]).read_text()
    assert "Traceback" not in console.err + console.out and "ModuleNotFoundError" in log_text



def test_real_corpora_boilerplate_gutenberg_and_book_duplicates(ray_light, tmp_path, shared_data):
    corpora = shared_data / "corpora"
    config = DataConfig(sources=[SourceConfig(path=str(corpora / "c4-sample"), name="c4"),
                                 # 12 of the 23 books (CI time): both copies of Alice and of Moby Dick, the six
                                 # Project Gutenberg files, and three by one author (near in style, not copies)
                                 SourceConfig(path=str(corpora / "gutenberg" / "*" / "[pcm]*.txt"), name="gutenberg")],
                        val_fraction=0.01)
    stage = Workspace(str(tmp_path / "ws")).stage("curate", {"t": 2})
    stage.prepare(force=True)
    result = curate(config, stage).to_manifest()  # the keys the stage's manifest.json holds
    kept = read_kept(result)
    rejected = pd.read_parquet(result["outputs"]["rejected"])
    assert result["counts"]["input"] == len(kept) + len(rejected)

    c4_text = " ".join(kept.loc[kept["source"] == "c4", "text"])
    assert result["metrics"]["clean.boilerplate_docs"] > 10
    assert "We use cookies" not in c4_text and "All rights reserved" not in c4_text

    def locator(frame):
        return frame["meta"].map(lambda m: json.loads(m)["locator"])

    books = kept[kept["source"] == "gutenberg"].assign(locator=locator)
    moby = books.loc[books["locator"].str.contains("2701|moby"), "text"]
    assert all("PROJECT GUTENBERG EBOOK" not in text for text in books["text"])
    dups = rejected[rejected["reason"] == "near_dup"].assign(locator=locator)
    dup_books = set(dups.loc[dups["source"] == "gutenberg", "locator"])
    pairs = [("pg11.txt", "carroll-alice.txt"), ("pg2701.txt", "melville-moby_dick.txt")]
    for first, second in pairs:  # exactly one of each pair is rejected as the other's near duplicate
        assert sum(any(name in loc for loc in dup_books) for name in (first, second)) == 1, dup_books
    assert len(dup_books) == 2, dup_books  # no other book is anyone's near duplicate
    assert len(moby) == 1
