"""Readers of the benchmark layouts in ../shared/data/benchmarks (skipped when the folder is absent)."""

from __future__ import annotations

from collections import Counter

import pytest

from raylm.data.benchmarks import benchmark_files, iter_benchmark_items, mmlu_dev_file, read_mmlu

EXPECTED_COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "truthfulqa_mc": 817,
                   "gsm8k": 1319, "humaneval": 164, "mt_bench": 80}


@pytest.fixture(scope="module")
def benchmarks(shared_data):
    return shared_data / "benchmarks"


def test_every_layout_reads_with_the_documented_counts(benchmarks):
    counts = Counter(item.task for item in iter_benchmark_items(benchmarks))
    for task, expected in EXPECTED_COUNTS.items():
        assert counts[task] == expected, task
    mmlu = {t: n for t, n in counts.items() if t.startswith("mmlu_")}
    assert len(mmlu) == 57 and sum(mmlu.values()) == 14042


def test_items_are_parsed_and_ids_stable(benchmarks):
    first = next(iter_benchmark_items(benchmarks, ["hellaswag"]))
    assert first.item_id == "hellaswag/0" and first.record["gold"] == 3 and len(first.record["endings"]) == 4
    assert first.record["activity_label"] == "Roof shingle removal"
    arc = next(iter_benchmark_items(benchmarks, ["arc_easy"]))
    assert not arc.record["question"].startswith("Question:") and arc.record["choices"][arc.record["gold"]] in arc.text
    ids = [i.item_id for i in iter_benchmark_items(benchmarks, ["gsm8k"])]
    assert ids == [i.item_id for i in iter_benchmark_items(benchmarks, ["gsm8k"])] and len(set(ids)) == len(ids)
    dev = list(read_mmlu(mmlu_dev_file(benchmarks, "abstract_algebra"), "mmlu_abstract_algebra"))
    assert len(dev) == 5 and all(0 <= d.record["gold"] < 4 for d in dev)


def test_unknown_task_is_refused(benchmarks):
    with pytest.raises(ValueError, match="no benchmark files for \\['nope'\\]"):
        list(iter_benchmark_items(benchmarks, ["nope"]))
    assert "arc_easy" in benchmark_files(benchmarks)
