"""Evaluation actors: a pool of Ray actors, each holding the checkpoint, answering lm-eval's requests.

lm-eval runs once, on the driver: it builds the documents, prompts and few-shot contexts, and
computes the metrics. `ActorPoolLM` is the model lm-eval talks to; it splits each batch of requests
between the actors (one GPU each when the cluster has GPUs, CPU otherwise), every actor having
loaded the checkpoint once, and puts the answers back in request order. The split keeps all the
choices of a question on one actor, so the shared-context path still computes each context once,
and balances the actors by the text each has to score (largest first to the least loaded actor).

Each request's answer is computed the same way whichever actor gets it, so the scores and
predictions equal those of one actor, or of `RaylmLM` in one process.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any

import ray
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM


class EvalActor:
    """One model replica. Created through `ray.remote` with the pool's resources."""

    def __init__(self, checkpoint: str, lm_kwargs: dict[str, Any], threads: int | None = None):
        import torch

        from raylm.eval.lm import RaylmLM

        if threads:
            torch.set_num_threads(threads)
        self.lm = RaylmLM(checkpoint=checkpoint, **lm_kwargs)

    def answer(self, request_type: str, arguments: list[tuple]) -> list[Any]:
        requests = [Instance(request_type, {}, args, i) for i, args in enumerate(arguments)]
        return getattr(self.lm, request_type)(requests)

    def stats(self) -> dict[str, int]:
        return dict(self.lm.stats)


def actor_resources(num_gpus: float | str, num_cpus: float) -> dict[str, float]:
    if num_gpus == "auto":
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)}


def split_work(keys: list[Any], costs: list[float], n: int) -> list[list[int]]:
    """Indices of `keys` for each of `n` workers; equal keys go to one worker; longest-first balancing."""
    groups: OrderedDict[Any, list[int]] = OrderedDict()
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    heap = [(0.0, w) for w in range(n)]
    shares: list[list[int]] = [[] for _ in range(n)]
    for members in sorted(groups.values(), key=lambda m: -sum(costs[i] for i in m)):
        load, worker = heapq.heappop(heap)
        shares[worker].extend(members)
        heapq.heappush(heap, (load + sum(costs[i] for i in members), worker))
    return [sorted(share) for share in shares]


class ActorPoolLM(LM):
    """lm-eval's model interface over a pool of `EvalActor`s."""

    def __init__(self, checkpoint: str, actors: int = 1, num_gpus: float | str = "auto", num_cpus: float = 1,
                 batch_size: int = 16, max_gen_toks: int = 256, device: str | None = None):
        super().__init__()
        resources = actor_resources(num_gpus, num_cpus)
        remote = ray.remote(**resources)(EvalActor)
        lm_kwargs = {"batch_size": batch_size, "max_gen_toks": max_gen_toks, "device": device}
        threads = max(1, int(num_cpus)) if not resources["num_gpus"] else None
        self.actors = [remote.remote(checkpoint, lm_kwargs, threads) for _ in range(actors)]
        self.checkpoint = checkpoint
        self.resources = resources

    def _dispatch(self, request_type: str, requests: list[Instance]) -> list[Any]:
        arguments = [tuple(req.args) for req in requests]
        if request_type == "loglikelihood":
            keys: list[Any] = [args[0] for args in arguments]  # a question's choices stay together
        else:
            keys = list(range(len(arguments)))
        costs = [float(sum(len(a) for a in args if isinstance(a, str))) for args in arguments]
        shares = [s for s in split_work(keys, costs, len(self.actors))]
        futures = [(share, actor.answer.remote(request_type, [arguments[i] for i in share]))
                   for actor, share in zip(self.actors, shares) if share]
        results: list[Any] = [None] * len(arguments)
        for share, future in futures:
            for i, value in zip(share, ray.get(future)):
                results[i] = value
        for req, value in zip(requests, results):
            self.cache_hook.add_partial(request_type, req.args, value)
        return results

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [tuple(v) for v in self._dispatch("loglikelihood", requests)]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return self._dispatch("loglikelihood_rolling", requests)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self._dispatch("generate_until", requests)

    def stats(self) -> list[dict[str, int]]:
        return ray.get([actor.stats.remote() for actor in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
