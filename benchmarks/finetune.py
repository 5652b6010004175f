"""Memory and step time of `full`, `frozen` and `lora` fine-tuning, side by side on one base model and data.

Each method runs in its own fresh process (so peak memory is its own): the same base weights, the same
batches of packed chat data (a synthetic instruction set rendered with the chat template, loss mask
included), the optimizer the trainer uses (AdamW over parameters that require grad), and the same number
of timed optimizer steps after warm-up. Reported per method: trainable parameters, the exact bytes of
gradients plus optimizer state, the peak memory of training (on CPU the growth of peak RSS once the
model is built, imports and data excluded; on CUDA the peak allocated), and
the median step time. Ratios are against `full`.

    python benchmarks/finetune.py [--d-model 256 --layers 6 --seq-len 256 --batch 8 --steps 6]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import resource
import statistics
import sys
import time
from queue import Empty

import _repo  # noqa: F401,E402  (puts the repository root on sys.path)

METHODS = {
    "full": {"method": "full"},
    "frozen": {"method": "frozen", "frozen": {"first_blocks": None, "last_blocks": 1}},
    "lora": {"method": "lora", "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0,
                                        "target_modules": ["qkv", "proj", "gate", "up", "down"]}},
}


def chat_batches(args, tokenizer_json: str):
    """Packed rows and loss masks of a synthetic instruction set, rendered like `raylm finetune` does."""
    import numpy as np

    from raylm.data.chat import chat_token_ids, conversation_of, pack_conversations, render
    from raylm.data.tokenizer import tokenizer_from_json

    tokenizer = tokenizer_from_json(tokenizer_json)
    ids = chat_token_ids(tokenizer)
    rng = random.Random(0)
    rendered = []
    while len(rendered) < args.batch * (args.steps + args.warmup) * 4:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        turns = conversation_of({"prompt": f"What is {a} plus {b}? Explain the steps.",
                                 "response": f"Add the tens, then the units: {a} plus {b} is {a + b}."})
        rendered.append(render(turns, tokenizer, ids))
    tokens, masks, _ = pack_conversations(rendered, args.seq_len, ids["pad"])
    if len(tokens) == 0:
        raise SystemExit(f"finetune benchmark: no conversation fits --seq-len {args.seq_len}; use a longer one")
    need = args.batch * (args.steps + args.warmup)
    repeat = -(-need // len(tokens))
    return np.tile(tokens, (repeat, 1))[:need], np.tile(masks, (repeat, 1))[:need], ids["pad"]


def run_method(name: str, args, tokenizer_json: str, queue) -> None:
    import torch
    import torch.nn.functional as F

    from raylm.finetune import parameter_counts, prepare_for_finetune
    from raylm.model import Transformer, TransformerConfig
    from raylm.model.loss import lm_batch
    from raylm.train.optim import build_optimizer

    import peft  # noqa: F401 - imported by every method, so its import is not counted against LoRA

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    rows, masks, pad_id = chat_batches(args, tokenizer_json)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the model exists
    config = TransformerConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                               n_heads=args.heads, seq_len=args.seq_len)
    torch.manual_seed(0)
    model = prepare_for_finetune(Transformer(config), METHODS[name]).to(device)
    optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        batch = torch.from_numpy(rows[step * args.batch:(step + 1) * args.batch]).long().to(device)
        mask = torch.from_numpy(masks[step * args.batch:(step + 1) * args.batch]).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        inputs, targets = lm_batch(batch, config, loss_mask=mask, ignore_id=pad_id)
        logits = model(**inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradients allocated: they are part of the footprint
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.grad is not None)
    optim_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                      for t in state.values() if torch.is_tensor(t))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    queue.put({"method": name, **parameter_counts(model), "state_bytes": grad_bytes + optim_bytes,
               "peak_bytes": peak, "step_s": statistics.median(times), "loss": float(loss.detach()), "device": device.type})


def result_of(name: str, process, queue) -> dict:
    """The method's result, or exit 1 naming the method when its process died before sending one."""
    while process.is_alive() or not queue.empty():
        try:
            result = queue.get(timeout=1)
        except Empty:
            continue
        process.join()
        return result
    sys.exit(f"finetune benchmark: the {name} process exited with code {process.exitcode} before reporting")


def tokenizer_with_chat_tokens(vocab: int) -> str:
    from raylm.config import TokenizerConfig
    from raylm.data.chat import TEMPLATE_TOKENS
    from raylm.data.tokenizer import train_tokenizer

    texts = [f"What is {a} plus {b}? Add the tens, then the units: {a} plus {b} is {a + b}."
             for a in range(100) for b in range(0, 100, 7)]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=vocab, min_frequency=1,
                                                  special_tokens=list(TEMPLATE_TOKENS.values()))).to_str()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from raylm.data.tokenizer import tokenizer_from_json

    tokenizer_json = tokenizer_with_chat_tokens(2048)

    args.vocab = tokenizer_from_json(tokenizer_json).get_vocab_size()
    context = mp.get_context("spawn")
    results = {}
    for name in METHODS:
        queue = context.Queue()
        process = context.Process(target=run_method, args=(name, args, tokenizer_json, queue))
        process.start()
        results[name] = result_of(name, process, queue)

    mib = 1 / 2**20
    full = results["full"]
    print(f"fine-tuning methods on one base (d_model {args.d_model}, {args.layers} layers, seq_len {args.seq_len}, "
          f"batch {args.batch}, {results['full']['device']}, median of {args.steps} steps)")
    print(f"{'method':<8} {'trainable':>12} {'of total':>9} {'grad+optim MiB':>15} {'peak MiB':>9} {'step ms':>8} "
          f"{'time x':>7} {'state x':>8} {'peak x':>7}")
    for name, row in results.items():
        print(f"{name:<8} {row['params_trainable']:>12,} {row['params_trainable'] / row['params_total']:>9.1%} "
              f"{row['state_bytes'] * mib:>15.1f} {row['peak_bytes'] * mib:>9.1f} {row['step_s'] * 1e3:>8.1f} "
              f"{row['step_s'] / full['step_s']:>7.2f} {row['state_bytes'] / full['state_bytes']:>8.3f} "
              f"{row['peak_bytes'] / full['peak_bytes']:>7.2f}")
    fields = []
    for name, row in results.items():
        fields += [f"{name}_step_ms={row['step_s'] * 1e3:.1f}", f"{name}_state_mib={row['state_bytes'] * mib:.1f}",
                   f"{name}_peak_mib={row['peak_bytes'] * mib:.1f}", f"{name}_trainable={row['params_trainable']}"]
    for name in ("frozen", "lora"):
        row = results[name]
        fields += [f"{name}_vs_full_time={row['step_s'] / full['step_s']:.3f}",
                   f"{name}_vs_full_state={row['state_bytes'] / full['state_bytes']:.4f}",
                   f"{name}_vs_full_peak={row['peak_bytes'] / full['peak_bytes']:.3f}"]
    print("finetune: " + " ".join(fields))


if __name__ == "__main__":
    main()
