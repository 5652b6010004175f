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
  A continuation longer than the context length itself (where lm-eval's `hf` model stops on an
  assertion) is scored in disjoint windows, each with as much of what precedes it as fits, and the
  windows' log-likelihoods summed. Per task, the items whose context was cut (`truncated`) and whose
  continuation needed windows (`windowed`) are counted in `long_items` (`record_long_items`; a
  generation prompt cut to fit, `record_long_prompts`).
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of the model's context length, for
  perplexity and bits-per-byte of whole documents.
- `generate_until`: greedy, batched decoding with the model's KV cache, stopped at the first stop
  sequence (or `max_gen_toks`).

lm-eval has no plugin hook for models, so its own CLI sees `raylm` after this module is imported:
`python -m raylm.eval --model raylm --model_args checkpoint=DIR --tasks ...` (or the `raylm-lm-eval`
script) runs lm-eval's own CLI with the model registered. `checkpoint` may also be a registered model,
`models:/NAME/VERSION` or `models:/NAME@ALIAS`, looked up in `tracking_uri` (a model arg; default
MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import torch
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from raylm.data.tokenizer import tokenizer_from_json
from raylm.eval.generation import generate_texts
from raylm.eval.progress import PROGRESS_BATCHES, Progress
from raylm.train.checkpoint import load_model, load_model_config, load_tokenizer_json, local_checkpoint

log = logging.getLogger("raylm")

EOS = "<|eos|>"
Batch = tuple[str, list]  # ("shared", [[request indices of one context], ...]) | ("plain", [request indices])


def pick_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested (lm-eval's default) but CUDA is not available: using the CPU", device)
        return torch.device("cpu")
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


def rolling_totals(requests: list[Any], owners: list[int], scored: dict[int, tuple[float, bool]] | list,
                   cache_hook: Any) -> list[float]:
    """Each request's rolling log-likelihood: the sum of its windows' scores (window i belongs to
    request `owners[i]`), also recorded in lm-eval's cache."""
    totals = [0.0] * len(requests)
    for i, owner in enumerate(owners):
        totals[owner] += scored[i][0]
    for req, total in zip(requests, totals):
        cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals


def continuation_windows(context: list[int], continuation: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """One request as `(context, continuation)` pieces that each fit `max_length + 1` tokens.

    A continuation that fits is one piece (its context is left-truncated when the row is formed);
    a longer one is cut into disjoint pieces of `max_length` tokens, each scored after as much of the
    text before it (context, then the earlier pieces) as fits."""
    if len(continuation) <= max_length:
        return [(context, continuation)]
    pieces = []
    for start in range(0, len(continuation), max_length):
        piece = continuation[start:start + max_length]
        pieces.append(((context + continuation[:start])[-(max_length + 1 - len(piece)):], piece))
    return pieces


def split_long_requests(requests: list[tuple[Any, list[int], list[int]]],
                        max_length: int) -> tuple[list[tuple[Any, list[int], list[int]]], list[int]]:
    """Every request's pieces (`continuation_windows`), and the request each piece belongs to."""
    pieces, owners = [], []
    for owner, (key, context, continuation) in enumerate(requests):
        for piece in continuation_windows(context, continuation, max_length):
            pieces.append((key, *piece))
            owners.append(owner)
    return pieces, owners


def join_pieces(scored: dict[int, tuple[float, bool]], owners: list[int]) -> dict[int, tuple[float, bool]]:
    """Per request: the sum of its pieces' log-likelihoods, greedy when every piece is."""
    joined: dict[int, tuple[float, bool]] = {}
    for i, owner in enumerate(owners):
        logprob, greedy = scored[i]
        if owner in joined:
            logprob, greedy = joined[owner][0] + logprob, joined[owner][1] and greedy
        joined[owner] = (logprob, greedy)
    return joined


def record_long_items(counts: dict[str, dict[str, set]], instances: list[Any],
                      encoded: list[tuple[Any, list[int], list[int]]], max_length: int) -> None:
    """Add to `counts[task]["truncated" | "windowed"]` the documents with a request whose context is
    cut to fit the window, or whose continuation alone is longer than the window."""
    for instance, (_, context, continuation) in zip(instances, encoded):
        task = getattr(instance, "task_name", None) or "(untasked)"
        entry = counts.setdefault(task, {"truncated": set(), "windowed": set()})
        if len(context) + len(continuation) > max_length + 1:
            entry["truncated"].add(instance.doc_id)
        if len(continuation) > max_length:
            entry["windowed"].add(instance.doc_id)


def record_long_prompts(counts: dict[str, dict[str, set]], instances: list[Any],
                        jobs: list[tuple[str, list[str], int]], encode: Any, max_length: int) -> None:
    """Add to `counts[task]["truncated"]` the documents whose generation prompt is left-truncated so that
    it and the tokens to generate fit the window (`raylm.eval.generation.plan_generation`)."""
    for instance, (context, _, max_new) in zip(instances, jobs):
        if len(encode(context)) > max(1, max_length - max_new):
            task = getattr(instance, "task_name", None) or "(untasked)"
            counts.setdefault(task, {"truncated": set(), "windowed": set()})["truncated"].add(instance.doc_id)


def long_item_counts(counts: dict[str, dict[str, set]]) -> dict[str, dict[str, int]]:
    return {task: {kind: len(docs) for kind, docs in entry.items()} for task, entry in counts.items()}


@register_model("raylm")
class RaylmLM(TemplateLM):
    """An lm-eval model backed by a raylm checkpoint directory (or s3://, gs:// URI)."""

    def __init__(self, checkpoint: str | None = None, batch_size: int | str = 16, device: str | None = None,
                 max_gen_toks: int = 256, shared_context: bool = True, model: torch.nn.Module | None = None,
                 tokenizer_json: str | None = None, tracking_uri: str | None = None, **_: Any):
        super().__init__()
        if checkpoint is not None and str(checkpoint).startswith("models:/"):
            # deferred: pulls in mlflow; only a registered model needs it
            from raylm.registry import checkpoint_for

            checkpoint, _run = checkpoint_for(str(checkpoint), tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))

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
        self._setup(tokenizer_json, int(self.model.config.seq_len), batch_size, max_gen_toks)
        self.shared_context = bool(shared_context) and str(shared_context).lower() != "false" \
            and shared_context_supported(self.model)

    def _setup(self, tokenizer_json: str, max_length: int, batch_size: int | str, max_gen_toks: int) -> None:
        self.tokenizer = tokenizer_from_json(tokenizer_json)
        eos = self.tokenizer.token_to_id(EOS)
        self._eot = eos if eos is not None else 0
        self.max_length = max_length
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)
        self.stats = {"forward_rows": 0, "forward_tokens": 0}
        self.long_items: dict[str, dict[str, set]] = {}

    @classmethod
    def planner(cls, checkpoint: str, batch_size: int, max_gen_toks: int, shared_context: bool) -> "RaylmLM":
        """Tokenizer and batching only, no weights: the actor pool plans batches on the driver with it."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        with local_checkpoint(str(checkpoint)) as directory:
            config, tokenizer_json = load_model_config(directory), load_tokenizer_json(directory)
        self.checkpoint, self.model, self.device_ = checkpoint, None, torch.device("cpu")
        self._setup(tokenizer_json, int(config.seq_len), batch_size, max_gen_toks)
        self.shared_context = shared_context
        return self

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

    # Every request type is planned into batches first (pure tokenizer work), then the batches run.
    # The actor pool plans on the driver with the same code and sends whole batches to its actors,
    # so every batch, hence every number, is the same as in one process.
    def plan_loglikelihood(self, requests: list[tuple[Any, list[int], list[int]]],
                           shared: bool | None = None) -> list[Batch]:
        """Batches of request indices: ("shared", [[choices of one context], ...]) or ("plain", [i, ...])."""
        shared = self.shared_context if shared is None else shared
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, context, _) in enumerate(requests):
            groups[tuple(context)].append(i)
        together, plain = [], []
        for context, members in groups.items():
            longest = max(len(requests[i][2]) for i in members)
            if shared and len(context) >= 1 and len(context) + longest <= self.max_length + 1:
                together.append(members)
            else:
                plain.extend(members)
        together.sort(key=lambda m: -(len(requests[m[0]][1]) + sum(len(requests[i][2]) for i in m)))
        plain.sort(key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        return ([("shared", together[s:s + self.batch_size]) for s in range(0, len(together), self.batch_size)]
                + [("plain", plain[s:s + self.batch_size]) for s in range(0, len(plain), self.batch_size)])

    def run_loglikelihood(self, requests: list[tuple[Any, list[int], list[int]]],
                          batches: list[Batch]) -> dict[int, tuple[float, bool]]:
        results: dict[int, tuple[float, bool]] = {}
        for kind, members in batches:
            if kind == "shared":
                scored = self._shared_rows([(requests[m[0]][1], [requests[i][2] for i in m]) for m in members])
                for group, values in zip(members, scored):
                    results.update(zip(group, values))
            else:
                results.update(zip(members, self._plain_rows([(requests[i][1], requests[i][2]) for i in members])))
        return results

    def encode_loglikelihood(self, arguments: list[tuple[str, str]]) -> list[tuple[Any, list[int], list[int]]]:
        """lm-eval's own context/continuation tokenization (TemplateLM.loglikelihood), without the scoring."""
        encoded = []
        for context, continuation in arguments:
            if context == "":
                ids = self.tok_encode(continuation)
                pair = ([self.prefix_token_id], ids) if self.prefix_token_id != ids[0] else (ids[:1], ids[1:])
            else:
                pair = self._encode_pair(context, continuation)
            encoded.append(((context, continuation), *pair))
        return encoded

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = self.encode_loglikelihood([tuple(req.args) for req in requests])
        record_long_items(self.long_items, requests, encoded, self.max_length)
        progress = Progress("loglikelihood", requests)
        results = self._loglikelihood_tokens(encoded, progress=progress)
        progress.finish()
        return results

    def run_with_progress(self, requests: list[tuple[Any, list[int], list[int]]], batches: list[Batch],
                          progress: Progress | None) -> dict[int, tuple[float, bool]]:
        """`run_loglikelihood`, a few batches at a time, telling `progress` how many rows are scored."""
        results: dict[int, tuple[float, bool]] = {}
        for start in range(0, len(batches), PROGRESS_BATCHES):
            chunk = batches[start:start + PROGRESS_BATCHES]
            results.update(self.run_loglikelihood(requests, chunk))
            if progress is not None:
                progress.advance(sum(len(members) for _, members in chunk))
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, progress: Progress | None = None,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        pieces, owners = split_long_requests(requests, self.max_length)
        results = join_pieces(self.run_with_progress(pieces, self.plan_loglikelihood(pieces), progress), owners)
        for i, request in enumerate(requests):
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], results[i])
        return [results[i] for i in range(len(requests))]

    def rolling_windows(self, texts: list[str]) -> tuple[list[tuple[None, list[int], list[int]]], list[int]]:
        """lm-eval's disjoint rolling windows of every text, and the text each window belongs to."""
        windows, owners = [], []
        for owner, text in enumerate(texts):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, window[0], window[1]))
                owners.append(owner)
        return windows, owners

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owners = self.rolling_windows([req.args[0] for req in requests])
        progress = Progress("loglikelihood_rolling", requests, rows=len(windows))
        # Rolling windows never share a context: they all go the plain path.
        scored = self.run_with_progress(windows, self.plan_loglikelihood(windows, shared=False), progress)
        progress.finish()
        return rolling_totals(requests, owners, scored, self.cache_hook)

    # ---- generation -----------------------------------------------------------------------------
    @staticmethod
    def generation_jobs(arguments: list[tuple[str, dict]], default_max: int) -> list[tuple[str, list[str], int]]:
        jobs = []
        for context, kwargs in arguments:
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            jobs.append((context, until, int(kwargs.get("max_gen_toks", default_max))))
        return jobs

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        progress = Progress("generate_until", requests)
        jobs = self.generation_jobs([req.args for req in requests], self.max_gen_toks)
        record_long_prompts(self.long_items, requests, jobs, self.tok_encode, self.max_length)
        outputs = generate_texts(self, jobs)
        progress.finish()
        for req, text in zip(requests, outputs):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs


def main() -> None:
    """lm-eval's own CLI, with the `raylm` model registered."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    cli_evaluate()
