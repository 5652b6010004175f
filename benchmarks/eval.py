"""raylm's lm-eval adapter against lm-eval's own `hf` backend, and 2 evaluation actors against 1.

One small checkpoint (a BPE tokenizer trained on Tiny Shakespeare, a randomly initialised decoder)
is exported to a Hugging Face folder; lm-eval then runs the same tasks with the same limit through
`HFLM` (the exported folder) and through `RaylmLM` (the native checkpoint). Reported: the requests
per second each backend answers (time inside the model calls only), whether every per-item
prediction and score is identical, and the time of the same requests on a pool of 1 and 2 Ray
actors.

    python benchmarks/eval.py [--tasks arc_easy,hellaswag] [--limit 40] [--batch-size 16]
"""

from __future__ import annotations

import os
import sys

import _repo  # noqa: F401  (puts the repository root on sys.path)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("RAYLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_checkpoint(directory: Path, d_model: int, n_layers: int, seq_len: int) -> Path:
    from raylm.config import TokenizerConfig
    from raylm.data.tokenizer import train_tokenizer
    from raylm.model import Transformer, TransformerConfig
    from raylm.train.checkpoint import save_checkpoint

    text = (SHARED / "corpora" / "tinyshakespeare" / "input.txt").read_text()[:300_000]
    tokenizer = train_tokenizer(text.split("\n\n"), TokenizerConfig(vocab_size=2048, min_frequency=2))
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=tokenizer.get_vocab_size(), d_model=d_model, n_layers=n_layers,
                               n_heads=max(1, d_model // 32), seq_len=seq_len)
    model = Transformer(config)
    save_checkpoint(str(directory), model, torch.optim.AdamW(model.parameters()), {"step": 0}, config.to_dict(),
                    tokenizer.to_str(), rank=0)
    return directory


class Timed:
    """Wraps an lm-eval model's request methods to add up the time spent answering and the requests."""

    def __init__(self, lm):
        self.seconds, self.requests = 0.0, 0
        for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, name, self._wrap(getattr(lm, name)))

    def _wrap(self, method):
        def timed(requests, *args, **kwargs):
            started = time.perf_counter()
            out = method(requests, *args, **kwargs)
            self.seconds += time.perf_counter() - started
            self.requests += len(requests)
            return out
        return timed


def run(lm, checkpoint: str, settings, out: str):
    from raylm.eval.suite import evaluate_checkpoint

    timer = Timed(lm)
    results = evaluate_checkpoint(checkpoint, settings, out, lm=lm)
    predictions = {}
    for task, path in results["files"].items():
        rows = [json.loads(line) for line in open(path)]
        predictions[task] = [max(range(len(r["filtered_resps"])), key=lambda i: float(r["filtered_resps"][i][0]))
                             for r in rows]
    scores = {task: entry["all"] for task, entry in results["tasks"].items()}
    return timer, scores, predictions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="arc_easy,hellaswag")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--skip-actors", action="store_true")
    args = parser.parse_args()
    if not (SHARED / "benchmarks").exists():
        print(f"shared data not found at {SHARED}; set RAYLM_SHARED_DATA", file=sys.stderr)
        return 2

    from lm_eval.models.huggingface import HFLM

    from raylm.eval.lm import RaylmLM
    from raylm.eval.suite import EvalSettings
    from raylm.model.hf import export_hf
    from raylm.train.checkpoint import load_model, load_model_config, load_tokenizer_json

    torch.set_num_threads(1)  # one core per backend (and per actor): a like-for-like comparison
    with tempfile.TemporaryDirectory(prefix="raylm-bench-eval-") as scratch:
        base = Path(scratch)
        checkpoint = str(make_checkpoint(base / "ckpt", args.d_model, args.layers, args.seq_len))
        folder = export_hf(load_model(checkpoint), load_model_config(checkpoint), load_tokenizer_json(checkpoint),
                           str(base / "hf"))
        settings = EvalSettings(tasks=args.tasks.split(","), limit=args.limit, num_fewshot=0,
                                benchmark_data=str(SHARED / "benchmarks"), batch_size=args.batch_size)
        hf = HFLM(pretrained=folder, device="cpu", batch_size=args.batch_size, max_length=args.seq_len)
        hf_time, hf_scores, hf_pred = run(hf, checkpoint, settings, str(base / "hf_out"))
        ours = RaylmLM(checkpoint=checkpoint, batch_size=args.batch_size)
        our_time, our_scores, our_pred = run(ours, checkpoint, settings, str(base / "raylm_out"))
        identical = hf_pred == our_pred and all(
            abs(our_scores[t][k] - hf_scores[t][k]) < 1e-9 for t in hf_scores for k in hf_scores[t])
        hf_rps, our_rps = hf_time.requests / hf_time.seconds, our_time.requests / our_time.seconds

        rows = [("lm-eval hf", hf_time.requests, hf_time.seconds, hf_rps), ("raylm", our_time.requests,
                                                                            our_time.seconds, our_rps)]
        actor_times = {}
        if not args.skip_actors:
            import ray

            from raylm.eval.actors import ActorPoolLM

            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            for n in (1, 2):
                pool = ActorPoolLM(checkpoint, actors=n, num_gpus=0, num_cpus=1, batch_size=args.batch_size)
                pool.stats()  # wait until every actor has loaded the checkpoint
                timer, scores, pred = run(pool, checkpoint, settings, str(base / f"actors{n}"))
                identical = identical and pred == our_pred
                actor_times[n] = timer.seconds
                rows.append((f"raylm, {n} actor(s)", timer.requests, timer.seconds, timer.requests / timer.seconds))
            ray.shutdown()

    print(f"\ntasks {args.tasks}, limit {args.limit}, model d={args.d_model} L={args.layers} seq={args.seq_len}, "
          f"batch {args.batch_size}")
    print(f"{'backend':<22}{'requests':>10}{'seconds':>10}{'req/s':>10}")
    for name, requests, seconds, rps in rows:
        print(f"{name:<22}{requests:>10}{seconds:>10.2f}{rps:>10.1f}")
    for task in hf_scores:
        print(f"  {task}: hf {hf_scores[task]}  raylm {our_scores[task]}")
    line = (f"eval: hf_rps={hf_rps:.1f} raylm_rps={our_rps:.1f} rps_ratio={our_rps / hf_rps:.2f} "
            f"scores_identical={str(identical).lower()}")
    if actor_times:
        line += (f" actors1_s={actor_times[1]:.2f} actors2_s={actor_times[2]:.2f} "
                 f"actor_speedup={actor_times[1] / actor_times[2]:.2f}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
