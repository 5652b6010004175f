"""raylm checkpoints as an lm-eval model: `lm_eval --model raylm --model_args checkpoint=DIR`.

`RaylmLM` reads the native checkpoint (DCP shards, model config, tokenizer.json); there is no
conversion step. It implements lm-eval's three request types:

- `loglikelihood`: requests are grouped by context; each group becomes ONE row
  `[context | choice 1 | choice 2 | ...]` scored under a tree-shaped attention mask (every choice
  sees the context and itself, never the other choices; each choice's rotary positions restart
  where the context ends), so a multiple-choice question's context is computed once for all its
  choices. Rows are batched and sorted by length (longest first). When a group would not fit the
  model's context length, or the model is not the structure this file knows, requests fall back to
  the plain path: one `context + continuation` row each, left-truncated like lm-eval's `hf` model.
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of the model's context length, for
  perplexity and bits-per-byte of whole documents.
- `generate_until`: greedy, batched decoding with the model's KV cache, stopped at the first stop
  sequence (or `max_gen_toks`).

lm-eval has no plugin hook for models, so its own CLI sees `raylm` after this module is imported:
`python -m raylm.eval.lm --model raylm --model_args checkpoint=DIR --tasks ...` runs lm-eval's CLI
with the model registered.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

log = logging.getLogger("raylm")

EOS = "<|eos|>"


def pick_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def masked_forward(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                   allowed: torch.Tensor) -> torch.Tensor:
    """The transformer's forward with explicit positions [B, T] and attention mask [B, T, T] (True: may attend).

    The model's own modules (embedding, positional encoding, blocks, norm, head) with the causal mask
    replaced by `allowed`: that is what lets several continuations share one context in one row.
    """
    x, rope = model.positions(model.embed(tokens), positions)
    x = model.drop(x)
    mask = allowed[:, None]
    for block in model.blocks:
        x = block(x, rope, mask)
    return model.head(model.norm(x)).float()


def shared_context_supported(model: torch.nn.Module) -> bool:
    """True when `masked_forward` reproduces the model's own forward (checked once on random tokens)."""
    try:
        generator = torch.Generator().manual_seed(0)
        time = min(8, model.config.seq_len)
        tokens = torch.randint(0, model.config.vocab_size, (1, time), generator=generator).to(model.embed.weight.device)
        positions = torch.arange(time, device=tokens.device)[None]
        causal = torch.ones(time, time, dtype=torch.bool, device=tokens.device).tril()[None]
        with torch.no_grad():
            return torch.allclose(masked_forward(model, tokens, positions, causal), model(tokens), atol=1e-4, rtol=1e-4)
    except Exception as error:  # noqa: BLE001 - any structural mismatch means "use the plain path"
        log.warning("shared-context scoring disabled: %s", error)
        return False


@register_model("raylm")
class RaylmLM(TemplateLM):
    """An lm-eval model backed by a raylm checkpoint directory (or s3://, gs:// URI)."""

    def __init__(self, checkpoint: str | None = None, batch_size: int | str = 16, device: str | None = None,
                 max_gen_toks: int = 256, shared_context: bool = True, model: torch.nn.Module | None = None,
                 tokenizer_json: str | None = None, **_: Any):
        super().__init__()
        from raylm.data.tokenizer import tokenizer_from_json
        from raylm.train.checkpoint import load_model, load_tokenizer_json, local_checkpoint

        self.device_ = pick_device(device)
        if model is None:
            if checkpoint is None:
                raise ValueError("raylm model needs checkpoint=PATH (a raylm checkpoint directory or URI)")
            with local_checkpoint(str(checkpoint)) as directory:
                model = load_model(directory)
                tokenizer_json = load_tokenizer_json(directory)
        if tokenizer_json is None:
            raise FileNotFoundError(f"checkpoint {checkpoint} has no tokenizer.json")
        self.checkpoint = checkpoint
        self.model = model.to(self.device_).eval()
        self.tokenizer = tokenizer_from_json(tokenizer_json)
        eos = self.tokenizer.token_to_id(EOS)
        self._eot = eos if eos is not None else 0
        self.max_length = int(self.model.config.seq_len)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)
        self.shared_context = bool(shared_context) and str(shared_context).lower() != "false" \
            and shared_context_supported(self.model)
        self.stats = {"forward_rows": 0, "forward_tokens": 0}

    # ---- tokenization -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    # ---- loglikelihood --------------------------------------------------------------------------
    @torch.no_grad()
    def _plain_rows(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One `context + continuation` row per request, left-truncated to the context length."""
        rows = []
        for context, continuation in pairs:
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole[:-1], len(continuation)))
        width = max(len(tokens) for tokens, _ in rows)
        batch = torch.full((len(rows), width), self._eot, dtype=torch.long)
        for i, (tokens, _) in enumerate(rows):
            batch[i, :len(tokens)] = torch.tensor(tokens)
        logits = self.model(batch.to(self.device_)).log_softmax(-1).cpu()
        self.stats["forward_rows"] += len(rows)
        self.stats["forward_tokens"] += int(batch.numel())
        results = []
        for i, ((tokens, n_cont), (_, continuation)) in enumerate(zip(rows, pairs)):
            scores = logits[i, len(tokens) - n_cont:len(tokens)]
            results.append(self._score(scores, continuation))
        return results

    @staticmethod
    def _score(logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        target = torch.tensor(continuation, dtype=torch.long)
        greedy = bool((logprobs.argmax(-1) == target).all())
        return float(logprobs.gather(-1, target[:, None]).sum()), greedy

    @torch.no_grad()
    def _shared_rows(self, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        """One row per context: `[context | cont_1[:-1] | cont_2[:-1] | ...]` under a tree mask."""
        layouts = []
        for context, continuations in groups:
            tokens, positions, segment = list(context), list(range(len(context))), [0] * len(context)
            for index, continuation in enumerate(continuations, start=1):
                tokens += continuation[:-1]
                positions += range(len(context), len(context) + len(continuation) - 1)
                segment += [index] * (len(continuation) - 1)
            layouts.append((tokens, positions, segment))
        width = max(len(tokens) for tokens, _, _ in layouts)
        batch = torch.full((len(layouts), width), self._eot, dtype=torch.long)
        pos = torch.zeros((len(layouts), width), dtype=torch.long)
        seg = torch.full((len(layouts), width), -1, dtype=torch.long)
        for i, (tokens, positions, segment) in enumerate(layouts):
            batch[i, :len(tokens)] = torch.tensor(tokens)
            pos[i, :len(tokens)] = torch.tensor(positions)
            seg[i, :len(tokens)] = torch.tensor(segment)
        index = torch.arange(width)
        query_seg, key_seg = seg[:, :, None], seg[:, None, :]
        allowed = ((key_seg == 0) | (key_seg == query_seg)) & (index[None, None, :] <= index[None, :, None])
        allowed &= key_seg >= 0
        allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding attends to itself: no empty softmax rows
        logits = masked_forward(self.model, batch.to(self.device_), pos.to(self.device_),
                                allowed.to(self.device_)).log_softmax(-1).cpu()
        self.stats["forward_rows"] += len(layouts)
        self.stats["forward_tokens"] += int(batch.numel())
        out = []
        for i, (context, continuations) in enumerate(groups):
            first = logits[i, len(context) - 1]  # predicts every continuation's first token
            results, start = [], len(context)
            for continuation in continuations:
                rest = logits[i, start:start + len(continuation) - 1]
                results.append(self._score(torch.cat([first[None], rest]), continuation))
                start += len(continuation) - 1
            out.append(results)
        return out

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        plain: list[int] = []
        for i, (_, context, continuation) in enumerate(requests):
            groups[tuple(context)].append(i)
        shared = []
        for context, members in groups.items():
            longest = max(len(requests[i][2]) for i in members)
            if self.shared_context and len(context) + longest <= self.max_length + 1 and len(context) >= 1:
                shared.append((list(context), members))
            else:
                plain.extend(members)
        shared.sort(key=lambda g: -(len(g[0]) + sum(len(requests[i][2]) for i in g[1])))
        for start in range(0, len(shared), self.batch_size):
            chunk = shared[start:start + self.batch_size]
            scored = self._shared_rows([(context, [requests[i][2] for i in members]) for context, members in chunk])
            for (_, members), values in zip(chunk, scored):
                for i, value in zip(members, values):
                    results[i] = value
        plain.sort(key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        for start in range(0, len(plain), self.batch_size):
            chunk = plain[start:start + self.batch_size]
            for i, value in zip(chunk, self._plain_rows([(requests[i][1], requests[i][2]) for i in chunk])):
                results[i] = value
        for i, value in enumerate(results):
            if value is not None and requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], value)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for owner, (text,) in enumerate(req.args for req in requests):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, window[0], window[1]))
                owners.append(owner)
        totals = [0.0] * len(requests)
        # Rolling windows never share a context: score them on the plain path.
        order = sorted(range(len(windows)), key=lambda i: -(len(windows[i][1]) + len(windows[i][2])))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, (logprob, _) in zip(chunk, self._plain_rows([(windows[i][1], windows[i][2]) for i in chunk])):
                totals[owners[i]] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -----------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from raylm.eval.generation import generate_texts

        jobs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            jobs.append((context, until, int(kwargs.get("max_gen_toks", self.max_gen_toks))))
        outputs = generate_texts(self, jobs)
        for req, text in zip(requests, outputs):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs


def main() -> None:
    """lm-eval's own CLI, with the `raylm` model registered."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
