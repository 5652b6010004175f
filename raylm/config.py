"""Typed configuration for every raylm stage.

One experiment is one YAML file with a section per stage (`data`, `tokenizer`, `model`, `train`,
`tune`, `finetune`, `eval`, `cluster`) plus `workspace` and `tracking`. Command lines add
`--set section.key=value` overrides, typed the same way as YAML (`--set train.lr=3e-4` is a float).

Everything is validated before any work starts. Errors name the dotted key, the value and what was
expected; an unknown key lists the valid keys of its section. Defaults are sized for a laptop.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from tokenizers import Tokenizer

from raylm.model.config import TransformerConfig
from raylm.recipe import with_recipe

REMOTE_SCHEMES = ("s3://", "gs://", "hf://", "http://", "https://", "file://")
BUILTIN_SOURCES = ("python-stdlib",)
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "laptop.yaml"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every offending key."""

    def __init__(self, problems: list[str], origin: str | None = None):
        self.problems, self.origin = problems, origin
        head = f"invalid configuration{f' in {origin}' if origin else ''}:"
        super().__init__("\n".join([head, *[f"  - {p}" for p in problems]]))

    def __reduce__(self):  # raised in a Ray worker, it is pickled to the driver: rebuild it from its parts
        return type(self), (self.problems, self.origin)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _is_local_path(path: str) -> bool:
    return not path.startswith(REMOTE_SCHEMES) and path not in BUILTIN_SOURCES


def _check_local_path_exists(path: str) -> str:
    if _is_local_path(path):
        if any(ch in path for ch in "*?["):
            if not glob.glob(path, recursive=True):
                raise ValueError(f"no file matches the pattern {path!r}")
        elif not os.path.exists(path):
            raise ValueError(f"path does not exist: {os.path.abspath(path)}")
    return path


def _existing_absolute_path(path: str) -> str:
    """A local path that exists, made absolute: Ray's workers (a Tune trial re-reading the config, an
    evaluation actor) run in other folders than the command. Remote URIs are kept as they are."""
    _check_local_path_exists(path)
    return os.path.abspath(path) if _is_local_path(path) else path


# ----------------------------------------------------------------------------------------------
# Sections


class SourceConfig(Section):
    """One input of the corpus: a file, folder, glob, object-store URI, `hf://org/name`, or a
    built-in corpus (`python-stdlib`: the running interpreter's standard library)."""

    path: str = "python-stdlib"
    format: Literal["auto", "jsonl", "json", "parquet", "text", "markdown"] = "auto"
    text_field: str = "text"
    id_field: str | None = None
    doc_per: Literal["file", "paragraph"] = Field(
        "file", description="text and markdown files: one document per file, or one per blank-line-separated "
        "block (`paragraph`, located as file#n); JSON rows are one document each either way")
    weight: float = Field(1.0, gt=0)
    max_bytes: int | None = Field(None, gt=0, description="sample the source down to about this many bytes")
    name: str | None = None
    split: str = Field("train", description="split of a Hugging Face dataset (hf://org/name)")

    _exists = field_validator("path")(_check_local_path_exists)

    @property
    def label(self) -> str:
        return self.name or self.path


class CleanConfig(Section):
    """Cleaning steps, each switchable; each reports how many documents and bytes it changed."""

    unicode: Literal["NFC", "NFKC", "none"] = "NFC"
    html: Literal["auto", "always", "never"] = Field("auto", description="auto: parse documents that look like HTML")
    boilerplate: bool = Field(True, description="drop cookie/policy notices, navigation lines, lorem ipsum")
    terminal_punctuation: bool = Field(False, description="C4 rule: drop lines not ending in . ! ? or a quote")
    gutenberg: bool = Field(True, description="cut Project Gutenberg headers and footers")
    symbols: bool = Field(True, description="drop control characters, emoji and other non-text symbols")
    whitespace: bool = True


class QualityConfig(Section):
    """Gopher-style document filters; each rejects with `quality:<rule>`. `null` turns a rule off."""

    enabled: bool = True
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(1_000_000, gt=0)
    min_mean_word_length: float | None = Field(None, ge=0)
    max_mean_word_length: float | None = Field(None, gt=0)
    max_symbol_word_ratio: float | None = Field(None, ge=0)
    max_bullet_lines: float | None = Field(None, ge=0, le=1)
    max_ellipsis_lines: float | None = Field(None, ge=0, le=1)
    min_alpha_words: float | None = Field(None, ge=0, le=1)
    max_duplicate_lines: float | None = Field(None, ge=0, le=1)
    max_duplicate_paragraphs: float | None = Field(None, ge=0, le=1)
    max_duplicate_line_chars: float | None = Field(None, ge=0, le=1)
    max_top_ngram: dict[int, float] = Field(default_factory=dict, description="{n: max share of chars in the top n-gram}, e.g. {2: 0.2, 3: 0.18, 4: 0.16}")
    max_duplicate_ngram: dict[int, float] = Field(default_factory=dict, description="{n: max share of chars in duplicated n-grams}, e.g. {5: 0.15, ..., 10: 0.10}")
    min_stop_words: int | None = Field(None, ge=0, description="Gopher: at least this many English stop words")
    languages: list[str] | None = Field(None, description="keep only these languages (langid); null: no language id")
    min_language_score: float = Field(0.5, ge=0, le=1)

    @classmethod
    def gopher(cls) -> "QualityConfig":
        """The thresholds of the Gopher paper (Rae et al. 2021), for web text."""
        return cls(min_words=50, max_words=100_000, min_mean_word_length=3, max_mean_word_length=10,
                   max_symbol_word_ratio=0.1, max_bullet_lines=0.9, max_ellipsis_lines=0.3, min_alpha_words=0.8,
                   max_duplicate_lines=0.3, max_duplicate_paragraphs=0.3, max_duplicate_line_chars=0.2,
                   max_top_ngram={2: 0.2, 3: 0.18, 4: 0.16},
                   max_duplicate_ngram={5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}, min_stop_words=2)


class PIIConfig(Section):
    """Redaction of private data and secrets with typed placeholders such as `<EMAIL>`."""

    enabled: bool = True
    types: list[Literal["email", "phone", "ip", "credit_card", "ssn", "iban", "secret"]] = Field(
        default_factory=lambda: ["email", "phone", "ip", "credit_card", "ssn", "iban", "secret"])
    phone_region: str = Field("US", description="ISO 3166 country (two letters) whose national format is read for "
                                                "phone numbers written without a +country code (libphonenumber)")

    @field_validator("phone_region")
    @classmethod
    def _known_region(cls, region: str) -> str:
        import phonenumbers  # deferred: only this check and data/pii.py need it

        region = region.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{region!r} is not a region libphonenumber knows; expected an ISO 3166 alpha-2 code "
                             "such as US, GB, DE, FR, IN")
        return region


class DedupConfig(Section):
    """Exact dedup on normalised text and MinHash LSH near dedup (the smallest id of a cluster stays)."""

    exact: bool = True
    near: bool = True
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_size: int = Field(5, ge=1, description="words per shingle")
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity that makes a near duplicate")
    false_negative_weight: float = Field(0.9, gt=0, lt=1, description="datasketch optimal-parameter weight of misses (the rest: false positives)")
    verify: Literal["exact", "signature", "none"] = Field(
        "exact", description="check each LSH candidate pair against the threshold: exact: its true shingle Jaccard "
                             "(on Ray Data; precision 1); signature: its MinHash estimate; none: keep every candidate")
    max_bucket: int = Field(200, gt=1, description="compare all pairs in buckets up to this size, beyond it only pairs with the smallest ids")
    seed: int = 1

    @field_validator("verify", mode="before")
    @classmethod
    def _verify_from_bool(cls, value: Any) -> Any:
        """Older configs said `verify: true` (signature check) or `false` (none)."""
        if isinstance(value, bool):  # as raylm.data.dedup.verify_mode reads them
            return "signature" if value else "none"
        return value


class DecontamConfig(Section):
    """Benchmark decontamination by shared word n-grams (off unless `benchmarks` is set)."""

    benchmarks: str | None = Field(None, description="folder of benchmark files, e.g. ../shared/data/benchmarks")
    tasks: list[str] | None = Field(None, description="benchmark tasks to check (default: all found)")
    ngram: int = Field(13, ge=3)
    mode: Literal["drop", "flag"] = Field("drop", description="drop: reject as `contaminated`; flag: keep and note in meta")

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks_exist(cls, path: str | None) -> str | None:
        return None if path is None else _check_local_path_exists(path)


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(max_bytes=4_000_000)])
    val_fraction: float = Field(0.05, gt=0, lt=1)
    min_chars: int = Field(1, ge=1, description="documents shorter than this after cleaning are rejected as empty")
    max_doc_bytes: int = Field(20_000_000, gt=0, description="longer documents are rejected as `too_large`")
    seed: int = 0
    num_blocks: int | None = Field(None, gt=0, description="Ray Data blocks to read into (default: Ray decides)")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)

    @field_validator("sources")
    @classmethod
    def _at_least_one(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        if not sources:
            raise ValueError("at least one source is needed")
        return sources


class TokenizerConfig(Section):
    """Byte-level BPE trained on a streamed sample of the curated train split, and sequence packing."""

    vocab_size: int = Field(4096, gt=0, description="including the 256 byte tokens and the special tokens")
    min_frequency: int = Field(2, ge=1, description="a pair merges only when seen at least this often")
    sample_bytes: int = Field(20_000_000, gt=0, description="train the tokenizer on about this much train text")
    pre_tokenizer: Literal["gpt2", "gpt4"] = Field("gpt4", description="regex that splits text before BPE")
    max_digits: int = Field(1, ge=1, le=3, description="digit runs are split into pieces of at most this many")
    special_tokens: list[str] = Field(
        default_factory=lambda: ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        description="added tokens, ids 0.. in this order; must include <|eos|> and <|pad|>")
    path: str | None = Field(None, description="reuse this tokenizer (tokenizer.json, its folder, or runs:/RUN_ID/tokenizer)")
    packing: Literal["greedy", "best_fit"] = Field(
        "greedy", description="greedy: cut the joined stream; best_fit: never split a document that fits a sequence")
    batch_size: int = Field(256, gt=0, description="documents per map_batches call when tokenizing and packing")
    concurrency: int | None = Field(None, gt=0, description="Ray Data tokenize workers (default: Ray decides)")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, path: str | None) -> str | None:
        if path is None or path.startswith("runs:/") or not _is_local_path(path):
            return path
        _check_local_path_exists(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"no tokenizer.json in the folder {os.path.abspath(path)}")

        try:
            Tokenizer.from_file(file)
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
            raise ValueError(f"{file} is not a tokenizer.json that `tokenizers` can parse ({error})") from None
        return path

    @field_validator("special_tokens")
    @classmethod
    def _specials(cls, tokens: list[str]) -> list[str]:
        missing = [t for t in ("<|eos|>", "<|pad|>") if t not in tokens]
        if missing:
            raise ValueError(f"must include {missing} (documents are joined with <|eos|>, sequences padded with <|pad|>)")
        if len(set(tokens)) != len(tokens):
            raise ValueError("special tokens must be distinct")
        return tokens

    @model_validator(mode="after")
    def _vocab_holds_alphabet(self) -> "TokenizerConfig":
        smallest = 256 + len(self.special_tokens)
        if self.path is None and self.vocab_size < smallest:
            raise ValueError(f"tokenizer.vocab_size = {self.vocab_size} is smaller than the 256-byte alphabet plus "
                             f"{len(self.special_tokens)} special tokens ({smallest})")
        return self


class BudgetConfig(Section):
    """How much training a run gets, instead of `train.max_steps`: exactly one of training FLOPs, tokens,
    tokens per model parameter, or minutes of training-step wall clock. The trainer turns it into the
    step count with the model's FLOPs per token (raylm/model/sizing.py) and the global batch, so the
    schedule completes within it (raylm/train/budget.py)."""

    flops: float | None = Field(None, gt=0, description="training FLOPs (6 N D convention plus attention), e.g. 1e15")
    tokens: float | None = Field(None, gt=0, description="training tokens, e.g. 2e8")
    tokens_per_parameter: float | None = Field(None, gt=0, description="training tokens per model parameter (20: "
                                               "Chinchilla's compute-optimal)")
    minutes: float | None = Field(None, gt=0, description="wall clock of the training steps (evaluation and "
                                  "checkpoints come on top): throughput is measured over the first measure_steps "
                                  "steps, then the step count is fixed and logged")
    measure_steps: int = Field(10, gt=0, description="minutes budget: steps timed before the step count is fixed "
                               "(the first step, with its start-up costs, is not counted)")

    @model_validator(mode="after")
    def _exactly_one(self) -> "BudgetConfig":
        given = [key for key in BUDGET_KINDS if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of {', '.join(BUDGET_KINDS)}, got "
                             f"{', '.join(given) if given else 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(key for key in BUDGET_KINDS if getattr(self, key) is not None)

    @property
    def amount(self) -> float:
        return getattr(self, self.kind)


BUDGET_KINDS = ("flops", "tokens", "tokens_per_parameter", "minutes")


class TrainConfig(Section):
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: replicas; fsdp: FSDP2 fully_shard per block, then the root")
    workers: int | tuple[int, int] = Field(1, description="a number, or [min, max] for elastic training")
    use_gpu: bool | Literal["auto"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    activation_checkpointing: bool = Field(False, description="turns on model.activation_checkpointing for this run "
                                           "(kept so that `raylm plan --write` can recommend it per run)")
    compile: bool = Field(False, description="torch.compile the model")
    global_batch_tokens: int | None = Field(None, gt=0, description="tokens per optimizer step (overrides global_batch_size; a multiple of model.seq_len)")
    elastic_resize_interval_s: float = Field(10.0, gt=0, description="how often an elastic run checks for more workers")
    health_check_interval_s: float = Field(1.0, gt=0, description="how often Ray Train polls its workers, so how soon "
                                           "a lost worker is noticed (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; Ray's default: 2)")
    worker_group_start_timeout_s: float | None = Field(None, gt=0, description="how long a restart waits for a worker "
                                                       "group of the size it asked for before giving up on it "
                                                       "(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S); default: 15 for an "
                                                       "elastic run, which then tries fewer workers (a dead node can "
                                                       "still look alive), Ray's 60 otherwise")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs Ray reserves for each training worker, and its "
                                          "torch threads; default: the workers share the free CPUs (a GPU node's "
                                          "split among its GPUs), see raylm/train/resources.py; a fraction such as "
                                          "0.5 lets more workers than cores share a small machine")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    max_steps: int = Field(300, gt=0, description="optimizer steps; `null` (or leaving it out) with train.budget")
    budget: BudgetConfig | None = Field(None, description="train for flops, tokens, tokens_per_parameter or minutes "
                                        "instead of max_steps (exactly one)")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="cosine: warmup then cosine decay to "
                                               "min_lr_ratio; wsd: warmup, stable peak, linear cool-down over the "
                                               "last decay_fraction of the steps")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent cooling down")
    optimizer: Literal["adamw", "muon"] = Field("adamw", description="adamw: AdamW on everything; muon: Muon "
                                                "(torch.optim.Muon) on the blocks' 2-D weight matrices, AdamW (lr, "
                                                "betas) on embeddings, head, norms and biases; under fsdp each "
                                                "matrix's update is gathered and orthogonalised whole")
    muon_lr: float = Field(0.02, gt=0, description="Muon's peak learning rate (scaled by sqrt(max(1, rows/cols)) "
                           "per matrix, as torch.optim.Muon does)")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's (Nesterov) momentum")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)
    micro_batch_size: int = Field(8, gt=0, description="sequences per worker per forward pass")
    global_batch_size: int = Field(16, gt=0, description="sequences per optimizer step, across all workers")
    eval_every: int = Field(50, gt=0)
    eval_sequences: int = Field(64, gt=0, description="val sequences per evaluation")
    eval_at_start: bool = Field(False, description="also evaluate the untrained model at step 0 (reported as "
                                "val_loss_initial; fine-tuning always does, for its before/after)")
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    report_every: int = Field(10, gt=0, description="steps between ray.train.report calls (each waits for the controller)")
    early_stopping_patience: int | None = Field(None, gt=0)
    max_failures: int = Field(0, ge=0)
    seed: int = 0
    deterministic: bool = Field(False, description="torch deterministic algorithms (exact resume tests)")

    @model_validator(mode="before")
    @classmethod
    def _null_max_steps_is_unset(cls, data: Any) -> Any:
        """`max_steps: null` (e.g. `--set train.max_steps=null` over a file that sets it) leaves it unset."""
        if isinstance(data, dict) and "max_steps" in data and data["max_steps"] is None:
            data = {k: v for k, v in data.items() if k != "max_steps"}
        return data

    @model_validator(mode="after")
    def _recipe_rules(self) -> "TrainConfig":
        if self.budget is not None and "max_steps" in self.model_fields_set:
            raise ValueError(f"train.max_steps = {self.max_steps} and train.budget.{self.budget.kind} = "
                             f"{self.budget.amount:g} both set the length of the run: keep one (--set "
                             "train.max_steps=null drops a max_steps the file sets)")
        return self

    @field_validator("workers", mode="before")
    @classmethod
    def _parse_workers(cls, value: Any) -> Any:
        if isinstance(value, str) and "-" in value:
            low, _, high = value.partition("-")
            return (low.strip(), high.strip())
        if isinstance(value, list):
            return tuple(value)
        return value

    @field_validator("workers")
    @classmethod
    def _workers_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1:
            raise ValueError(f"workers must be >= 1, got {low}")
        if low > high:
            raise ValueError(f"min workers ({low}) > max workers ({high})")
        return value

    @property
    def min_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[0]

    @property
    def max_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[1]

    def global_batch_sequences(self, seq_len: int) -> int:
        """Sequences per optimizer step: fixed whatever the number of workers."""
        if self.global_batch_tokens is None:
            return self.global_batch_size
        if self.global_batch_tokens % seq_len:
            raise ValueError(f"train.global_batch_tokens = {self.global_batch_tokens}: expected a multiple of "
                             f"model.seq_len ({seq_len})")
        return self.global_batch_tokens // seq_len

    @model_validator(mode="after")
    def _batch_covers_workers(self) -> "TrainConfig":
        if self.global_batch_size < self.max_workers:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be >= max workers ({self.max_workers}) "
                "so that every worker gets at least one sequence"
            )
        return self


SEARCH_KINDS = ("loguniform", "uniform", "choice", "grid")
TUNABLE_SECTIONS = {"model": TransformerConfig, "train": TrainConfig}


def section_fields(section: Any) -> dict[str, Any]:
    """The fields of a section class: a pydantic model's, or the pydantic dataclass `TransformerConfig`'s."""
    return getattr(section, "__pydantic_fields__", None) or getattr(section, "model_fields", {})


def search_space_problems(space: dict[str, Any]) -> list[str]:
    """Shape errors of a `tune.search_space`, each naming `tune.search_space.<key>`.

    Each entry is `section.key: {kind: values}`: `loguniform`/`uniform` take `[low, high]` with
    low < high (loguniform: low > 0), `choice`/`grid` a non-empty list. Keys must name a field of a
    section a trial runs (`model`, `train`); each value must be valid for that field on its own.
    """
    problems = []
    for key, spec in space.items():
        where = f"tune.search_space.{key}"
        section, _, field = key.partition(".")
        owner = TUNABLE_SECTIONS.get(section)
        if owner is None or not field or "." in field:
            problems.append(f"{where}: unknown key; expected `model.<key>` or `train.<key>` (a trial runs pretraining)")
            continue
        if field not in section_fields(owner):
            problems.append(f"{where}: unknown key {field!r} in {section!r}; valid keys: {', '.join(sorted(section_fields(owner)))}")
            continue
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            problems.append(f"{where} = {spec!r}: expected exactly one of {', '.join(SEARCH_KINDS)} with a list of values")
            continue
        kind, values = next(iter(spec.items()))
        if kind in ("loguniform", "uniform"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                problems.append(f"{where}.{kind} = {values!r}: expected [low, high], two numbers")
                continue
            low, high = values
            if not low < high:
                problems.append(f"{where}.{kind} = {values!r}: empty range (low must be < high)")
                continue
            if kind == "loguniform" and low <= 0:
                problems.append(f"{where}.{kind} = {values!r}: loguniform needs low > 0")
                continue
        elif not values:
            problems.append(f"{where}.{kind} = []: empty list of values")
            continue
        for value in values:
            try:
                TypeAdapter(owner).validate_python({field: value})
            except ValidationError as error:
                for item in error.errors():
                    if item["loc"][:1] == (field,):
                        problems.append(f"{where}.{kind}: value {value!r}: {item['msg'].removeprefix('Value error, ')}")
    return problems


class TuneConfig(Section):
    """A Ray Tune sweep: each trial is a pretraining run (its own TorchTrainer and workers)."""

    num_samples: int = Field(4, gt=0, description="samples of the space (a grid is repeated this many times)")
    max_concurrent: int | None = Field(None, gt=0, description="at most this many trials at once (default: what the cluster fits)")
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "none"] = "asha"
    search_algorithm: Literal["random", "optuna", "hyperopt"] = Field(
        "random", description="random (Tune's variant generator, grids too); optuna or hyperopt when installed")
    budget_steps: int | None = Field(None, gt=0, description="optimizer steps per trial (default: train.max_steps)")
    budget_tokens: int | None = Field(None, gt=0, description="training tokens per trial instead of steps (fair across batch sizes)")
    grace_period: int | None = Field(None, gt=0, description="ASHA: steps (or tokens) before a trial can be stopped (default: train.eval_every steps)")
    reduction_factor: float = Field(2.0, gt=1)
    seed: int = Field(0, description="seed of the search algorithm")
    search_space: dict[str, dict[str, list[Any]]] = Field(
        default_factory=lambda: {
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "train.global_batch_size": {"choice": [8, 16, 32]},
        }
    )

    @field_validator("search_space", mode="before")
    @classmethod
    def _numbers_from_yaml(cls, space: Any) -> Any:
        """YAML 1.1 reads `1e-4` as a string; read such values as numbers, as `--set` does."""
        if not isinstance(space, dict):
            return space
        return {key: ({kind: [_typed_value(v) if isinstance(v, str) else v for v in values]
                       for kind, values in spec.items()} if isinstance(spec, dict) and all(
                           isinstance(v, list) for v in spec.values()) else spec)
                for key, spec in space.items()}

    @field_validator("search_space")
    @classmethod
    def _valid_space(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        if not space:
            raise ValueError("empty search space: name at least one key, e.g. train.lr: {loguniform: [1e-4, 1e-2]}")
        problems = search_space_problems(space)
        if problems:
            raise ValueError("; ".join(problems))
        return space

    @model_validator(mode="after")
    def _one_budget(self) -> "TuneConfig":
        if self.budget_steps is not None and self.budget_tokens is not None:
            raise ValueError("set tune.budget_steps or tune.budget_tokens, not both")
        return self


class FrozenConfig(Section):
    """Transfer learning: set exactly one of the two (for `finetune.method: frozen`)."""

    first_blocks: int | None = Field(None, ge=0, description="freeze the embeddings and the first N blocks")
    last_blocks: int | None = Field(None, ge=0, description="train only the last N blocks, the final norm and the head")


class LoraSettings(Section):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="names of the Linear modules to adapt, e.g. "
                                             "[qkv, proj] (default: every attention and feed-forward Linear)")


# The column names of the fine-tuning layouts (raylm/data/chat_layouts.py): the keys of `finetune.columns`.
COLUMN_NAMES = ("messages", "prompt", "completion", "response", "conversations", "instruction", "input", "output",
                "text")


class FinetuneConfig(Section):
    method: Literal["full", "frozen", "lora"] = "full"
    data: str | None = Field(None, description="chat or instruction records (.jsonl, .json, .parquet, compressed, "
                                              "hf://org/name[:split]) or plain text (any data source)")
    format: Literal["auto", "messages", "prompt_completion", "prompt_response", "sharegpt", "alpaca", "text", "chat"] = Field(
        "auto", description="auto: the layout the first rows' keys match (text when they have only a text field); "
                            "chat: any chat layout, never text; or one named layout")
    columns: dict[str, str] = Field(default_factory=dict, description="layout name -> the data's column name, e.g. "
                                                                      "{prompt: question, response: answer}")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the fine-tuning data held out for val loss")
    system_prompt: str | None = Field(None, description="system message for prompt/response rows")
    lr: float = Field(1e-4, gt=0)
    max_steps: int = Field(100, gt=0)
    warmup_steps: int = Field(10, ge=0)
    global_batch_size: int | None = Field(None, gt=0, description="default: train.global_batch_size")
    micro_batch_size: int | None = Field(None, gt=0, description="default: train.micro_batch_size")
    eval_every: int | None = Field(None, gt=0, description="default: train.eval_every")
    seed: int = 0
    frozen: FrozenConfig = Field(default_factory=FrozenConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)

    @field_validator("data")
    @classmethod
    def _data_exists(cls, path: str | None) -> str | None:
        return None if path is None else _existing_absolute_path(path)

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(columns) - set(COLUMN_NAMES))
        if unknown:
            raise ValueError(f"finetune.columns has the key(s) {unknown}: the keys are layout column names, one of "
                             f"{list(COLUMN_NAMES)}, each mapped to the data's own column name")
        return columns

    @model_validator(mode="after")
    def _method_settings(self) -> "FinetuneConfig":
        if self.method == "frozen" and (self.frozen.first_blocks is None) == (self.frozen.last_blocks is None):
            raise ValueError("finetune.method = 'frozen' needs exactly one of finetune.frozen.first_blocks "
                             f"or finetune.frozen.last_blocks (got {self.frozen.model_dump()})")
        return self


class EvalExtraTask(Section):
    """A benchmark added by configuration alone: a multiple-choice layout (arc, mmlu, hellaswag) or a
    scoring shape (partial, cloze, generation) of a jsonl file; see raylm/eval/tasks.py."""

    name: str
    layout: Literal["arc", "mmlu", "hellaswag", "partial", "cloze", "generation"]
    path: str
    fewshot_path: str | None = None
    description: str | None = None
    fields: dict[str, str | list[str]] | None = Field(
        None, description="the layout's field -> the file's field (a list: fields gathered into one list), e.g. "
                          "{query: goal, choices: [sol1, sol2], gold: label}")
    gold_base: Literal[0, 1] = Field(0, description="gold indices in the file count from 0 or 1")
    target_delimiter: str = Field(" ", description="between context and continuation / choice")
    prompt: str | None = Field(None, description="generation: jinja prompt over `query` (default 'Question: "
                                                 "{{query}}\\nAnswer:')")
    answer_pattern: str | None = Field(None, description="generation: regex whose first match (group) is the "
                                                         "answer, in the output and the reference (default: "
                                                         "'#### (number)', GSM8K's)")
    until: list[str] | None = Field(None, description="generation: stop sequences (default blank line, 'Question:')")

    _exists = field_validator("path", "fewshot_path")(lambda path: None if path is None else _existing_absolute_path(path))


class EvalConfig(Section):
    tasks: list[str] = Field(default_factory=lambda: ["bpb"],
                             description="bpb, arc_easy, arc_challenge, hellaswag, mmlu, mmlu_<subject>, truthfulqa_mc1, "
                                         "truthfulqa_mc2, gsm8k, humaneval, mt_bench, domain, an extra task, a task of "
                                         "task_paths, or a group (arc, truthfulqa, standard)")
    limit: int | None = Field(None, gt=0, description="the first N items of each task (per task: MMLU's 57 "
                                                       "subjects give 57 x N items)")
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(16, gt=0)
    actors: int = Field(1, gt=0, description="evaluation actors (each loads the checkpoint once)")
    actor_gpus: float | Literal["auto"] = Field("auto", description="GPUs per actor; auto: 1 when the cluster has GPUs")
    actor_cpus: float = Field(1, gt=0)
    benchmark_data: str | None = Field(None, description="local benchmark folder (layout of shared/data/benchmarks); "
                                                         "unset: lm-eval downloads the standard datasets")
    allow_code_execution: bool = Field(False, description="run model-written code (HumanEval) in the sandbox")
    sandbox_timeout_s: float = Field(10.0, gt=0)
    sandbox_memory_mb: int = Field(1024, gt=0)
    sandbox_allow_weak: bool = Field(False, description="where the OS fence (namespaces) is unavailable, run HumanEval "
                                                        "with rlimits and Python guards only instead of refusing")
    sandbox_ray_resource: str | None = Field(None, description="run HumanEval's programs in Ray tasks needing this "
                                                               "custom resource (the worker group allowed the fence)")
    contamination_index: str | None = Field(None, description="curation's decontamination index: scores on clean items too")
    domain_data: str | None = Field(None, description="held-out text for the domain task (default: the curated val split)")
    domain_items: int = Field(200, gt=0)
    text_files: list[str] = Field(default_factory=list, description="text files to report bits-per-byte on")
    judge_url: str | None = Field(None, description="OpenAI-compatible URL of the MT-Bench judge; unset: MT-Bench unscored")
    judge_model: str = "gpt-4"
    max_gen_toks: int = Field(256, gt=0)
    extra_tasks: list[EvalExtraTask] = Field(default_factory=list)
    task_paths: list[str] = Field(default_factory=list, description="lm-eval task YAMLs (files or folders), their "
                                                                    "data in local files; run by their task names")
    seed: int = 0

    @field_validator("benchmark_data", "contamination_index", "domain_data")
    @classmethod
    def _paths_exist(cls, path: str | None) -> str | None:
        return None if path is None else _existing_absolute_path(path)

    @field_validator("text_files", "task_paths")
    @classmethod
    def _files_exist(cls, paths: list[str]) -> list[str]:
        return [_existing_absolute_path(path) for path in paths]


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address (`auto`: the cluster on this machine); default: RAY_ADDRESS, else a new local instance")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local Ray instance (default: all)")
    include_dashboard: bool = True
    runtime_env: str | None = None
    check_shared_storage: bool = Field(
        True, description="on a multi-node cluster, check that a local workspace / SQLite MLflow store is seen by every node")


class GpuTypeConfig(Section):
    peak_bf16_tflops: float = Field(gt=0, description="dense bf16 peak, TFLOP/s")
    memory_gib: float = Field(gt=0)


class PipelineConfig(Section):
    """Which of the recipe's optional steps `raylm pipeline` runs around curate, tokenize, pretrain and eval."""

    plan: bool = Field(True, description="print the plan (as `raylm plan`) first and log it to the pipeline's run")
    tune: bool = Field(False, description="run the `tune` sweep before pretraining; its best values train the model")
    finetune: bool = Field(True, description="fine-tune the pretrained model on finetune.data when that is set")
    benchmarks: bool = Field(True, description="run eval.tasks (other than bpb alone) on the final model")
    report: bool = Field(True, description="write the report card last (as `raylm report`)")


class PlanConfig(Section):
    """`raylm plan`: sizing before training. A budget is `gpu` x `gpus` for `hours`."""

    gpu: str | None = Field(None, description="GPU type (a key of the built-in table or of gpu_types)")
    gpus: int = Field(8, gt=0, description="number of GPUs (one per Ray Train worker)")
    hours: float | None = Field(None, gt=0, description="budget in wall-clock hours on those GPUs")
    choose_model: bool = Field(False, description="pick the largest preset the budget trains compute-optimally")
    mfu: float = Field(0.4, gt=0, le=1, description="assumed model FLOPs utilisation")
    tokens_per_parameter: float = Field(20.0, gt=0, description="compute-optimal training tokens per parameter")
    bytes_per_token: float | None = Field(None, gt=0, description="default: measured by this config's tokenizer, else assumed_bytes_per_token")
    assumed_bytes_per_token: float = Field(4.0, gt=0)
    device_memory_gib: float | None = Field(None, gt=0, description="device memory when no GPU type is given (e.g. a CPU worker's RAM)")
    memory_headroom: float = Field(0.9, gt=0, le=1, description="usable share of device memory (context, fragmentation)")
    gpu_types: dict[str, GpuTypeConfig] = Field(default_factory=dict, description="extra GPU types, or overrides of built-in ones")


class WorkspaceConfig(Section):
    root: str = Field("./raylm-workspace", description="local folder, s3:// or gs:// URI; RAYLM_WORKSPACE overrides")


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else SQLite in the workspace")
    experiment: str = "raylm"
    registered_model: str | None = Field(None, description="registered model name for pretrained checkpoints (fine-tuned ones: "
                                                     "<name>-finetune); default: the experiment's name")
    register_models: bool = Field(True, description="log each trained checkpoint as an MLflow model and register it")
    log_transformers: bool = Field(False, description="also log a decoder's Hugging Face export with MLflow's "
                                                      "transformers flavor (a text-generation pipeline; ~10 s more)")


# Keys added after workspaces existed (how a run reacts to failures; data.pii.phone_region; finetune.columns,
# whose default renames nothing): left out of a section's data (so of stage hashes) while at their defaults, so finished stages
# stay reused.
QUIET_AT_DEFAULT = ("health_check_interval_s", "worker_group_start_timeout_s", "phone_region", "columns", "eval_at_start",
                    "budget", "schedule", "decay_fraction", "optimizer", "muon_lr", "muon_momentum")


def section_data(section: BaseModel) -> dict[str, Any]:
    """The section as JSON-able data, without the keys of QUIET_AT_DEFAULT left at their default (in
    nested sections too, e.g. `data.pii.phone_region`), so that adding such a key moves no stage hash."""
    data = section.model_dump(mode="json")
    _drop_quiet_defaults(section, data)
    return data


def _drop_quiet_defaults(section: BaseModel, data: dict[str, Any]) -> None:
    for key, field in type(section).model_fields.items():
        value = getattr(section, key)
        if isinstance(value, BaseModel) and isinstance(data.get(key), dict):
            _drop_quiet_defaults(value, data[key])
        elif key in QUIET_AT_DEFAULT and value == field.default:
            data.pop(key, None)


class RaylmConfig(Section):
    recipe: str | None = Field(None, description="a named training recipe (raylm/recipe.py: gpt2, modern) whose "
                               "model and train keys fill in what the file does not set")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: TransformerConfig = Field(default_factory=TransformerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    workspace: WorkspaceConfig = Field(default_factory=WorkspaceConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        return with_recipe(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _batch_tokens_fit_the_model(self) -> "RaylmConfig":
        tokens, seq_len, workers = self.train.global_batch_tokens, self.model.seq_len, self.train.max_workers
        if tokens is None:
            return self
        if tokens % seq_len:
            raise ValueError(f"train.global_batch_tokens = {tokens}: expected a multiple of model.seq_len ({seq_len})")
        if tokens // seq_len < workers:
            raise ValueError(f"train.global_batch_tokens = {tokens}: {tokens // seq_len} sequence(s) of model.seq_len "
                             f"{seq_len} per step, expected at least one per worker ({workers}, train.workers)")
        return self

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain JSON-able data (for hashing and MLflow params)."""
        if name == "model":
            return self.model.section()
        return section_data(getattr(self, name))


# ----------------------------------------------------------------------------------------------
# Loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003). Values are read as YAML, numbers as numbers."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {item!r}: expected section.key=value"])
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError([f"override {item!r}: empty part in key {key!r}"])
    return path, _typed_value(raw.strip())


def _typed_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):  # PyYAML reads `3e-4` as a string (YAML 1.1 floats need a dot)
        for convert in (int, float):
            try:
                return convert(value)
            except ValueError:
                pass
    return value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError([f"override of {'.'.join(path)}: {'.'.join(path[:depth + 1])} is not a section"])
        node = child
    node[path[-1]] = value


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    workspace: str | None = None,
) -> RaylmConfig:
    """Read a YAML experiment (default: configs/laptop.yaml), apply overrides and the workspace
    (argument, else RAYLM_WORKSPACE, else the file), and validate everything."""
    origin = str(path) if path is not None else str(DEFAULT_CONFIG)
    tree = _read_yaml(origin) if (path is not None or DEFAULT_CONFIG.exists()) else {}
    for item in overrides:
        keys, value = parse_override(item)
        apply_override(tree, keys, value)
    root = workspace or os.environ.get("RAYLM_WORKSPACE")
    if root:
        apply_override(tree, ["workspace", "root"], root)
    return validate_config(tree, origin)


def validate_config(tree: dict[str, Any], origin: str | None = None) -> RaylmConfig:
    try:
        return RaylmConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, RaylmConfig), origin) from None


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {os.path.abspath(path)}"]) from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError([f"{where}: not valid YAML ({problem})"]) from None
    if not isinstance(tree, dict):
        raise ConfigError([f"{path}: expected a mapping of sections, got {type(tree).__name__}"])
    return tree


def describe_validation_error(error: ValidationError, model: type[BaseModel]) -> list[str]:
    problems = []
    for item in error.errors():
        loc = [part for part in item["loc"] if not (isinstance(part, str) and part.startswith(("function-", "tagged-union")))]
        dotted = _dotted(loc)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            parent_model = _model_at(model, loc[:-1])
            valid = ", ".join(sorted(section_fields(parent_model))) if parent_model else "?"
            section = _dotted(loc[:-1]) or "top level"
            problems.append(f"unknown key {dotted!r}; valid keys of {section!r}: {valid}")
        elif item["type"] == "value_error" and (not dotted or message.startswith(f"{dotted}.")):
            problems += message.split("; ")  # a cross-field rule that names its own keys (model.d_model = ...)
        else:
            problems.append(f"{dotted} = {item.get('input')!r}: {message}")
    return problems


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and bool(section_fields(annotation))


def _model_at(model: type[BaseModel], loc: list[Any]) -> Any:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = section_fields(current).get(part) if _is_section(current) else None
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if _is_section(current) else None


def _inner_model(annotation: Any) -> Any:
    if _is_section(annotation):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def dump_config(config: RaylmConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
