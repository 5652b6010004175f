"""Serving a trained checkpoint outside raylm: an MLflow pyfunc model built from code (`pyfunc_model.py`).

This module is the contract between the code that logs a model (`raylm.registry`) and the file MLflow
loads (`pyfunc_model.py`, the only raylm module besides `raylm.tracking` that imports MLflow: MLflow runs
it to build the model): the artifact keys, the generation params with their defaults, and how prompts
are read from a pyfunc input.
"""

from __future__ import annotations

from typing import Any

WEIGHTS = "weights"  # artifact keys, as `raylm.registry` logs them
MODEL_CONFIG = "model_config"
TOKENIZER = "tokenizer"
PARAM_DEFAULTS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}


def prompts_of(model_input: Any) -> list[str]:
    """The prompts of a pyfunc input: a string, a list of strings, a dict or DataFrame with a `prompt` column."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(value) for value in model_input[column].tolist()]
    if isinstance(model_input, dict):
        values = model_input.get("prompt", next(iter(model_input.values()), []))
        return [values] if isinstance(values, str) else [str(v) for v in values]
    return [str(value) for value in model_input]
