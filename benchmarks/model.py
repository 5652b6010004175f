"""raylm's decoder against the same-shaped `transformers` model, and generation with vs without the KV cache.

Training throughput: forward + backward tokens/s of raylm's modern decoder (RoPE, SwiGLU, RMSNorm)
against `LlamaForCausalLM`, and of a GPT-2-style raylm decoder (learned positions, LayerNorm, GELU)
against `GPT2LMHeadModel`; each pair has the same weights (the HF model is raylm's export), batch and
sequence. Runs alternate between the two models (who goes first alternates too) and the median is
reported, so a busy machine slows both alike. Generation: greedy tokens/s of raylm's decoder with and without its KV cache.

    python benchmarks/model.py [--preset laptop] [--batch 8] [--seq 256] [--rounds 9] [--steps 3]

Ends with one line: `model: key=value ...` (ratios > 1 mean raylm is faster).
"""

from __future__ import annotations

import os

import _repo  # noqa: F401  (puts the repository root on sys.path)

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from raylm.model import build_model, preset  # noqa: E402
from raylm.model.generate import generate  # noqa: E402
from raylm.model.hf import export_hf  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_step_time(forward, params, tokens: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        logits = forward(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        for p in params:
            p.grad = None
    return (time.perf_counter() - start) / steps


def compare(config, batch: int, seq: int, rounds: int, steps: int) -> tuple[float, float, str]:
    import transformers

    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    ours = build_model(config).train()
    with tempfile.TemporaryDirectory() as folder:
        export_hf(ours, config, None, folder)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).train()
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    our_forward = lambda t: ours(t)  # noqa: E731
    their_forward = lambda t: theirs(t).logits  # noqa: E731
    for forward, model in ((our_forward, ours), (their_forward, theirs)):  # warm-up
        train_step_time(forward, list(model.parameters()), tokens, 1)
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    runs = {"ours": (our_forward, list(ours.parameters())), "theirs": (their_forward, list(theirs.parameters()))}
    for round_index in range(rounds):  # who goes first alternates, so neither always meets a warmer cache
        order = ("ours", "theirs") if round_index % 2 == 0 else ("theirs", "ours")
        for name in order:
            times[name].append(train_step_time(*runs[name], tokens, steps))
    our_times, their_times = times["ours"], times["theirs"]
    tokens_per_step = batch * seq
    return tokens_per_step / statistics.median(our_times), tokens_per_step / statistics.median(their_times), type(theirs).__name__


def generation(config, batch: int, prompt_len: int, new_tokens: int, rounds: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(replace(config, seq_len=max(config.seq_len, prompt_len + new_tokens))).eval()
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len)).tolist()
    rates = {True: [], False: []}
    for _ in range(rounds):
        for use_cache in (True, False):
            start = time.perf_counter()
            out = generate(model, prompts, max_new_tokens=new_tokens, use_cache=use_cache)
            rates[use_cache].append(sum(map(len, out)) / (time.perf_counter() - start))
    return statistics.median(rates[True]), statistics.median(rates[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="laptop")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--gen-prompt", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=64)
    args = parser.parse_args()

    modern = preset(args.preset, seq_len=max(args.seq, 2))
    gpt2_style = replace(modern, position="learned", activation="gelu", norm="layernorm", bias=True, ffn_hidden=4 * modern.d_model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; preset {args.preset}: d_model {modern.d_model}, "
          f"{modern.n_layers} layers, vocab {modern.vocab_size}; batch {args.batch} x seq {args.seq}")
    print(f"{'model':<34}{'raylm tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}")
    results = {}
    for label, config in (("modern", modern), ("gpt2", gpt2_style)):
        ours, theirs, name = compare(config, args.batch, args.seq, args.rounds, args.steps)
        results[label] = (ours, theirs)
        print(f"{label + ' (vs ' + name + ')':<34}{ours:>14,.0f}{theirs:>20,.0f}{ours / theirs:>8.2f}")
    cached, uncached = generation(modern, args.gen_batch, args.gen_prompt, args.gen_tokens, max(1, args.rounds // 2))
    print(f"\ngeneration ({args.gen_batch} prompts x {args.gen_prompt} tokens, {args.gen_tokens} new, greedy)")
    print(f"{'KV cache':<34}{cached:>14,.0f} tok/s\n{'recompute every step':<34}{uncached:>14,.0f} tok/s"
          f"\n{'cache speedup':<34}{cached / uncached:>14.2f}x")
    print(f"model: preset={args.preset} batch={args.batch} seq={args.seq} "
          f"raylm_tok_s={results['modern'][0]:.0f} llama_tok_s={results['modern'][1]:.0f} "
          f"vs_llama={results['modern'][0] / results['modern'][1]:.2f} "
          f"raylm_gpt2_tok_s={results['gpt2'][0]:.0f} gpt2_tok_s={results['gpt2'][1]:.0f} "
          f"vs_gpt2={results['gpt2'][0] / results['gpt2'][1]:.2f} "
          f"gen_cache_tok_s={cached:.0f} gen_nocache_tok_s={uncached:.0f} cache_speedup={cached / uncached:.2f}")


if __name__ == "__main__":
    main()
