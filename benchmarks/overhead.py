"""The whole cost of a run as a user sees it: `raylm pretrain` against a plain PyTorch loop, command to exit.

Same model (raylm's decoder), same packed data (the built-in python-stdlib corpus, curated and tokenized
once beforehand into the config's tokenize stage, not timed), same global batch, micro-batch, optimizer, schedule and number
of steps, so the same tokens. `raylm pretrain` runs with its defaults (one worker, its evaluations and
checkpoints, a local Ray instance it starts itself); the plain loop is one process that reads the same
shards, trains with torch using every core and does nothing else. Each is a separate command, timed from
its start to its exit. Reported for each: wall time, time from command start to the end of the first
optimizer step (raylm: the timestamp of the first `step_loss` its rank 0 logs to MLflow), and steady-state
tokens/s (median of the report windows after the first; raylm's own `tokens_per_s` metric).

    python benchmarks/overhead.py [--steps 292] [--d-model 128 --layers 4 --seq-len 128 --batch 32 --vocab 1024]
    python benchmarks/overhead.py --small                     (a tiny run of each, for the tests)
    python benchmarks/overhead.py --set train.cpus_per_worker=1   (raylm as before issue 24)

Ends with one line: `overhead: wall_ratio=... first_step_s=... steady_ratio=...` (raylm / plain for the
ratios; `first_step_s` is raylm's; the plain loop's and the rest are in the table above it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _repo  # noqa: F401  (puts the repository root on sys.path)

SMALL = dict(steps=12, d_model=32, layers=1, heads=2, seq_len=64, batch=8, micro=4, vocab=512, corpus_bytes=150_000,
             report_every=4, val_fraction=0.2)


def experiment_yaml(args: argparse.Namespace, workspace: Path) -> str:
    """The experiment both runs share: raylm reads it; the plain loop reads its model and train numbers."""
    return f"""
data:
  sources: [{{path: python-stdlib, max_bytes: {args.corpus_bytes}}}]
  val_fraction: {args.val_fraction}
tokenizer: {{vocab_size: {args.vocab}, sample_bytes: {args.corpus_bytes}}}
model: {{d_model: {args.d_model}, n_layers: {args.layers}, n_heads: {args.heads}, seq_len: {args.seq_len}}}
train:
  workers: 1
  max_steps: {args.steps}
  global_batch_size: {args.batch}
  micro_batch_size: {args.micro}
  warmup_steps: {min(20, args.steps // 4)}
  report_every: {args.report_every}
workspace: {{root: {workspace}}}
tracking: {{experiment: overhead}}
"""


def prepare(config_path: Path, args: argparse.Namespace) -> dict:
    """The config's tokenize stage, made once and not timed, by the one-process packer the benchmarks share
    (`tests/stdlib_corpus.py`: a BPE tokenizer on the stdlib sample, then packed shards) through the stage
    machinery, so that `raylm pretrain` finds it finished; its artifact as a dict."""
    from raylm.artifacts import Packed
    from raylm.config import load_config
    from raylm.stage import execute
    from raylm.stage_plan import plan_stages
    from raylm.tracking import Tracker
    from raylm.workspace import Workspace
    from tests.stdlib_corpus import stdlib_packed

    config = load_config(str(config_path))
    workspace = Workspace(config.workspace.root)
    stage = plan_stages(config, workspace).tokenize
    packed = execute(stage, config.section("tokenizer"), Tracker(config.tracking, workspace),
                     lambda stage: stdlib_packed(stage.path(), args.seq_len, args.vocab, args.corpus_bytes,
                                                 args.val_fraction), Packed)
    return {"train_uri": packed.train_uri, "pad_id": packed.tokenizer.pad_id,
            "vocab_size": packed.tokenizer.vocab_size}


def plain_loop(spec: dict) -> None:
    """The plain loop (its own process): read the shards, train with every core, print its figures as JSON."""
    import torch

    from _plain_loop import plain_step
    from raylm.config import load_config
    from raylm.model import Transformer
    from raylm.train.data import PackedSequences
    from raylm.train.optim import build_optimizer

    torch.set_num_threads(os.cpu_count() or 1)
    config = load_config(spec["config"])
    train = config.train
    torch.manual_seed(train.seed)
    model = Transformer(config.model.for_tokenizer(spec["vocab_size"]))
    optimizer = build_optimizer(model, train.lr, train.weight_decay, tuple(train.betas))
    data, pad = PackedSequences(spec["train_uri"]), spec["pad_id"]
    batch, seq_len = train.global_batch_size, config.model.seq_len
    rates, first_step, started = [], None, time.perf_counter()
    for step in range(train.max_steps):
        plain_step(model, optimizer, data, step, train, pad)
        if first_step is None:
            first_step = time.time()
        if (step + 1) % train.report_every == 0:
            now = time.perf_counter()
            rates.append(train.report_every * batch * seq_len / (now - started))
            started = now
    print(json.dumps({"first_step_unix": first_step, "rates": rates, "threads": torch.get_num_threads()}))


def run_plain(config_path: Path, packed: dict, env: dict) -> dict:
    spec = json.dumps({"config": str(config_path), **packed})
    started = time.time()
    done = subprocess.run([sys.executable, __file__, "--plain-loop", spec], env=env, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode:
        raise SystemExit(f"plain loop failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "first_step_s": figures["first_step_unix"] - started, "steady_tok_s": steady(figures["rates"]),
            "threads": figures["threads"]}


def run_raylm(config_path: Path, workspace: Path, overrides: list[str], env: dict) -> dict:
    from mlflow.tracking import MlflowClient

    from raylm.tracking import latest_figures, metric_name

    command = [sys.executable, "-m", "raylm", "pretrain", "--config", str(config_path)]
    for override in overrides:
        command += ["--set", override]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode:
        raise SystemExit(f"raylm pretrain failed:\n{done.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{tracking_db(workspace)}")
    experiment = client.get_experiment_by_name("overhead")
    run = client.search_runs([experiment.experiment_id], "tags.`raylm.stage` = 'pretrain'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    def history(key: str) -> list:  # MLflow names carry their chart section (`train/step_loss`)
        return sorted(client.get_metric_history(run.info.run_id, metric_name(key, "pretrain")), key=lambda m: m.step)

    first = history("step_loss")[0]
    rates = [m.value for m in history("tokens_per_s")]
    figures = latest_figures(client, run.info.run_id, ("torch_threads", "cpus_per_worker"))
    return {"wall_s": wall, "first_step_s": first.timestamp / 1000 - started, "steady_tok_s": steady(rates),
            "threads": figures.get("torch_threads", float("nan")),
            "cpus_per_worker": figures.get("cpus_per_worker", float("nan"))}


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]


def tracking_db(workspace: Path) -> Path:
    found = sorted(workspace.rglob("*.db"))
    if not found:
        raise SystemExit(f"no MLflow store under {workspace}")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=292)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro", type=int, default=8, help="micro-batch of both (raylm's default)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--report-every", type=int, default=10)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to raylm pretrain, e.g. train.cpus_per_worker=1")
    parser.add_argument("--small", action="store_true", help="a tiny run of each (tests)")
    parser.add_argument("--plain-loop", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        plain_loop(json.loads(args.plain_loop))
        return
    if args.small:
        for key, value in SMALL.items():
            setattr(args, key, value)

    folder = Path(tempfile.mkdtemp(prefix="raylm-bench-overhead-"))
    workspace = folder / "workspace"
    config_path = folder / "experiment.yaml"
    config_path.write_text(experiment_yaml(args, workspace))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    packed = prepare(config_path, args)
    load = os.getloadavg()
    plain = run_plain(config_path, packed, env)
    raylm = run_raylm(config_path, workspace, args.overrides, env)
    load_after = os.getloadavg()

    tokens = args.steps * args.batch * args.seq_len
    print(f"\nmodel d={args.d_model} layers={args.layers} seq={args.seq_len} vocab={packed['vocab_size']} "
          f"batch={args.batch} micro={args.micro} steps={args.steps} ({tokens} tokens); "
          f"raylm overrides: {' '.join(args.overrides) or 'none'}; load average {load[0]:.1f} before, "
          f"{load_after[0]:.1f} after; {os.cpu_count()} CPUs")
    print(f"{'run':<34}{'wall s':>8}{'first step s':>14}{'steady tok/s':>14}{'threads':>9}")
    print(f"{'plain PyTorch loop, one process':<34}{plain['wall_s']:>8.1f}{plain['first_step_s']:>14.1f}"
          f"{plain['steady_tok_s']:>14.0f}{plain['threads']:>9}")
    print(f"{'raylm pretrain, 1 worker':<34}{raylm['wall_s']:>8.1f}{raylm['first_step_s']:>14.1f}"
          f"{raylm['steady_tok_s']:>14.0f}{raylm['threads']:>9.0f}")
    print(f"overhead: wall_ratio={raylm['wall_s'] / plain['wall_s']:.3f} first_step_s={raylm['first_step_s']:.1f} "
          f"steady_ratio={raylm['steady_tok_s'] / plain['steady_tok_s']:.3f} raylm_wall_s={raylm['wall_s']:.1f} "
          f"plain_wall_s={plain['wall_s']:.1f} plain_first_step_s={plain['first_step_s']:.1f} "
          f"raylm_tok_s={raylm['steady_tok_s']:.0f} plain_tok_s={plain['steady_tok_s']:.0f} "
          f"raylm_cpus_per_worker={raylm['cpus_per_worker']:g} raylm_threads={raylm['threads']:g}")


if __name__ == "__main__":
    main()
