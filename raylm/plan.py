"""`raylm plan`: size a training run from the use case before renting any GPU.

Given a model (a preset or the config's `model` section) or a budget (GPU type, count, hours, or the
trainer's own `train.budget`: FLOPs, tokens, tokens per parameter, or minutes on the plan's GPUs), it
works out, with the same formulas the trainer uses (raylm/model/sizing.py):

- parameters (total, non-embedding) and training FLOPs per token;
- training tokens: compute-optimal (`plan.tokens_per_parameter`, about 20 per parameter) and what
  the budget buys at the assumed MFU; the curated corpus that needs (bytes per token measured by this
  config's trained tokenizer when one exists) and the storage of curated data, token shards and the
  kept checkpoints;
- memory per worker for `ddp` and `fsdp`, with and without activation checkpointing, at the
  configured micro-batch, sequence length and precision, and the largest micro-batch that fits;
- training time on the chosen GPUs, the strategy and the `ScalingConfig` it recommends, or why no
  setting fits.

Memory model (bytes per worker). Parameters are fp32 (bf16 is autocast), so weights 4, gradients 4
and AdamW's two moments 8 bytes per parameter; DDP with more than one worker adds 4 for its gradient
buckets. FSDP shards those 16 bytes over the workers and gathers one block at a time (two with
prefetch) plus the root's embedding. Activations are `sizing.activation_elements_per_token` (the
peak of a step) times the micro-batch tokens, 2 bytes each under bf16 (4 in fp32); the loss side is
always fp32. Not counted: the framework's own memory (CUDA context, NCCL buffers, allocator
fragmentation), which `plan.memory_headroom` leaves room for.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from raylm import tracking
from raylm.config import ConfigError, RaylmConfig, validate_config
from raylm.gpus import GIB, GPU_TYPES, GpuType
from raylm.model import TransformerConfig
from raylm.model.config import PRESETS
from raylm.model.sizing import (activation_elements_per_token, block_matrix_parameters, block_parameters,
                                 flops_per_token, parameter_count)
from raylm.stage_plan import plan_stages
from raylm.train.budget import budget_tokens
from raylm.tracking import Tracker, flatten
from raylm.workspace import Workspace

STRATEGIES = (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True))


def gpu_table(config: RaylmConfig) -> dict[str, GpuType]:
    table = dict(GPU_TYPES)  # `plan.gpu_types` in the config adds types or overrides these
    for name, spec in config.plan.gpu_types.items():
        table[name] = GpuType(name, spec.peak_bf16_tflops * 1e12, spec.memory_gib * GIB)
    return table


def model_for(config: RaylmConfig) -> TransformerConfig:
    """The model the trainer would build: the model section, with the preset's vocabulary when a preset
    names one and the tokenizer's otherwise (plus span corruption's sentinel ids)."""
    vocab = config.tokenizer.vocab_size
    if config.model.preset:
        vocab = PRESETS[config.model.preset].get("vocab_size", vocab)
    return config.model.for_tokenizer(vocab)


@dataclass
class Memory:
    """Bytes per worker of one training setting."""

    strategy: str
    activation_checkpointing: bool
    workers: int
    weights: float
    gradients: float
    optimizer: float
    buffers: float  # DDP gradient buckets, or FSDP's gathered (unsharded) parameters
    activations: float
    activations_per_sequence: float

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers

    @property
    def total(self) -> float:
        return self.states + self.activations

    def largest_micro_batch(self, usable_bytes: float) -> int:
        return max(0, int((usable_bytes - self.states) // self.activations_per_sequence))


def activation_bytes_per_sequence(model: TransformerConfig, seq_len: int, bf16: bool,
                                  checkpointing: bool) -> float:
    parts = activation_elements_per_token(model, checkpointing)
    width = 2 if bf16 else 4
    return seq_len * ((parts["blocks"] + parts["final_norm"] + parts["recompute"]) * width + parts["loss"] * 4)


def optimizer_state_bytes(model: TransformerConfig, optimizer: str) -> float:
    """fp32 optimizer state: AdamW's two moments per parameter; Muon keeps one momentum per block matrix."""
    params = parameter_count(model).total
    matrices = block_matrix_parameters(model) if optimizer == "muon" else 0
    return 8.0 * (params - matrices) + 4.0 * matrices


def memory_per_worker(model: TransformerConfig, strategy: str, workers: int, micro_batch: int, seq_len: int,
                      bf16: bool, checkpointing: bool, optimizer: str = "adamw") -> Memory:
    params = parameter_count(model).total
    shards = workers if strategy == "fsdp" else 1
    weights, gradients = 4 * params / shards, 4 * params / shards
    optimizer_bytes = optimizer_state_bytes(model, optimizer) / shards
    if strategy == "fsdp":
        gathered = 2 * block_parameters(model, cross_attention=model.arch == "encoder-decoder") \
            + model.vocab_size * model.d_model
        buffers = 4 * gathered if workers > 1 else 0.0
    else:
        buffers = 4 * params if workers > 1 else 0.0
    per_sequence = activation_bytes_per_sequence(model, seq_len, bf16, checkpointing)
    return Memory(strategy, checkpointing, workers, weights, gradients, optimizer_bytes, buffers,
                  micro_batch * per_sequence, per_sequence)


@dataclass
class Plan:
    model: dict[str, Any]
    parameters: dict[str, int]
    flops_per_token: int
    tokens: dict[str, float]
    bytes_per_token: dict[str, Any]
    storage_bytes: dict[str, float]
    gpu: dict[str, Any]
    memory: list[dict[str, Any]]
    time: dict[str, float]
    recommendation: dict[str, Any]
    feasible: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def measured_bytes_per_token(config: RaylmConfig) -> float | None:
    """Bytes per token of this config's trained tokenizer (its finished tokenize stage), if any."""
    try:
        stage = plan_stages(config, Workspace(config.workspace.root)).tokenize
        if stage.is_complete():
            value = stage.manifest().get("metrics", {}).get("val_bytes_per_token")
            return float(value) if value and value == value else None
    except Exception:  # no workspace, sources moved: fall back to the assumption
        return None
    return None


def choose_preset(config: RaylmConfig, compute_flops: float) -> str:
    """The largest preset whose compute-optimal run fits the compute (C = 6 N D with D = k N)."""
    best, best_params = None, -1
    for name in PRESETS:
        candidate = config.model_copy(update={"model": TransformerConfig(preset=name)})
        model = model_for(candidate)
        params = parameter_count(model).total
        needed = flops_per_token(model) * config.plan.tokens_per_parameter * params
        if needed <= compute_flops and params > best_params:
            best, best_params = name, params
    return best or min(PRESETS, key=lambda n: parameter_count(model_for(config.model_copy(
        update={"model": TransformerConfig(preset=n)}))).total)


def train_budget_tokens(config: RaylmConfig, model: TransformerConfig, cluster_flops: float | None,
                        flops: int) -> float:
    """Tokens `train.budget` buys (as the trainer computes them); a minutes budget at the plan's GPUs and MFU."""
    budget = config.train.budget
    if config.plan.hours is not None:
        raise ConfigError([f"plan.hours = {config.plan.hours} and train.budget.{budget.kind} = {budget.amount:g} "
                           "both set the budget: keep one"])
    tokens = budget_tokens(budget, model)
    if tokens is not None:
        return tokens
    if not cluster_flops:
        raise ConfigError([f"train.budget.minutes = {budget.minutes:g}: raylm plan needs plan.gpu to turn minutes "
                           "into tokens (the trainer measures its own speed)"])
    return cluster_flops * budget.minutes * 60 / flops


def make_plan(config: RaylmConfig) -> Plan:
    settings = config.plan
    table = gpu_table(config)
    gpu = table.get(settings.gpu) if settings.gpu else None
    if settings.gpu and gpu is None:
        raise ConfigError([f"plan.gpu = {settings.gpu!r}: unknown GPU type; known: {', '.join(sorted(table))} "
                           "(add one under plan.gpu_types)"])
    count = settings.gpus
    cluster_flops = gpu.peak_flops * count * settings.mfu if gpu else None
    if settings.choose_model:
        if not (cluster_flops and settings.hours):
            raise ConfigError(["plan.choose_model = true: needs plan.gpu and plan.hours (the budget)"])
        name = choose_preset(config, cluster_flops * settings.hours * 3600)
        config = config.model_copy(update={"model": TransformerConfig(preset=name)})
    model = model_for(config)
    counts = parameter_count(model)
    flops = flops_per_token(model)
    optimal_tokens = settings.tokens_per_parameter * counts.total
    budget_tokens = cluster_flops * settings.hours * 3600 / flops if (cluster_flops and settings.hours) else None
    if config.train.budget is not None:
        budget_tokens = train_budget_tokens(config, model, cluster_flops, flops)
    train_tokens = budget_tokens if budget_tokens is not None else optimal_tokens

    measured = measured_bytes_per_token(config)
    bytes_per_token = settings.bytes_per_token or measured or settings.assumed_bytes_per_token
    source = "plan.bytes_per_token" if settings.bytes_per_token else ("measured" if measured else "assumed")
    seq = model.seq_len
    checkpoint_bytes = counts.total * 4.0 + optimizer_state_bytes(model, config.train.optimizer)  # fp32 weights, state
    storage = {
        "curated_data": train_tokens * bytes_per_token,
        "token_shards": train_tokens * 4 * (seq + 1) / seq,  # int32 rows of seq_len + 1
        "checkpoint_each": checkpoint_bytes,
        "checkpoints_kept": checkpoint_bytes * config.train.keep_checkpoints,
    }

    train = config.train
    bf16 = train.precision == "bf16" or (train.precision == "auto" and gpu is not None)
    micro = train.micro_batch_size
    workers = count if gpu else train.max_workers
    usable = gpu.memory_bytes * settings.memory_headroom if gpu else (
        settings.device_memory_gib * GIB * settings.memory_headroom if settings.device_memory_gib else None)
    memories, rows = [], []
    for strategy, checkpointing in STRATEGIES:
        memory = memory_per_worker(model, strategy, workers, micro, seq, bf16, checkpointing, train.optimizer)
        memories.append(memory)
        row = {"strategy": strategy, "activation_checkpointing": checkpointing, "workers": workers,
               "weights": memory.weights, "gradients": memory.gradients, "optimizer": memory.optimizer,
               "buffers": memory.buffers, "activations": memory.activations, "total": memory.total}
        if usable:
            row["largest_micro_batch"] = memory.largest_micro_batch(usable)
            row["fits"] = memory.total <= usable
        rows.append(row)

    reasons: list[str] = []
    recommendation: dict[str, Any] = {}
    feasible = True
    if usable:
        choice = next((m for m in memories if m.largest_micro_batch(usable) >= micro), None)
        choice = choice or next((m for m in memories if m.largest_micro_batch(usable) >= 1), None)
        if choice is None:
            feasible = False
            smallest = min(memories, key=lambda m: m.total)
            what = f"{gpu.name} ({gpu.memory_bytes / GIB:.0f} GiB)" if gpu else f"{settings.device_memory_gib} GiB"
            reasons.append(
                f"model does not fit: {counts.total / 1e9:.2f}B parameters need {smallest.states / GIB:.1f} GiB "
                f"per worker for weights, gradients and optimizer states even with fsdp over {workers} "
                f"worker(s), plus {smallest.activations_per_sequence / GIB:.2f} GiB per sequence of activations "
                f"with activation checkpointing; usable memory of a {what} is {usable / GIB:.1f} GiB "
                f"(plan.memory_headroom {settings.memory_headroom}). Use more or larger GPUs, or a smaller model.")
        else:
            min_workers = 1
            if choice.strategy == "fsdp":
                min_workers = next((n for n in range(1, workers + 1) if memory_per_worker(
                    model, "fsdp", n, 1, seq, bf16, choice.activation_checkpointing, train.optimizer).total
                    <= usable), workers)
            fitted_micro = min(micro, choice.largest_micro_batch(usable))
            global_batch = max(train.global_batch_sequences(seq), fitted_micro * workers)
            global_batch = math.ceil(global_batch / (fitted_micro * workers)) * fitted_micro * workers
            recommendation = {
                "strategy": choice.strategy,
                "activation_checkpointing": choice.activation_checkpointing,
                "micro_batch_size": fitted_micro,
                "global_batch_size": global_batch,
                "max_steps": max(1, math.ceil(train_tokens / (global_batch * seq))),
                "scaling_config": {"num_workers": [min_workers, workers], "use_gpu": gpu is not None,
                                   "resources_per_worker": {"GPU": 1} if gpu else {"CPU": 1}},
                "memory_per_worker": memory_per_worker(model, choice.strategy, workers, fitted_micro, seq, bf16,
                                                       choice.activation_checkpointing, train.optimizer).total,
            }
    if budget_tokens is not None and budget_tokens < optimal_tokens:
        reasons.append(f"the budget buys {budget_tokens:.3g} tokens, {budget_tokens / optimal_tokens:.0%} of the "
                       f"compute-optimal {optimal_tokens:.3g}: the model will be under-trained")

    time = {}
    if cluster_flops:
        seconds = train_tokens * flops / cluster_flops
        time = {"train_seconds": seconds, "train_hours": seconds / 3600, "gpu_hours": seconds / 3600 * count,
                "optimal_tokens_hours": optimal_tokens * flops / cluster_flops / 3600, "mfu": settings.mfu}
    return Plan(
        model={"preset": model.preset, "arch": model.arch, "d_model": model.d_model, "n_layers": model.n_layers,
               "n_heads": model.n_heads, "seq_len": seq, "vocab_size": model.vocab_size},
        parameters={"total": counts.total, "non_embedding": counts.non_embedding, "embedding": counts.embedding},
        flops_per_token=flops,
        tokens={"compute_optimal": optimal_tokens, "budget": budget_tokens, "planned": train_tokens,
                "tokens_per_parameter": settings.tokens_per_parameter},
        bytes_per_token={"value": bytes_per_token, "source": source},
        storage_bytes=storage,
        gpu={"type": gpu.name if gpu else None, "count": count if gpu else None,
             "peak_bf16_flops": gpu.peak_flops if gpu else None,
             "memory_bytes": gpu.memory_bytes if gpu else None, "usable_bytes": usable,
             "precision": "bf16" if bf16 else "fp32"},
        memory=rows,
        time=time,
        recommendation=recommendation,
        feasible=feasible,
        reasons=reasons,
    )


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def format_table(plan: Plan) -> str:
    p, t = plan.parameters, plan.tokens
    lines = [
        f"model            {plan.model['preset'] or 'config'}: d_model {plan.model['d_model']}, "
        f"{plan.model['n_layers']} layers, seq_len {plan.model['seq_len']}, vocab {plan.model['vocab_size']}",
        f"parameters       {p['total']:,} total, {p['non_embedding']:,} non-embedding",
        f"FLOPs per token  {plan.flops_per_token:,} (training, forward + backward)",
        f"tokens           compute-optimal {t['compute_optimal']:.3g} ({t['tokens_per_parameter']:g}/parameter)"
        + (f", budget {t['budget']:.3g}" if t["budget"] is not None else ""),
        f"corpus           {_size(plan.storage_bytes['curated_data'])} curated text at "
        f"{plan.bytes_per_token['value']:.2f} bytes/token ({plan.bytes_per_token['source']})",
        f"storage          shards {_size(plan.storage_bytes['token_shards'])}, checkpoints "
        f"{_size(plan.storage_bytes['checkpoint_each'])} each, {_size(plan.storage_bytes['checkpoints_kept'])} kept",
    ]
    if plan.gpu["type"]:
        lines.append(f"GPUs             {plan.gpu['count']} x {plan.gpu['type']} "
                     f"({plan.gpu['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {_size(plan.gpu['memory_bytes'])}; "
                     f"usable {_size(plan.gpu['usable_bytes'])}), {plan.gpu['precision']}")
    lines.append("")
    lines.append(f"{'memory/worker':<14} {'ckpt':<5} {'weights':>10} {'grads':>10} {'optim':>10} {'buffers':>10} "
                 f"{'activ.':>10} {'total':>10} {'max mb':>7}")
    for row in plan.memory:
        lines.append(f"{row['strategy']:<14} {'yes' if row['activation_checkpointing'] else 'no':<5} "
                     f"{_size(row['weights']):>10} {_size(row['gradients']):>10} {_size(row['optimizer']):>10} "
                     f"{_size(row['buffers']):>10} {_size(row['activations']):>10} {_size(row['total']):>10} "
                     f"{row.get('largest_micro_batch', '-'):>7}")
    if plan.time:
        lines.append("")
        lines.append(f"time             {plan.time['train_hours']:.1f} h ({plan.time['gpu_hours']:.0f} GPU-hours) "
                     f"at MFU {plan.time['mfu']:.0%}; compute-optimal run {plan.time['optimal_tokens_hours']:.1f} h")
    r = plan.recommendation
    if r:
        s = r["scaling_config"]
        lines.append(f"recommended      strategy {r['strategy']}"
                     f"{' + activation checkpointing' if r['activation_checkpointing'] else ''}, micro-batch "
                     f"{r['micro_batch_size']}, global batch {r['global_batch_size']}, {r['max_steps']:,} steps; "
                     f"ScalingConfig(num_workers=({s['num_workers'][0]}, {s['num_workers'][1]}), "
                     f"use_gpu={s['use_gpu']}, resources_per_worker={s['resources_per_worker']})")
    lines.append(f"feasible         {'yes' if plan.feasible else 'NO'}")
    lines += [f"  - {reason}" for reason in plan.reasons]
    return "\n".join(lines)


def recommended_config(config: RaylmConfig, plan: Plan) -> RaylmConfig:
    """The config with the plan's settings written in (model preset, strategy, batch, workers, steps)."""
    if not plan.recommendation:
        raise ConfigError(["plan: no setting fits, nothing to write (see the reasons above)"])
    tree = config.model_dump(mode="json")
    r = plan.recommendation
    if plan.model["preset"] and config.plan.choose_model:
        tree["model"] = {"preset": plan.model["preset"]}
    low, high = r["scaling_config"]["num_workers"]
    tree["train"].update({
        "strategy": r["strategy"], "activation_checkpointing": r["activation_checkpointing"],
        "micro_batch_size": r["micro_batch_size"], "global_batch_size": r["global_batch_size"],
        "global_batch_tokens": None, "max_steps": r["max_steps"], "budget": None,  # the budget, as steps
        "workers": [low, high] if low != high else high,
        "use_gpu": r["scaling_config"]["use_gpu"],
    })
    if plan.gpu["type"]:
        tree["train"]["precision"] = "bf16"
    return validate_config(tree, "raylm plan --write")


def log_plan(config: RaylmConfig, plan: Plan, table: str) -> str:
    """One MLflow run `plan` with the inputs as params, the figures as metrics, the table and JSON."""
    tracker = Tracker(config.tracking, Workspace(config.workspace.root))
    data = plan.to_dict()
    params = {**flatten({"plan": config.section("plan")}), **flatten({"model": data["model"]}),
              **flatten({"train": {k: v for k, v in config.section("train").items()
                                   if k in ("micro_batch_size", "precision", "strategy", "keep_checkpoints")}})}
    with tracker.run("plan", params=params, tags={"raylm.stage": "plan", "raylm.feasible": str(plan.feasible).lower()}) as run:
        metrics = flatten({k: data[k] for k in ("parameters", "tokens", "storage_bytes", "time")})
        metrics["flops_per_token"] = plan.flops_per_token
        for row in plan.memory:
            key = f"memory.{row['strategy']}{'_ckpt' if row['activation_checkpointing'] else ''}"
            metrics[f"{key}.total"] = row["total"]
            if "largest_micro_batch" in row:
                metrics[f"{key}.largest_micro_batch"] = row["largest_micro_batch"]
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracking.log_dict(data, "plan.json")
        tracking.log_text(table, "plan.txt")
        return run.info.run_id
