"""What each stage read, as MLflow dataset inputs of its run: which corpus made which model.

Curate logs its sources, tokenize the curated splits, pretrain and finetune the packed splits they
train and validate on. Each dataset's source is the data's URI and its digest the hash of the stage
that wrote it (for raw sources, of their file names, sizes and times), with row or token counts as
input tags and the columns as its schema; the MLflow UI shows them in the runs' dataset column and on
the logged model's lineage. Nothing here reads the data.
"""

from __future__ import annotations

from raylm import tracking
from raylm.artifacts import Curated, Packed
from raylm.config import DataConfig

DOCUMENT_COLUMNS = {"id": "string", "text": "string", "source": "string"}
CONTEXTS = {"train": "training", "val": "validation"}


def log_sources(data: DataConfig, digest: str, curated: Curated) -> None:
    """Curate's inputs: every configured source (the row count covers all sources together)."""
    for index, source in enumerate(data.sources):
        tracking.log_dataset(f"source[{index}]", source.path, digest, "curation",
                             {"rows_input_all_sources": curated.counts.get("input", 0), "sources": len(data.sources)},
                             {source.text_field: "string"})


def log_curated(curated: Curated, digest: str) -> None:
    """Tokenize's inputs: the curated train split (tokenizer training and packing) and val split (packing)."""
    for split, uri in (("train", curated.train_uri), ("val", curated.val_uri)):
        if uri:
            tracking.log_dataset(f"curated/{split}", uri, digest, CONTEXTS[split], {"rows": curated.rows(split)},
                                 DOCUMENT_COLUMNS)


def log_packed(packed: Packed, digest: str, name: str = "packed") -> None:
    """A training stage's inputs: the packed train and val splits, with their sequence and token counts."""
    columns = {"tokens": "list<integer>", **({"loss_mask": "list<integer>"} if packed.loss_mask else {})}
    for split, uri in packed.outputs.items():
        counts = {k: v for k, v in packed.splits.get(split, {}).items() if isinstance(v, (int, float))}
        tracking.log_dataset(f"{name}/{split}", uri, digest, CONTEXTS.get(split, split),
                             {**counts, "seq_len": packed.seq_len}, columns)


def packed_dataset(packed: Packed, digest: str, split: str = "val", name: str = "packed"):
    """The MLflow dataset of one packed split (eval links its scores to it)."""
    uri = packed.outputs.get(split)
    return tracking.dataset(f"{name}/{split}", uri, digest, {"tokens": "list<integer>"}) if uri else None
