"""Evaluation actors: a pool of Ray actors, each holding the checkpoint, answering lm-eval's requests.

lm-eval runs once, on the driver: it builds the documents, prompts and few-shot contexts, and
computes the metrics. `ActorPoolLM` is the model lm-eval talks to. It tokenizes the requests and
plans the batches on the driver with `RaylmLM`'s own planning code (no weights needed), then hands
whole batches to the actors (one GPU each when the cluster has GPUs, CPU otherwise; each loaded the
checkpoint once), the longest batch first to the least-loaded actor, and puts the answers back in
request order. A batch is computed the same way whichever actor gets it, and the batches are those
a single process would form, so scores and per-request numbers equal one actor's, and one
`RaylmLM`'s in one process with the same number of threads.
"""

from __future__ import annotations

import heapq
from typing import Any

import ray
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from raylm.eval.progress import PROGRESS_BATCHES, Progress


class EvalActor:
    """One model replica. Created through `ray.remote` with the pool's resources."""

    def __init__(self, checkpoint: str, lm_kwargs: dict[str, Any], threads: int | None = None):
        # deferred: pulls in torch, slow to import; only this path needs it
        import torch

        from raylm.eval.lm import RaylmLM

        if threads:
            torch.set_num_threads(threads)
        self.lm = RaylmLM(checkpoint=checkpoint, **lm_kwargs)

    def info(self) -> dict[str, Any]:
        return {"shared_context": self.lm.shared_context, "device": str(self.lm.device_), **self.lm.stats}

    def run_loglikelihood(self, requests: list[tuple], batches: list) -> dict[int, tuple[float, bool]]:
        return self.lm.run_loglikelihood(requests, batches)

    def run_generation(self, jobs: list[tuple], encoded: list[list[int]], batches: list) -> dict[int, str]:
        # deferred: pulls in torch, slow to import; only this path needs it
        from raylm.eval.generation import run_generation

        return run_generation(self.lm, jobs, encoded, batches)


def actor_resources(num_gpus: float | str, num_cpus: float) -> dict[str, float]:
    if num_gpus == "auto":
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)}


def assign(costs: list[float], n: int) -> list[list[int]]:
    """Indices of work items for each of `n` workers: largest first to the least-loaded worker."""
    heap = [(0.0, w) for w in range(n)]
    shares: list[list[int]] = [[] for _ in range(n)]
    for item in sorted(range(len(costs)), key=lambda i: -costs[i]):
        load, worker = heapq.heappop(heap)
        shares[worker].append(item)
        heapq.heappush(heap, (load + costs[item], worker))
    return [sorted(share) for share in shares]


def _flat(members: list) -> list[int]:
    return [i for m in members for i in (m if isinstance(m, list) else [m])]


class ActorPoolLM(LM):
    """lm-eval's model interface over a pool of `EvalActor`s."""

    def __init__(self, checkpoint: str, actors: int = 1, num_gpus: float | str = "auto", num_cpus: float = 1,
                 batch_size: int = 16, max_gen_toks: int = 256, device: str | None = None):
        super().__init__()
        # deferred: pulls in torch, slow to import; only this path needs it
        from raylm.eval.lm import RaylmLM

        resources = actor_resources(num_gpus, num_cpus)
        remote = ray.remote(**resources)(EvalActor)
        lm_kwargs = {"batch_size": batch_size, "max_gen_toks": max_gen_toks, "device": device}
        threads = max(1, int(num_cpus)) if not resources["num_gpus"] else None
        self.actors = [remote.remote(checkpoint, lm_kwargs, threads) for _ in range(actors)]
        shared = all(info["shared_context"] for info in ray.get([a.info.remote() for a in self.actors]))
        self.planner = RaylmLM.planner(checkpoint, batch_size, max_gen_toks, shared)
        self.checkpoint, self.resources = checkpoint, resources

    def _spread(self, method: str, batches: list, cost, *arguments: Any, progress: Any = None) -> dict[int, Any]:
        """Each actor's share of the batches, sent a few batches per call (an actor runs its calls in
        order, so the numbers are the same) so that `progress` hears as parts come back."""
        refs = [ray.put(argument) for argument in arguments]
        shares = assign([float(cost(b)) for b in batches], len(self.actors))
        rows = {}
        for actor, share in zip(self.actors, shares):
            for start in range(0, len(share), PROGRESS_BATCHES):
                part = [batches[i] for i in share[start:start + PROGRESS_BATCHES]]
                rows[getattr(actor, method).remote(*refs, part)] = sum(len(_flat(b[1]) if isinstance(b, tuple) else b)
                                                                       for b in part)
        results: dict[int, Any] = {}
        pending = list(rows)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.update(ray.get(done[0]))
            if progress is not None:
                progress.advance(rows[done[0]])
        return results

    def _loglikelihood(self, encoded: list[tuple], shared: bool | None = None,
                       progress: Any = None) -> dict[int, tuple[float, bool]]:
        # deferred: pulls in torch, slow to import; only this path needs it
        from raylm.eval.lm import join_pieces, split_long_requests

        pieces, owners = split_long_requests(encoded, self.planner.max_length)
        batches = self.planner.plan_loglikelihood(pieces, shared)
        tokens = lambda batch: sum(len(pieces[i][1]) + len(pieces[i][2]) for i in _flat(batch[1]))  # noqa: E731
        return join_pieces(self._spread("run_loglikelihood", batches, tokens, pieces, progress=progress), owners)

    @property
    def long_items(self) -> dict[str, dict[str, set]]:
        return self.planner.long_items

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # deferred: pulls in torch, slow to import; only this path needs it
        from raylm.eval.lm import record_long_items

        encoded = self.planner.encode_loglikelihood([tuple(req.args) for req in requests])
        record_long_items(self.planner.long_items, requests, encoded, self.planner.max_length)
        progress = Progress("loglikelihood", requests)
        results = self._loglikelihood(encoded, progress=progress)
        progress.finish()
        out = [tuple(results[i]) for i in range(len(requests))]
        for req, value in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, value)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        # deferred: pulls in torch, slow to import; only this path needs it
        from raylm.eval.lm import rolling_totals

        windows, owners = self.planner.rolling_windows([req.args[0] for req in requests])
        progress = Progress("loglikelihood_rolling", requests, rows=len(windows))
        scored = self._loglikelihood(windows, shared=False, progress=progress)
        progress.finish()
        return rolling_totals(requests, owners, scored, self.cache_hook)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        # deferred: pulls in torch, slow to import; only this path needs it
        from raylm.eval.generation import plan_generation
        from raylm.eval.lm import record_long_prompts

        jobs = self.planner.generation_jobs([tuple(req.args) for req in requests], self.planner.max_gen_toks)
        record_long_prompts(self.planner.long_items, requests, jobs, self.planner.tok_encode, self.planner.max_length)
        encoded, batches = plan_generation(self.planner, jobs)
        cost = lambda batch: sum(len(encoded[i]) + jobs[i][2] for i in batch)  # noqa: E731
        progress = Progress("generate_until", requests)
        results = self._spread("run_generation", batches, cost, jobs, encoded, progress=progress)
        progress.finish()
        out = [results[i] for i in range(len(requests))]
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def stats(self) -> list[dict[str, Any]]:
        return ray.get([actor.info.remote() for actor in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
