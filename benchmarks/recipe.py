"""The `modern` training recipe against the GPT-2-style baseline at equal training FLOPs.

Baseline (raylm/recipe.py `gpt2`): learned positions, LayerNorm, GELU, biases, tied embedding and head,
AdamW on every parameter, cosine schedule. Recipe (`modern`): RoPE, RMSNorm, QK norm, ReLU-squared,
untied head, zero-initialised output projections, soft-capped logits, Muon on the blocks' matrices
(AdamW for the rest) and a warmup-stable-decay schedule. Both get the same training FLOPs (the step count
comes from raylm/train/budget.py with each model's FLOPs per token), the same data, batch and seed.

Two model sizes, two corpora: WikiText-2 (`../shared/data/corpora/wikitext-2`: its valid.txt is the
training text here, test.txt the held-out text, since only those two files are shipped) and the built-in
python-stdlib corpus (files split 95/5 by a stable hash). A byte-level BPE tokenizer is trained per corpus.

Compute efficiency: the FLOPs the baseline needs to reach the recipe's final val loss, divided by the
recipe's FLOPs. The baseline's curve is made of complete runs (each with its own full cosine schedule) at
1x the budget and, as needed, 2x and 4x (recipe better) or 0.5x (recipe worse); the FLOPs for the recipe's
loss are interpolated linearly in log FLOPs between them. Outside those runs the figure is a bound,
reported as the end point and marked `capped`. Also: val bits-per-byte of each at 1x, and the recipe's
training tokens/s over the baseline's.

To save time this trains in-process with a plain loop (one process, `--threads` torch threads), not
through Ray Train; it uses raylm's model, loss, optimizer and schedule code (build_optimizer,
set_learning_rates, learning_rate, budget_steps), which is what the trainer runs per worker.

    python benchmarks/recipe.py [--small] [--sizes 64x2,128x4] [--budget-tokens 400000] [--ablate]

`--ablate` also trains the recipe without each of its options in turn (back to the baseline's value) and
prints each one's val loss, efficiency and speed: what each option buys and costs. An efficiency marked
`>` or `<` lies beyond the baseline's curve: a bound.

Ends with one line: `recipe: efficiency_wikitext=... efficiency_stdlib=... bpb_baseline=... bpb_recipe=...
tokens_per_s_ratio=...` (efficiencies: geometric means over the sizes; bpb: means over sizes and corpora).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import _repo  # noqa: F401  (puts the repository root on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raylm.config import BudgetConfig, TokenizerConfig, TrainConfig  # noqa: E402
from raylm.data.sources import list_stdlib_files  # noqa: E402
from raylm.data.tokenizer import special_id, token_byte_lengths, train_tokenizer  # noqa: E402
from raylm.model import TransformerConfig, build_model  # noqa: E402
from raylm.model.loss import bits_per_byte, loss_and_bytes, split_inputs_targets, summed_loss  # noqa: E402
from raylm.model.sizing import flops_per_token  # noqa: E402
from raylm.recipe import RECIPES  # noqa: E402
from raylm.train.budget import budget_steps  # noqa: E402
from raylm.train.optim import build_optimizer, learning_rate, set_learning_rates  # noqa: E402

WIKITEXT = Path(os.environ.get("RAYLM_SHARED_DATA", _repo.SHARED_DATA_DEFAULT)) / "corpora" / "wikitext-2"


@dataclass
class Corpus:
    name: str
    train: np.ndarray  # [rows, seq_len + 1] token ids
    val: np.ndarray
    pad_id: int
    token_bytes: torch.Tensor
    vocab_size: int


def corpus_texts(name: str, max_bytes: int) -> tuple[list[str], list[str]]:
    if name == "wikitext":
        train = (WIKITEXT / "valid.txt").read_text(encoding="utf-8")[:max_bytes]
        val = (WIKITEXT / "test.txt").read_text(encoding="utf-8")[:max(max_bytes // 10, 50_000)]
        return [train], [val]
    train, val = [], []
    for path in list_stdlib_files(max_bytes):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        (val if int(hashlib.sha1(path.encode()).hexdigest(), 16) % 20 == 0 else train).append(text)
    if not val or sum(map(len, val)) < max_bytes // 20:  # a small sample: hold out its last files instead
        while train and sum(map(len, val)) < max_bytes // 20:
            val.append(train.pop())
    return train, val


def pack(texts: list[str], tokenizer, seq_len: int, eos: int) -> np.ndarray:
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos)
    rows = len(ids) // (seq_len + 1)
    return np.asarray(ids[:rows * (seq_len + 1)], dtype=np.int64).reshape(rows, seq_len + 1)


def load_corpus(name: str, max_bytes: int, vocab: int, seq_len: int) -> Corpus:
    train_texts, val_texts = corpus_texts(name, max_bytes)
    tokenizer = train_tokenizer(iter(train_texts), TokenizerConfig(vocab_size=vocab))
    eos = special_id(tokenizer, "<|eos|>")
    return Corpus(name, pack(train_texts, tokenizer, seq_len, eos), pack(val_texts, tokenizer, seq_len, eos),
                  special_id(tokenizer, "<|pad|>"), torch.from_numpy(token_byte_lengths(tokenizer)),
                  tokenizer.get_vocab_size())


def configs(recipe: str | dict, d_model: int, layers: int, seq_len: int, vocab: int, lr: float,
            warmup: int) -> tuple[TransformerConfig, TrainConfig]:
    keys = RECIPES[recipe] if isinstance(recipe, str) else recipe
    model = TransformerConfig(d_model=d_model, n_layers=layers, n_heads=max(1, d_model // 32), seq_len=seq_len,
                              vocab_size=vocab, **keys["model"])
    train = TrainConfig(lr=lr, warmup_steps=warmup, **keys["train"])
    return model, train


# --ablate: the recipe with one option at a time turned back to the baseline's value (or raylm's default
# where the baseline does not set it), so each option's share of the gain and of the speed is seen.
ABLATIONS = {"qk_norm": ("model", False), "logit_softcap": ("model", None), "zero_init_projections": ("model", False),
             "tie_embeddings": ("model", True), "activation": ("model", "gelu"), "norm": ("model", "layernorm"),
             "position": ("model", "learned"), "optimizer": ("train", "adamw"), "schedule": ("train", "cosine")}


def without(option: str) -> dict:
    section, value = ABLATIONS[option]
    keys = {name: dict(values) for name, values in RECIPES["modern"].items()}
    keys[section][option] = value
    return keys


@torch.no_grad()
def evaluate(model, corpus: Corpus, batch: int) -> tuple[float, float]:
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]
    for start in range(0, len(corpus.val), batch):
        inputs, targets = split_inputs_targets(torch.from_numpy(corpus.val[start:start + batch]))
        for index, value in enumerate(loss_and_bytes(model(inputs), targets, corpus.pad_id, corpus.token_bytes)):
            sums[index] += value
    model.train()
    return sums[0] / max(sums[1], 1), bits_per_byte(sums[2], int(sums[3]))


def train_run(recipe: str | dict, corpus: Corpus, size: tuple[int, int], args, budget_flops: float) -> dict[str, float]:
    """One complete run at `budget_flops` training FLOPs; its val loss, bpb, FLOPs and tokens/s."""
    model_cfg, train = configs(recipe, *size, args.seq_len, corpus.vocab_size, args.lr, args.warmup)
    steps = budget_steps(BudgetConfig(flops=budget_flops), model_cfg, args.batch)
    torch.manual_seed(args.seed)
    model = build_model(model_cfg)
    optimizer = build_optimizer(model, train.lr, train.weight_decay, tuple(train.betas), train.optimizer,
                                train.muon_lr, train.muon_momentum)
    order = np.random.default_rng(args.seed).permutation(len(corpus.train))
    started = time.perf_counter()
    for step in range(steps):
        multiplier = learning_rate(step, 1.0, min(train.warmup_steps, steps // 4), steps, train.min_lr_ratio,
                                   train.schedule, train.decay_fraction)
        set_learning_rates(optimizer, multiplier, train.lr, train.muon_lr)
        picked = order[(np.arange(step * args.batch, (step + 1) * args.batch)) % len(order)]
        inputs, targets = split_inputs_targets(torch.from_numpy(corpus.train[picked]))
        loss, count = summed_loss(model(inputs), targets, corpus.pad_id)
        (loss / count.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    val_loss, bpb = evaluate(model, corpus, args.batch)
    tokens = steps * args.batch * args.seq_len
    return {"val_loss": val_loss, "bpb": bpb, "flops": tokens * flops_per_token(model_cfg), "steps": steps,
            "tokens_per_s": tokens / elapsed}


def flops_to_reach(curve: list[tuple[float, float]], loss: float) -> tuple[float, bool]:
    """FLOPs at which the baseline's (flops, val_loss) curve reaches `loss`, linear in log FLOPs; (end point,
    True) when `loss` lies outside the curve."""
    curve = sorted(curve)
    if loss >= curve[0][1]:
        return curve[0][0], loss > curve[0][1]
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if l1 <= loss <= l0:
            share = (l0 - loss) / (l0 - l1) if l0 != l1 else 1.0
            return math.exp(math.log(f0) + share * (math.log(f1) - math.log(f0))), False
    return curve[-1][0], True


def compare(corpus: Corpus, size: tuple[int, int], args) -> dict[str, float]:
    base_model, _ = configs("gpt2", *size, args.seq_len, corpus.vocab_size, args.lr, args.warmup)
    budget = args.budget_tokens * flops_per_token(base_model)
    recipe = train_run("modern", corpus, size, args, budget)
    baseline = train_run("gpt2", corpus, size, args, budget)
    curve = [(baseline["flops"], baseline["val_loss"])]
    scales = (2.0, 4.0)[:args.max_scale_steps] if recipe["val_loss"] < baseline["val_loss"] else (0.5,)
    for scale in scales:
        run = train_run("gpt2", corpus, size, args, budget * scale)
        curve.append((run["flops"], run["val_loss"]))
        if run["val_loss"] <= recipe["val_loss"]:
            break
    needed, capped = flops_to_reach(curve, recipe["val_loss"])
    if args.ablate:
        ablate(corpus, size, args, budget, curve, recipe, baseline)
    row = {"efficiency": needed / recipe["flops"], "capped": float(capped), "bpb_baseline": baseline["bpb"],
           "bpb_recipe": recipe["bpb"], "loss_baseline": baseline["val_loss"], "loss_recipe": recipe["val_loss"],
           "tokens_per_s_ratio": recipe["tokens_per_s"] / baseline["tokens_per_s"],
           "steps_baseline": baseline["steps"], "steps_recipe": recipe["steps"]}
    print(f"{corpus.name:>9} d{size[0]}x{size[1]}: val loss baseline {baseline['val_loss']:.4f} recipe "
          f"{recipe['val_loss']:.4f} | bpb {baseline['bpb']:.4f} -> {recipe['bpb']:.4f} | steps "
          f"{baseline['steps']} / {recipe['steps']} | efficiency {row['efficiency']:.2f}{' (capped)' if capped else ''}"
          f" | tok/s {baseline['tokens_per_s']:.0f} -> {recipe['tokens_per_s']:.0f}", flush=True)
    return row


def ablate(corpus: Corpus, size: tuple[int, int], args, budget: float, curve: list[tuple[float, float]],
           recipe: dict[str, float], baseline: dict[str, float]) -> None:
    """A table: the recipe without each option, its val loss, efficiency (on the same baseline curve) and
    tokens/s over the baseline's."""
    print(f"  ablation on {corpus.name} d{size[0]}x{size[1]} (the recipe: loss {recipe['val_loss']:.4f}, "
          f"efficiency {flops_to_reach(curve, recipe['val_loss'])[0] / recipe['flops']:.2f}, tok/s x"
          f"{recipe['tokens_per_s'] / baseline['tokens_per_s']:.2f})")
    print(f"  {'without':<22} {'as':<10} {'val loss':>9} {'efficiency':>11} {'tok/s x':>8}")
    for option, (_, value) in ABLATIONS.items():
        run = train_run(without(option), corpus, size, args, budget)
        needed, capped = flops_to_reach(curve, run["val_loss"])
        bound = (">" if run["val_loss"] < min(loss for _, loss in curve) else "<") if capped else " "
        print(f"  {option:<22} {str(value):<10} {run['val_loss']:>9.4f} {bound:>2}{needed / run['flops']:>8.2f} "
              f"{run['tokens_per_s'] / baseline['tokens_per_s']:>8.2f}", flush=True)


def geomean(values: list[float]) -> float:
    return math.exp(statistics.mean(math.log(v) for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a seconds-long run (tests): tiny models and data")
    parser.add_argument("--sizes", default="64x2,128x4", help="d_model x layers, comma-separated")
    parser.add_argument("--corpora", default="wikitext,stdlib")
    parser.add_argument("--budget-tokens", type=int, default=400_000, help="the baseline's training tokens at 1x")
    parser.add_argument("--corpus-bytes", type=int, default=1_100_000)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak (Muon's is the recipe's muon_lr)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-scale-steps", type=int, default=2, help="baseline runs beyond 1x: 2x, then 4x")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablate", action="store_true", help="also train the recipe without each option in turn")
    args = parser.parse_args()
    if args.small:
        args.sizes, args.budget_tokens, args.corpus_bytes, args.vocab = "32x1", 5_000, 100_000, 300
        args.seq_len, args.batch, args.warmup, args.max_scale_steps = 32, 8, 4, 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if "wikitext" in args.corpora.split(",") and not (WIKITEXT / "valid.txt").exists():
        print(f"recipe: WikiText-2 not found at {WIKITEXT} (set RAYLM_SHARED_DATA to the shared data folder, or "
              "--corpora stdlib)", file=sys.stderr)
        sys.exit(2)
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    rows: dict[str, list[dict[str, float]]] = {}
    for name in args.corpora.split(","):
        corpus = load_corpus(name, args.corpus_bytes, args.vocab, args.seq_len)
        print(f"{name}: {len(corpus.train)} train / {len(corpus.val)} val rows of {args.seq_len + 1} tokens, "
              f"vocab {corpus.vocab_size}", flush=True)
        rows[name] = [compare(corpus, size, args) for size in sizes]
    everything = [row for table in rows.values() for row in table]
    figures = {f"efficiency_{name}": geomean([r["efficiency"] for r in table]) for name, table in rows.items()}
    figures.update({
        "bpb_baseline": statistics.mean(r["bpb_baseline"] for r in everything),
        "bpb_recipe": statistics.mean(r["bpb_recipe"] for r in everything),
        "tokens_per_s_ratio": statistics.mean(r["tokens_per_s_ratio"] for r in everything),
        "capped_runs": sum(int(r["capped"]) for r in everything),
    })
    print("recipe: " + " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                                for key, value in figures.items()))


if __name__ == "__main__":
    main()
