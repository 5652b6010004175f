"""What each stage hands the next: small frozen dataclasses, written to and read from `manifest.json`.

A stage body returns its artifact; `raylm.stage.execute` writes `to_manifest()` (plus the bookkeeping
every stage folder gets: uri, key, fingerprint, config, inputs, code version, MLflow run id) and hands
back `from_manifest(...)` of what it wrote, or of the manifest a finished folder already holds. So a
consumer takes `packed.tokenizer.pad_id` or `packed.val_uri`, and a renamed key fails in one place,
here, instead of on the cluster. `to_manifest()` writes the keys manifests always had (stage hashes
and older stage folders stay valid). Plain data only: nothing here imports Ray, MLflow or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Keys the tokenize stage writes about its tokenizer that the SFT data stage (which reuses the base
# model's tokenizer, not a trained one) does not.
TRAINED_TOKENIZER_KEYS = ("folder", "source", "bos_id", "special_tokens")


@dataclass(frozen=True)
class TokenizerRef:
    """The tokenizer packed data was encoded with: where its tokenizer.json is, and the ids training needs."""

    path: str
    vocab_size: int
    pad_id: int
    eos_id: int
    fingerprint: str | None = None
    folder: str | None = None  # the Hugging Face tokenizer folder (trained tokenizers only)
    source: str | None = None  # 'trained' or the reused path
    bos_id: int | None = None
    special_tokens: dict[str, int] | None = None

    def to_manifest(self) -> dict[str, Any]:
        data = {"path": self.path, "folder": self.folder, "fingerprint": self.fingerprint, "source": self.source,
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "special_tokens": self.special_tokens}
        if self.folder is None:
            data = {key: value for key, value in data.items() if key not in TRAINED_TOKENIZER_KEYS}
        return data

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "TokenizerRef":
        return cls(path=data["path"], vocab_size=int(data["vocab_size"]), pad_id=int(data["pad_id"]),
                   eos_id=int(data["eos_id"]), fingerprint=data.get("fingerprint"), folder=data.get("folder"),
                   source=data.get("source"), bos_id=data.get("bos_id"), special_tokens=data.get("special_tokens"))


@dataclass(frozen=True)
class StageRecord:
    """Where a finished stage lives and which MLflow run wrote it (set from its manifest)."""

    uri: str = ""
    mlflow_run_id: str | None = None

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "StageRecord":
        return cls(uri=data.get("uri", ""), mlflow_run_id=data.get("mlflow_run_id"))


@dataclass(frozen=True)
class Curated:
    """The curate stage: kept splits and rejected rows (parquet folders), and the row accounting."""

    outputs: dict[str, str]  # kept/train, kept/val and rejected folders by name (train, val, rejected)
    counts: dict[str, int]  # input, kept, rejected, and rows per split
    metrics: dict[str, float] = field(default_factory=dict)
    record: StageRecord = StageRecord()

    @property
    def train_uri(self) -> str:
        return self.outputs["train"]

    @property
    def val_uri(self) -> str | None:
        return self.outputs.get("val")

    def rows(self, split: str) -> int:
        return int(self.counts.get(split, 0))

    def train_bytes(self) -> int | None:
        """The train split's bytes (kept bytes shared out by rows), when the metrics have them."""
        kept_bytes = self.metrics.get("bytes.kept")
        rows = self.rows("train") + self.rows("val")
        if kept_bytes is None or not rows:
            return None
        return int(kept_bytes * self.rows("train") / rows)

    def to_manifest(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "outputs": dict(self.outputs), "counts": dict(self.counts)}

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "Curated":
        return cls(outputs=dict(data["outputs"]), counts=dict(data["counts"]), metrics=dict(data.get("metrics", {})),
                   record=StageRecord.from_manifest(data))


@dataclass(frozen=True)
class Packed:
    """Packed token sequences (tokenize stage, or SFT data): parquet folders of rows of seq_len + 1 ids."""

    tokenizer: TokenizerRef
    seq_len: int
    outputs: dict[str, str]  # split -> folder, only for splits that have sequences
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> documents, sequences, tokens, bytes
    packing: str | None = None  # greedy | best_fit (the tokenize stage)
    loss_mask: bool | None = None  # SFT data: rows carry a loss_mask column
    metrics: dict[str, float] = field(default_factory=dict)
    record: StageRecord = StageRecord()

    @property
    def train_uri(self) -> str:
        return self.outputs["train"]

    @property
    def val_uri(self) -> str | None:
        return self.outputs.get("val")

    def require_val(self, what: str) -> str:
        """The val split's folder; a clear error naming how to get one when packing left it empty."""
        if self.val_uri is None:
            raise ValueError(f"the packed val split of {self.record.uri or 'this data'} is empty: {what}")
        return self.val_uri

    def to_manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = {"metrics": dict(self.metrics), "tokenizer": self.tokenizer.to_manifest(),
                                "seq_len": self.seq_len}
        if self.packing is not None:
            data["packing"] = self.packing
        data["splits"] = dict(self.splits)
        if self.loss_mask is not None:
            data["loss_mask"] = self.loss_mask
        data["outputs"] = dict(self.outputs)
        return data

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "Packed":
        return cls(tokenizer=TokenizerRef.from_manifest(data["tokenizer"]), seq_len=int(data["seq_len"]),
                   outputs=dict(data["outputs"]), splits=dict(data.get("splits", {})), packing=data.get("packing"),
                   loss_mask=data.get("loss_mask"), metrics=dict(data.get("metrics", {})),
                   record=StageRecord.from_manifest(data))


@dataclass(frozen=True)
class Pretrained:
    """The pretrain stage: the best checkpoint (by val loss), the last one, and what they hold."""

    checkpoint: str
    last_checkpoint: str
    run_path: str
    model: dict[str, Any]  # the trained TransformerConfig's to_dict()
    tokenizer: TokenizerRef
    metrics: dict[str, float] = field(default_factory=dict)
    record: StageRecord = StageRecord()

    def to_manifest(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "checkpoint": self.checkpoint, "last_checkpoint": self.last_checkpoint,
                "run_path": self.run_path, "model": dict(self.model), "tokenizer": self.tokenizer.to_manifest()}

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "Pretrained":
        return cls(checkpoint=data["checkpoint"], last_checkpoint=data["last_checkpoint"], run_path=data["run_path"],
                   model=dict(data["model"]), tokenizer=TokenizerRef.from_manifest(data["tokenizer"]),
                   metrics=dict(data.get("metrics", {})), record=StageRecord.from_manifest(data))


@dataclass(frozen=True)
class Finetuned:
    """The finetune stage: the checkpoint to use (LoRA: merged), the method, and the base's lineage."""

    checkpoint: str
    last_checkpoint: str
    run_path: str
    method: str
    finetune: dict[str, Any]  # the spec every worker's prepare_for_finetune took
    base: dict[str, Any]  # checkpoint, kind, source, mlflow_run_id of the base model
    model: dict[str, Any]
    tokenizer: TokenizerRef
    adapter_checkpoint: str | None = None
    merged_checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    record: StageRecord = StageRecord()

    def to_manifest(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "checkpoint": self.checkpoint,
                "adapter_checkpoint": self.adapter_checkpoint, "merged_checkpoint": self.merged_checkpoint,
                "last_checkpoint": self.last_checkpoint, "run_path": self.run_path, "method": self.method,
                "finetune": dict(self.finetune), "base": dict(self.base), "model": dict(self.model),
                "tokenizer": self.tokenizer.to_manifest()}

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "Finetuned":
        return cls(checkpoint=data["checkpoint"], last_checkpoint=data["last_checkpoint"], run_path=data["run_path"],
                   method=data["method"], finetune=dict(data["finetune"]), base=dict(data["base"]),
                   model=dict(data["model"]), tokenizer=TokenizerRef.from_manifest(data["tokenizer"]),
                   adapter_checkpoint=data.get("adapter_checkpoint"), merged_checkpoint=data.get("merged_checkpoint"),
                   metrics=dict(data.get("metrics", {})), record=StageRecord.from_manifest(data))


@dataclass(frozen=True)
class Evaluated:
    """The eval stage: held-out figures of a checkpoint."""

    checkpoint: str
    metrics: dict[str, float] = field(default_factory=dict)
    record: StageRecord = StageRecord()

    def to_manifest(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "checkpoint": self.checkpoint}

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "Evaluated":
        return cls(checkpoint=data["checkpoint"], metrics=dict(data.get("metrics", {})),
                   record=StageRecord.from_manifest(data))


Artifact = Curated | Packed | Pretrained | Finetuned | Evaluated
