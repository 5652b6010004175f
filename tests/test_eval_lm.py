"""The lm-eval adapter: loglikelihoods equal a direct computation from the model's logits."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from eval_helpers import make_checkpoint
from raylm.eval.lm import RaylmLM


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return RaylmLM(checkpoint=str(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "c")), batch_size=3)


def _requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _direct(lm, context: str, continuation: str) -> float:
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    tokens = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = lm.model(tokens[:, :-1]).log_softmax(-1)[0]
    targets = tokens[0, len(context_ids):]
    return float(logprobs[len(context_ids) - 1:].gather(-1, targets[:, None]).sum())


PAIRS = [
    ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants take in?\nAnswer:", " oxygen"),
    ("Question: Which gas do plants take in?\nAnswer:", " the sun is a star and water boils"),
    ("Question: Which gas do plants take in?\nAnswer:", " a"),
    ("The cat sat on the", " mat"),
    ("Water boils at", " 100 degrees."),
    ("def add(a, b):\n", "    return a + b"),
]


def test_shared_context_path_is_used_and_matches_direct_logits(lm):
    assert lm.shared_context
    got = lm.loglikelihood(_requests(PAIRS))
    for (context, continuation), (logprob, _) in zip(PAIRS, got):
        assert logprob == pytest.approx(_direct(lm, context, continuation), abs=1e-4)
    assert lm.stats["forward_rows"] == 4  # one row per distinct context


def test_plain_path_matches_shared_path_and_greedy_flags(lm):
    shared = lm.loglikelihood(_requests(PAIRS))
    lm.shared_context = False
    try:
        plain = lm.loglikelihood(_requests(PAIRS))
    finally:
        lm.shared_context = True
    for (a, greedy_a), (b, greedy_b) in zip(shared, plain):
        assert a == pytest.approx(b, abs=1e-4)
        assert greedy_a == greedy_b


def test_single_token_continuation_greedy_flag(lm):
    context = "The cat sat on the"
    ids = lm.tok_encode(context)
    with torch.no_grad():
        best = int(lm.model(torch.tensor([ids]))[0, -1].argmax())
    text = lm.tok_decode([best])
    (logprob, greedy), = lm.loglikelihood(_requests([(context, text)]))
    if lm.tok_encode(context + text)[len(ids):] == [best]:
        assert greedy
    assert logprob == pytest.approx(_direct(lm, context, text), abs=1e-4)


def test_long_context_is_truncated_like_hf(lm):
    context = "Water boils at 100 degrees. " * 40
    (logprob, _), = lm.loglikelihood(_requests([(context, " The cat")]))
    context_ids, continuation_ids = lm._encode_pair(context, " The cat")
    whole = (context_ids + continuation_ids)[-(lm.max_length + 1):]
    with torch.no_grad():
        logprobs = lm.model(torch.tensor([whole[:-1]])).log_softmax(-1)[0]
    n = len(continuation_ids)
    expected = logprobs[-n:].gather(-1, torch.tensor(whole[-n:])[:, None]).sum()
    assert logprob == pytest.approx(float(expected), abs=1e-4)


def test_rolling_loglikelihood_sums_disjoint_windows(lm):
    text = "The cat sat on the mat. Ice melts when it gets warm. " * 12
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = lm.tok_encode(text)
    assert len(ids) > lm.max_length  # several windows
    expected, done = 0.0, 0
    tokens = [lm.eot_token_id] + ids
    while done < len(ids):  # window k predicts ids[done:done+L] from up to L tokens before
        end = min(done + lm.max_length, len(ids))
        start = max(0, end - lm.max_length)
        inputs = tokens[start:end]
        with torch.no_grad():
            logprobs = lm.model(torch.tensor([inputs])).log_softmax(-1)[0]
        targets = torch.tensor(ids[start:end])
        expected += float(logprobs[-(end - done):].gather(-1, targets[-(end - done):, None]).sum())
        done = end
    assert total == pytest.approx(expected, rel=1e-4)


def test_generate_until_stops_at_stop_sequence_and_is_batch_invariant(lm):
    reqs = [Instance("generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 12}), i)
            for i, ctx in enumerate(["The cat sat on the", "def add(a, b):", "Water"])]
    together = lm.generate_until(reqs)
    alone = [lm.generate_until([r])[0] for r in reqs]
    assert together == alone
    assert all("\n" not in text for text in together)
    # greedy: the first generated token is the argmax after the context
    ids = lm.tok_encode("Water")
    with torch.no_grad():
        best = int(lm.model(torch.tensor([ids]))[0, -1].argmax())
    free = lm.generate_until([Instance("generate_until", {}, ("Water", {"until": [], "max_gen_toks": 3}), 0)])[0]
    assert lm.tok_encode("Water" + free)[len(ids)] == best or free.startswith(lm.tok_decode([best]))


@pytest.mark.slow
def test_lm_eval_own_cli_runs_the_raylm_model(tmp_path, shared_data):
    import os
    import subprocess
    import sys

    from raylm.eval.tasks import build_local_suite

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    build_local_suite(shared_data / "benchmarks", tmp_path / "suite", ["arc_easy"], limit=2)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "raylm.eval", "--model", "raylm", "--model_args",
                           f"checkpoint={checkpoint}", "--batch_size", "4", "--tasks", "arc_easy", "--include_path",
                           str(tmp_path / "suite"), "--limit", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "arc_easy" in done.stdout and "acc_norm" in done.stdout


def test_continuation_longer_than_the_window_is_scored_in_windows_and_counted(lm):
    """An item whose continuation alone exceeds the context length (issue 21: it crashed the run)."""
    context, continuation = "Question: Which gas?\nAnswer:", " The cat sat on the mat." * 60
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    assert len(continuation_ids) > 2 * lm.max_length
    reqs = [Instance("loglikelihood", {}, (context, continuation), 0, ("quiz", 7, 1)),
            Instance("loglikelihood", {}, ("Water boils at 100 degrees. " * 40, " mat"), 1, ("quiz", 8, 1)),
            Instance("loglikelihood", {}, ("The cat sat on the", " mat"), 2, ("quiz", 9, 1))]
    lm.long_items.clear()
    (logprob, greedy), _, short = lm.loglikelihood(reqs)
    expected, done, whole = 0.0, 0, context_ids + continuation_ids
    while done < len(continuation_ids):  # disjoint windows, each after as much preceding text as fits
        piece = continuation_ids[done:done + lm.max_length]
        end = len(context_ids) + done + len(piece)
        row = whole[end - lm.max_length - 1:end]
        with torch.no_grad():
            logprobs = lm.model(torch.tensor([row[:-1]])).log_softmax(-1)[0]
        expected += float(logprobs[-len(piece):].gather(-1, torch.tensor(piece)[:, None]).sum())
        done += len(piece)
    assert logprob == pytest.approx(expected, rel=1e-4) and greedy is False
    assert short[0] == pytest.approx(_direct(lm, "The cat sat on the", " mat"), abs=1e-4)
    assert {k: sorted(v) for k, v in lm.long_items["quiz"].items()} == {"truncated": [7, 8], "windowed": [7]}
