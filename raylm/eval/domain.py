"""A HellaSwag-style task from the held-out split of the user's own corpus.

Each item takes one held-out document: its first words are the context, the words that follow are
the true ending, and the distractors are endings cut the same way from other held-out documents.
The model must prefer the real continuation. Items, distractors and the gold position are fixed by
a seed, so the task is the same on every run. It runs through lm-eval as a multiple-choice task
(acc and acc_norm, like HellaSwag), with item ids `domain/<index>`.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import yaml


def read_texts(path: str) -> Iterator[str]:
    """Document texts from a parquet file or folder (curated split), jsonl (`text`), or plain text (one doc per
    blank-line paragraph), on any store the workspace can be on (a local path, `s3://`, `gs://`)."""
    # deferred: pulls in pyarrow, slow to import; only this path needs it
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    from raylm.storage import filesystem_for

    fs, fs_path = filesystem_for(path)
    suffix = PurePosixPath(fs_path).suffix
    if suffix == ".parquet" or fs.get_file_info(fs_path).type == pafs.FileType.Directory:
        table = ds.dataset(fs_path, filesystem=fs, format="parquet").to_table(columns=["text"])
        yield from (t for t in table.column("text").to_pylist() if t)
        return
    with fs.open_input_stream(fs_path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as handle:
        if suffix in (".jsonl", ".json"):
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as error:
                        raise ValueError(f"{path}:{number}: expected a JSON object with 'text' ({error})") from error
        else:
            yield from (p.strip() for p in handle.read().split("\n\n") if p.strip())


def build_items(texts: Iterable[str], n_items: int = 200, context_words: int = 24, ending_words: int = 12,
                n_choices: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    pieces = []
    for text in texts:
        words = text.split()
        if len(words) >= context_words + ending_words:
            pieces.append((" ".join(words[:context_words]), " ".join(words[context_words:context_words + ending_words])))
    if len(pieces) < n_choices:
        raise ValueError(f"domain task: need at least {n_choices} held-out documents of {context_words + ending_words}+ "
                         f"words, found {len(pieces)}")
    order = list(range(len(pieces)))
    rng.shuffle(order)
    items = []
    for index, doc in enumerate(order[:n_items]):
        others = rng.sample([i for i in range(len(pieces)) if i != doc], n_choices - 1)
        endings = [pieces[i][1] for i in others]
        gold = rng.randrange(n_choices)
        endings.insert(gold, pieces[doc][1])
        items.append({"context": pieces[doc][0], "endings": endings, "label": gold, "raylm_id": f"domain/{index}"})
    return items


def write_domain_task(items: list[dict[str, Any]], out_dir: str | Path, name: str = "domain") -> str:
    out = Path(out_dir)
    data = out / "data" / f"{name}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(data, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    config = {
        "task": name, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "output_type": "multiple_choice",
        "test_split": "test", "doc_to_text": "{{context}}", "doc_to_target": "{{label}}", "doc_to_choice": "endings",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    with open(out / f"{name}.yaml", "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False, allow_unicode=True)
    return name
