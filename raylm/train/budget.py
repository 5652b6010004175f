"""From a compute budget (`train.budget`) to the number of optimizer steps.

FLOPs, tokens and tokens per parameter are known before training: steps = tokens / (global batch
sequences x seq_len), with tokens = FLOPs / (training FLOPs per token, raylm/model/sizing.py) or
tokens_per_parameter x parameters. The launcher fixes `max_steps` with it, and `raylm plan` reads the
same numbers. A minutes budget needs the run's throughput: the loop times `measure_steps` steps (after
the first, which pays for start-up), then fixes the step count that fits the minutes (`steps_for_minutes`),
keeps it in the trainer state (a resumed or resized run keeps it) and logs it. The step count is rounded
down, so the schedule completes within the budget.
"""

from __future__ import annotations

import math

from raylm.config import BudgetConfig
from raylm.model.config import TransformerConfig
from raylm.model.sizing import flops_per_token, parameter_count


def budget_tokens(budget: BudgetConfig, model: TransformerConfig) -> float | None:
    """Training tokens the budget buys; None for a minutes budget (it depends on the measured speed)."""
    if budget.kind == "tokens":
        return budget.tokens
    if budget.kind == "flops":
        return budget.flops / flops_per_token(model)
    if budget.kind == "tokens_per_parameter":
        return budget.tokens_per_parameter * parameter_count(model).total
    return None


def budget_steps(budget: BudgetConfig, model: TransformerConfig, global_batch_sequences: int) -> int | None:
    """Optimizer steps of a FLOPs / tokens / tokens-per-parameter budget (at least 1); None for minutes."""
    tokens = budget_tokens(budget, model)
    if tokens is None:
        return None
    return max(1, math.floor(tokens / (global_batch_sequences * model.seq_len)))


def steps_for_minutes(minutes: float, steps_done: int, seconds_per_step: float) -> int:
    """Total steps of a minutes budget: the steps done so far, timed at `seconds_per_step` for the rest
    (at least the steps done, and at least 1)."""
    return max(1, steps_done, math.floor(minutes * 60 / seconds_per_step))
