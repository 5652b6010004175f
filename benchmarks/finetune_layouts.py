"""Fine-tuning the same conversations brought in every chat layout `raylm finetune` reads.

One tiny random-initialised base model and one synthetic instruction set (short questions and answers),
written once per layout: OpenAI `messages` jsonl (the baseline: the layout the template renders natively),
`prompt`/`completion` parquet, `prompt`/`response` jsonl.gz, ShareGPT `conversations` jsonl, an Alpaca
`.json` array, and renamed columns (`question`/`answer`) in a jsonl.zst read through `finetune.columns`.
Each file goes through the real stage (`Pipeline.finetune`: layout detection, rendering, packing, a
Ray Train run, MLflow), one after another on one Ray instance. The same conversations must give the same
tokens, so every layout should end at the baseline's val loss; the table shows val loss before and after,
the rows and tokens the stage counted, and the wall time of each.

    python benchmarks/finetune_layouts.py [--conversations 240 --steps 30] [--layouts messages,alpaca]

Ends with one line: `finetune_layouts: layouts=... improved=... val_before=... val_after=... max_diff_vs_messages=...`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import tempfile
import time
from pathlib import Path

import _repo  # noqa: F401  (puts the repository root on sys.path)

NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]


def conversations(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for number in range(count):
        name, a, b = rng.choice(NAMES), rng.randint(1, 9), rng.randint(1, 9)
        pairs.append((f"Say hello to {name}.", f"Hello, {name}!") if number % 2
                     else (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return pairs


# name -> (file name, finetune.format, finetune.columns, one record per (prompt, answer))
LAYOUTS = {
    "messages": ("chat.jsonl", "auto", {}, lambda p, r: {"messages": [{"role": "user", "content": p},
                                                                       {"role": "assistant", "content": r}]}),
    "prompt_completion": ("chat.parquet", "auto", {}, lambda p, r: {"prompt": p, "completion": r}),
    "prompt_response": ("chat.jsonl.gz", "auto", {}, lambda p, r: {"prompt": p, "response": r}),
    "sharegpt": ("chat.jsonl", "auto", {}, lambda p, r: {"conversations": [{"from": "human", "value": p},
                                                                          {"from": "gpt", "value": r}]}),
    "alpaca": ("chat.json", "auto", {}, lambda p, r: {"instruction": p, "input": "", "output": r}),
    "columns": ("chat.jsonl.zst", "prompt_response", {"prompt": "question", "response": "answer"},
                lambda p, r: {"question": p, "answer": r}),
}


def write_layout(folder: Path, name: str, pairs: list[tuple[str, str]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    file_name, _, _, record = LAYOUTS[name]
    rows = [record(prompt, answer) for prompt, answer in pairs]
    path = folder / name / file_name
    path.parent.mkdir(parents=True)
    if file_name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    text = json.dumps(rows) if file_name.endswith(".json") else "".join(json.dumps(row) + "\n" for row in rows)
    data = text.encode()
    if file_name.endswith(".gz"):
        data = gzip.compress(data)
    elif file_name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def base_checkpoint(folder: Path, pairs: list[tuple[str, str]], args) -> str:
    """A random-initialised base with a tokenizer trained on the conversations' words and the chat tokens."""
    import torch

    from raylm.config import TokenizerConfig
    from raylm.data.chat import TEMPLATE_TOKENS
    from raylm.data.tokenizer import train_tokenizer
    from raylm.finetune.stage import write_plain_checkpoint
    from raylm.model import Transformer, TransformerConfig

    texts = [f"{prompt} {answer}" for prompt, answer in pairs]
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=320, min_frequency=1,
                                                       special_tokens=list(TEMPLATE_TOKENS.values())))
    config = TransformerConfig(vocab_size=tokenizer.get_vocab_size(), d_model=args.d_model, n_layers=args.layers,
                               n_heads=2, seq_len=args.seq_len)
    torch.manual_seed(0)
    return write_plain_checkpoint(str(folder / "base"), Transformer(config), config.to_dict(), tokenizer.to_str(),
                                  {"step": 0})


def finetune_config(folder: Path, data: Path, name: str, args):
    from raylm.config import validate_config

    _, fmt, columns, _ = LAYOUTS[name]
    return validate_config({
        "model": {"d_model": args.d_model, "n_layers": args.layers, "n_heads": 2, "seq_len": args.seq_len},
        "train": {"workers": 1, "micro_batch_size": 8, "global_batch_size": 8, "eval_sequences": 32,
                  "report_every": max(1, args.steps // 3), "checkpoint_every": 10_000},
        "finetune": {"method": "full", "data": str(data), "format": fmt, "columns": columns, "lr": 3e-3,
                     "max_steps": args.steps, "warmup_steps": max(1, args.steps // 10), "val_fraction": 0.2},
        "workspace": {"root": str(folder / name / "workspace")},
        "tracking": {"uri": f"sqlite:///{folder}/mlflow.db"},
        "cluster": {"num_cpus": 2},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=240)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated, from {', '.join(LAYOUTS)} (messages, the baseline, always runs)")
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()
    chosen = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(LAYOUTS))
    if unknown:
        parser.error(f"--layouts: unknown {', '.join(unknown)}; expected some of {', '.join(LAYOUTS)}")
    chosen = ["messages", *[name for name in chosen if name != "messages"]]

    from raylm.pipeline import Pipeline

    pairs = conversations(args.conversations, args.seed)
    results = {}
    with tempfile.TemporaryDirectory(prefix="raylm-layouts-") as scratch:
        folder = Path(scratch)
        base = base_checkpoint(folder, pairs, args)
        for name in chosen:
            data = write_layout(folder, name, pairs)
            started = time.perf_counter()
            figures = Pipeline(finetune_config(folder, data, name, args)).finetune(base).metrics
            results[name] = (data.name, figures, time.perf_counter() - started)

    baseline_after = results["messages"][1]["val_loss_after"]
    print(f"{'layout':18s} {'file':15s} {'rows':>5s} {'tokens':>7s} {'val before':>10s} {'val after':>9s} "
          f"{'vs messages':>11s} {'seconds':>7s}")
    for name, (file_name, figures, seconds) in results.items():
        tokens = int(figures.get("data_train_tokens", 0) + figures.get("data_val_tokens", 0))
        print(f"{name:18s} {file_name:15s} {int(figures['data_rows_input']):5d} {tokens:7d} "
              f"{figures['val_loss_before']:10.3f} {figures['val_loss_after']:9.3f} "
              f"{figures['val_loss_after'] - baseline_after:+11.4f} {seconds:7.1f}")
    improved = sum(f["val_loss_after"] < f["val_loss_before"] for _, f, _ in results.values())
    max_diff = max(abs(f["val_loss_after"] - baseline_after) for _, f, _ in results.values())
    before = results["messages"][1]["val_loss_before"]
    print(f"finetune_layouts: layouts={len(results)} improved={improved} val_before={before:.3f} "
          f"val_after={baseline_after:.3f} max_diff_vs_messages={max_diff:.4f}")


if __name__ == "__main__":
    main()
