"""The `finetune` stage: continue training a base model with `full`, `frozen` or `lora` on new data.

The base is what `raylm finetune --from` names: a checkpoint directory, a finished `pretrain` (or
`finetune`) stage folder, an MLflow run id whose run carries a `raylm.checkpoint` tag, or a Hugging
Face model folder (converted once through `raylm.model.hf.import_hf` into a raylm checkpoint). The
run is the pretraining trainer (`build_trainer`, same strategies, DCP checkpoints, elasticity and
MLflow logging) started from the base weights, with its `finetune` spec telling every
worker to call `raylm.finetune.prepare_for_finetune` before wrapping the model. After training a
LoRA run's adapters are folded into the weights and written as a plain checkpoint (`merged/`), which
is what export and evaluation read. Logged: trainable and total parameters, val loss on the
fine-tuning data before and after, the method, the base's lineage, and the data's figures (`data_*`:
rows per layout, turns, tokens, rows dropped and why).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import dataclasses
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.nn as nn
from safetensors import safe_open
from tokenizers import Tokenizer

from raylm import tracking
from raylm.artifacts import Finetuned, Packed
from raylm.config import ConfigError, FinetuneConfig, TrainConfig
from raylm.finetune.methods import merge_lora, parameter_counts, prepare_for_finetune
from raylm.model import TransformerConfig, build_model
from raylm.model.config import NON_ARCHITECTURE_KEYS
from raylm.model.hf import ExportError, config_from_hf, from_hf_state_dict, import_hf
from raylm.model.transformer import Transformer
from raylm.storage import filesystem_for
from raylm.train.checkpoint import (
    MODEL_CONFIG,
    TOKENIZER,
    TRAINER_STATE,
    CheckpointError,
    load_tokenizer_json,
    load_training_state,
    local_checkpoint,
    check_loadable,
    save_checkpoint,
)
from raylm.workspace import SUCCESS_MARKER, StageDir, Workspace, content_hash, resolve_stage_dir

log = logging.getLogger("raylm")

RUN_NAME = "train"


class BaseModelError(ValueError):
    """`--from` names nothing usable as a base model."""


@dataclass
class Base:
    """A resolved base model: a local raylm checkpoint directory and where it came from."""

    checkpoint: str
    kind: str  # checkpoint | stage | run | hf
    source: str
    model_config: dict[str, Any]
    tokenizer_json: str
    tokenizer_path: str
    mlflow_run_id: str | None = None

    @property
    def fingerprint(self) -> str:
        if is_remote(self.checkpoint):
            return content_hash(self.checkpoint)  # checkpoint folders on object stores are written once
        state = os.path.join(self.checkpoint, TRAINER_STATE)
        stamp = os.stat(state).st_mtime_ns if os.path.exists(state) else 0
        return content_hash(os.path.abspath(self.checkpoint), stamp)

    def lineage_tags(self) -> dict[str, str]:
        tags = {"raylm.base.checkpoint": self.checkpoint, "raylm.base.kind": self.kind,
                "raylm.base.source": self.source}
        if self.mlflow_run_id:
            tags["raylm.base.run_id"] = self.mlflow_run_id
        return tags


def write_plain_checkpoint(directory: str, model: nn.Module, model_config: dict[str, Any], tokenizer_json: str | None,
                           trainer_state: dict[str, Any]) -> str:
    """A checkpoint of a plain, unsharded model (no optimizer state), written without a process group in
    the trainer's own format (file lists and all), so `init_checkpoint` and `load_model` read it."""
    save_checkpoint(directory, model, [], trainer_state, model_config, tokenizer_json, rank=0)  # [] = no optimizer
    return directory


# ----------------------------------------------------------------------------------------------
# Resolving `--from`


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as handle:
        return json.load(handle)


def _stage_run_id(checkpoint: str) -> str | None:
    """The MLflow run of the stage folder a checkpoint lives in (<stage>/train/checkpoint_N)."""
    stage_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    manifest = os.path.join(stage_dir, "manifest.json")
    return _read_json(manifest).get("mlflow_run_id") if os.path.exists(manifest) else None


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _from_remote_checkpoint(uri: str, kind: str, source: str, run_id: str | None = None) -> Base:
    """A checkpoint on an object store: the workers read it there (`init_checkpoint`); the driver reads its
    config and tokenizer from a download, and keeps the tokenizer in a local folder named by its hash, so
    the fine-tuning tokenize stage sees the same path (and stage hash) on every rerun."""
    with local_checkpoint(uri) as directory:
        local = _from_checkpoint(directory, kind, source, run_id or "")
    cache = os.path.join(tempfile.gettempdir(), "raylm-base-tokenizers", content_hash(local.tokenizer_json))
    os.makedirs(cache, exist_ok=True)
    tokenizer_path = os.path.join(cache, TOKENIZER)
    with open(tokenizer_path, "w", encoding="utf-8") as handle:
        handle.write(local.tokenizer_json)
    return dataclasses.replace(local, checkpoint=uri.rstrip("/"), tokenizer_path=tokenizer_path,
                               mlflow_run_id=run_id)


def _from_stage_folder(folder: str, source: str) -> Base:
    """A finished stage folder (`<workspace>/<stage>/<key>`, local or remote): the checkpoint its committed
    manifest names (the merged one of a LoRA fine-tune)."""
    try:
        manifest = resolve_stage_dir(folder).manifest()
    except (FileNotFoundError, OSError, ValueError) as error:
        raise BaseModelError(f"--from {source}: the stage folder's manifest cannot be read ({error})") from None
    checkpoint = manifest.get("merged_checkpoint") or manifest.get("checkpoint")
    if not checkpoint:
        raise BaseModelError(f"--from {source}: the stage folder's manifest names no checkpoint")
    if is_remote(checkpoint):
        return _from_remote_checkpoint(checkpoint, "stage", source, manifest.get("mlflow_run_id"))
    return _from_checkpoint(checkpoint, "stage", source, manifest.get("mlflow_run_id"))


def check_checkpoint(directory: str, source: str) -> None:
    """On the driver, so that a damaged or crafted base is one line, not a worker's traceback."""
    try:
        check_loadable(directory)
    except CheckpointError as error:
        raise BaseModelError(f"--from {source}: {error}") from None


def _from_checkpoint(directory: str, kind: str, source: str, run_id: str | None = None) -> Base:
    check_checkpoint(directory, source)
    tokenizer_json = load_tokenizer_json(directory)
    if tokenizer_json is None:
        raise BaseModelError(f"--from {source}: checkpoint {directory} has no {TOKENIZER}")
    return Base(checkpoint=directory, kind=kind, source=source, model_config=_read_json(os.path.join(directory, MODEL_CONFIG)),
                tokenizer_json=tokenizer_json, tokenizer_path=os.path.join(directory, TOKENIZER),
                mlflow_run_id=run_id or _stage_run_id(directory))


def _safetensors_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the folder's safetensors headers (no weights read)."""

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        others = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise FileNotFoundError("no model.safetensors or model.safetensors.index.json"
                                + (f" (found {', '.join(others)}: raylm reads safetensors only, never pickles)" if others else ""))
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def check_hf_folder(folder: str) -> TransformerConfig:
    """Refuse, naming the folder, a Hugging Face folder raylm cannot fine-tune from, before any work: its
    `config.json` must describe a Llama or GPT-2 model `raylm.model.hf.import_hf` converts, its
    safetensors must hold every weight that model needs in the right shape (headers only are read), and
    it must carry the tokenizer (`tokenizer.json`) the fine-tuning data is tokenized with."""

    def refuse(reason: str) -> BaseModelError:
        return BaseModelError(f"--from {folder}: not a Hugging Face model folder raylm can fine-tune from: {reason}")

    try:
        hf = _read_json(os.path.join(folder, "config.json"))
    except (OSError, ValueError) as error:
        raise refuse(f"config.json is unreadable ({error})") from None
    if not isinstance(hf, dict):
        raise refuse("config.json is not a JSON object")
    try:
        config = config_from_hf(hf)
    except ExportError as error:
        raise refuse(f"{error} (architectures: {hf.get('architectures')})") from None
    except (KeyError, TypeError, ValueError) as error:
        raise refuse(f"config.json of model_type {hf.get('model_type')!r} lacks or mangles {error}") from None
    try:
        shapes = _safetensors_shapes(folder)
    except Exception as error:  # noqa: BLE001 - a missing or corrupt weights file
        raise refuse(f"weights: {error}") from None
    with torch.device("meta"):
        template = Transformer(config).state_dict()
        try:
            state = from_hf_state_dict({k: torch.empty(v) for k, v in shapes.items()}, config, hf["model_type"])
        except ExportError as error:
            raise refuse(str(error)) from None
        except (RuntimeError, ValueError) as error:  # a tensor too small to split or concatenate
            raise refuse(f"weights do not fit config.json ({error})") from None
        except KeyError as error:
            raise refuse(f"weights missing from the folder: {error}") from None
    wrong = [f"{name} {tuple(state[name].shape)} (expected {tuple(tensor.shape)})"
             for name, tensor in template.items() if tuple(state[name].shape) != tuple(tensor.shape)]
    if wrong:
        raise refuse(f"weights do not fit config.json: {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    tokenizer_file = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(tokenizer_file):
        raise refuse("no tokenizer.json (fine-tuning tokenizes its data with the base's own tokenizer)")

    try:
        tokens = Tokenizer.from_file(tokenizer_file).get_vocab_size()
    except Exception as error:  # noqa: BLE001 - the tokenizers library's parse errors
        raise refuse(f"tokenizer.json does not load ({error})") from None
    if tokens > config.vocab_size:
        raise refuse(f"tokenizer.json has {tokens} tokens but config.json vocab_size is {config.vocab_size}")
    return config


def local_path(source: str) -> str:
    """`--from` as an absolute local path (`file://` and `~` allowed)."""
    return os.path.abspath(os.path.expanduser(source.removeprefix("file://")))


def is_hf_folder(path: str) -> bool:
    """A folder `resolve_base` treats as a Hugging Face model: config.json, not a raylm checkpoint or stage."""
    return (os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))
            and not os.path.exists(os.path.join(path, MODEL_CONFIG))
            and not os.path.exists(os.path.join(path, SUCCESS_MARKER)))


def check_base_source(source: str, model: TransformerConfig | None = None) -> None:
    """The checks on `--from` that need neither Ray nor the workspace (the CLI runs them first): a local
    raylm checkpoint verifies, reads safely and has the architecture the config sets."""
    if is_remote(source):
        return  # read (and checked) when the base is resolved
    path = local_path(source)
    if is_hf_folder(path):
        check_hf_folder(path)
    elif os.path.exists(os.path.join(path, MODEL_CONFIG)):
        check_checkpoint(path, source)
        problems = architecture_problems(model, _read_json(os.path.join(path, MODEL_CONFIG)), path) if model else []
        if problems:
            raise ConfigError(problems)
    elif not os.path.exists(path) and not (len(source) == 32 and all(c in "0123456789abcdef" for c in source)):
        raise BaseModelError(f"--from {source}: no such file or folder, and not an MLflow run id (32 hex digits)")


def _from_hf(folder: str, workspace: Workspace) -> Base:
    check_hf_folder(folder)
    tokenizer_file = os.path.join(folder, "tokenizer.json")
    files = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    stamp = {name: os.stat(os.path.join(folder, name)).st_size for name in files}
    stage = workspace.stage("finetune-base", {"hf_folder": os.path.abspath(folder), "files": stamp})
    directory = stage.path("checkpoint")
    if not stage.is_complete():
        stage.prepare(force=True)
        model, config = import_hf(folder)
        config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        with open(tokenizer_file) as handle:
            tokenizer_json = handle.read()
        write_plain_checkpoint(directory, model, config_dict, tokenizer_json, {"step": 0, "imported_from": folder})
        stage.finish({"checkpoint": directory, "hf_folder": folder})
    return _from_checkpoint(directory, "hf", folder)


def resolve_base(source: str, workspace: Workspace, tracking_uri: str | None = None) -> Base:
    """A checkpoint dir, a stage folder (local or on an object store), an HF model folder, or an MLflow run
    id -> Base."""
    if is_remote(source):
        fs, path = filesystem_for(source.rstrip("/"))
        if fs.get_file_info(f"{path}/{MODEL_CONFIG}").type == pafs.FileType.File:
            return _from_remote_checkpoint(source, "checkpoint", source)
        if fs.get_file_info(f"{path}/{SUCCESS_MARKER}").type == pafs.FileType.File:
            return _from_stage_folder(source.rstrip("/"), source)
        raise BaseModelError(f"--from {source}: neither a raylm checkpoint ({MODEL_CONFIG}) nor a finished stage "
                             f"folder ({SUCCESS_MARKER}) on the object store")
    path = local_path(source)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MODEL_CONFIG)):
            return _from_checkpoint(path, "checkpoint", source)
        if os.path.exists(os.path.join(path, SUCCESS_MARKER)):
            return _from_stage_folder(path, source)
        if is_hf_folder(path):
            return _from_hf(path, workspace)
        raise BaseModelError(f"--from {source}: folder is neither a raylm checkpoint ({MODEL_CONFIG}), a finished "
                             f"stage folder ({SUCCESS_MARKER}) nor a Hugging Face model folder (config.json)")
    if tracking_uri and len(source) == 32 and all(c in "0123456789abcdef" for c in source):
        try:
            run = tracking.client(tracking_uri).get_run(source)
        except tracking.MlflowException as error:
            raise BaseModelError(f"--from {source}: no such MLflow run in {tracking_uri} ({error})") from None
        checkpoint = run.data.tags.get("raylm.merged_checkpoint") or run.data.tags.get("raylm.checkpoint")
        if not checkpoint:
            raise BaseModelError(f"--from {source}: MLflow run {source} has no raylm.checkpoint tag")
        if is_remote(checkpoint):
            return _from_remote_checkpoint(checkpoint, "run", source, source)
        return _from_checkpoint(checkpoint.removeprefix("file://"), "run", source, source)
    raise BaseModelError(f"--from {source}: not a directory or an MLflow run id")


def architecture_problems(model: TransformerConfig, base_config: dict[str, Any], where: str) -> list[str]:
    """One line per key the config sets explicitly that differs from the base's architecture."""
    problems = []
    for key in sorted(model.explicit_keys):
        if key in NON_ARCHITECTURE_KEYS or key not in base_config:
            continue
        mine, theirs = getattr(model, key), base_config[key]
        if key == "vocab_size" and mine is None:  # None: the tokenizer's, which must equal the base's anyway
            continue
        if mine != theirs:
            problems.append(f"model.{key} = {mine!r} but the base checkpoint {where} has {key} = {theirs!r}")
    if problems:
        problems.append("fine-tuning keeps the base architecture: drop these keys or match the base")
    return problems


def check_architecture(model: TransformerConfig, base: Base) -> TransformerConfig:
    """The model section for fine-tuning: the base's architecture. Keys the config sets explicitly must
    match the base; a mismatch is an error naming `model.<key>`. The vocabulary stays unset here (the
    fine-tuning data's tokenizer binds it, and must equal the base's)."""
    problems = architecture_problems(model, base.model_config, base.checkpoint)
    if problems:
        raise ConfigError(problems)
    chosen = model.explicit_keys
    merged = {k: v for k, v in base.model_config.items() if k != "vocab_size"}
    for key in NON_ARCHITECTURE_KEYS:
        if key in chosen:
            merged[key] = getattr(model, key)
    return TransformerConfig.from_dict(merged)


def finetune_train_config(train: TrainConfig, finetune: FinetuneConfig) -> TrainConfig:
    updates: dict[str, Any] = {"lr": finetune.lr, "max_steps": finetune.max_steps, "seed": finetune.seed,
                               "warmup_steps": min(finetune.warmup_steps, finetune.max_steps),
                               "eval_at_start": True,  # val_loss_initial: the base model's, for before/after
                               "budget": None}  # finetune.max_steps is the run's length, not a pretraining budget
    for key in ("global_batch_size", "micro_batch_size", "eval_every"):
        if getattr(finetune, key) is not None:
            updates[key] = getattr(finetune, key)
    if finetune.global_batch_size is not None:
        updates["global_batch_tokens"] = None
    updates["checkpoint_every"] = min(train.checkpoint_every, finetune.max_steps)
    updates["eval_every"] = min(updates.get("eval_every", train.eval_every), finetune.max_steps)
    try:
        return TrainConfig.model_validate({**train.model_dump(), **updates})
    except Exception as error:  # noqa: BLE001 - pydantic's message names the field
        raise ConfigError([f"finetune: the train settings it derives are invalid: {error}"]) from None


def data_stats(packed: Packed) -> dict[str, float]:
    """The fine-tuning data's figures (sft-data: rows per layout, turns, tokens, rows dropped and why;
    text: the tokenize stage's), prefixed `data_`, for the fine-tune run's metrics and summary."""
    return {f"data_{key}": value for key, value in packed.metrics.items()
            if isinstance(value, (int, float)) and key != "stage_seconds"}


def finetune_spec(finetune: FinetuneConfig) -> dict[str, Any]:
    """What every worker's `prepare_for_finetune` needs (JSON-able)."""
    return {"method": finetune.method, "frozen": finetune.frozen.model_dump(mode="json"),
            "lora": finetune.lora.model_dump(mode="json")}


def count_parameters(model_config: dict[str, Any], spec: dict[str, Any]) -> dict[str, int]:
    with torch.device("meta"):
        model = prepare_for_finetune(build_model(model_config), spec)
    return parameter_counts(model)


# ----------------------------------------------------------------------------------------------
# The stage


def load_finetuned(checkpoint: str, spec: dict[str, Any]) -> nn.Module:
    """A fine-tuned checkpoint as a plain model: LoRA adapters merged into the weights."""
    with local_checkpoint(checkpoint) as directory:
        config = TransformerConfig.from_dict(_read_json(os.path.join(directory, MODEL_CONFIG)))
        model = prepare_for_finetune(build_model(config), spec)
        load_training_state(directory, model, None, rank=0)
    return merge_lora(model).eval()


def export_merged(checkpoint: str, spec: dict[str, Any], stage: StageDir, tokenizer_json: str,
                  trainer_state: dict[str, Any]) -> str:
    model = load_finetuned(checkpoint, spec)
    if stage.workspace.is_local:
        return write_plain_checkpoint(stage.path("merged"), model, model.config.to_dict(), tokenizer_json, trainer_state)
    with tempfile.TemporaryDirectory(prefix="raylm-merged-") as local:
        write_plain_checkpoint(local, model, model.config.to_dict(), tokenizer_json, trainer_state)
        pafs.copy_files(local, stage.fs_path("merged"), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=stage.fs)
    return stage.path("merged")


def finetune(model: TransformerConfig, train: TrainConfig, finetune_config: FinetuneConfig, base: Base,
             packed: Packed, stage: StageDir, tracking_uri: str) -> Finetuned:
    # deferred: pulls in ray, slow to import; only this path needs it
    from raylm.train.launch import best_checkpoint, build_trainer, fit_with_progress

    packed.require_val("raise finetune.val_fraction or add data")
    if packed.tokenizer.vocab_size != base.model_config["vocab_size"]:
        reason = ""
        if base.model_config.get("seq2seq_objective") == "span_corruption":
            reason = (" (it was pretrained by span corruption, which reserves sentinel ids above its tokenizer; "
                      "fine-tuning such a base is not supported: pretrain with model.seq2seq_objective = 'prefix')")
        raise ValueError(f"the fine-tuning tokenizer has {packed.tokenizer.vocab_size} tokens but the base "
                         f"model {base.checkpoint} has vocab_size {base.model_config['vocab_size']}{reason}")
    spec = finetune_spec(finetune_config)
    counts = count_parameters(base.model_config, spec)
    run_id = tracking.active_run_id()
    tracking.set_tags({**base.lineage_tags(), "raylm.finetune.method": finetune_config.method})
    log.info("finetune: %s from %s, %d of %d parameters trainable (%.2f%%)", finetune_config.method, base.checkpoint,
             counts["params_trainable"], counts["params_total"], 100 * counts["params_trainable"] / counts["params_total"])
    trainer = build_trainer(model, train, packed, stage.path(), RUN_NAME, tracking_uri,
                            run_id, init_checkpoint=base.checkpoint,
                            finetune=spec)
    result = fit_with_progress(trainer, "finetune", tracking_uri, run_id)
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning finished without a checkpoint under {stage.path(RUN_NAME)}")
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    before, after = metrics.get("val_loss_initial", float("nan")), metrics.get("val_loss", float("nan"))
    metrics.update(counts, params_trainable_fraction=counts["params_trainable"] / counts["params_total"],
                   val_loss_before=before, val_loss_after=after, val_loss_delta=after - before)
    metrics.update(data_stats(packed))
    layouts = sorted(key.removeprefix("data_rows_layout_") for key in metrics if key.startswith("data_rows_layout_"))
    tracking.set_tag("raylm.finetune.data_layouts", ",".join(layouts) or "text")
    checkpoint = best_checkpoint(stage.path(RUN_NAME)) or result.checkpoint.path
    adapter_checkpoint = merged_checkpoint = None
    if spec["method"] == "lora":
        trainer_state = {"step": int(metrics.get("step", 0)), "merged_from": checkpoint}
        adapter_checkpoint = checkpoint
        merged_checkpoint = checkpoint = export_merged(checkpoint, spec, stage, base.tokenizer_json, trainer_state)
        tracking.set_tag("raylm.adapter_checkpoint", adapter_checkpoint)
        tracking.set_tag("raylm.merged_checkpoint", merged_checkpoint)
    tracking.set_tag("raylm.checkpoint", checkpoint)
    log.info("finetune: val loss %.4f -> %.4f, checkpoint %s", before, after, checkpoint)
    return Finetuned(
        checkpoint=checkpoint, adapter_checkpoint=adapter_checkpoint, merged_checkpoint=merged_checkpoint,
        last_checkpoint=result.checkpoint.path, run_path=stage.path(RUN_NAME), method=spec["method"], finetune=spec,
        base={"checkpoint": base.checkpoint, "kind": base.kind, "source": base.source, "mlflow_run_id": base.mlflow_run_id},
        model={**model.section(), "vocab_size": base.model_config["vocab_size"]}, tokenizer=packed.tokenizer,
        metrics=metrics)
