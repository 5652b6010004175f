"""Text cleaning, one batch at a time.

Plain functions over pandas batches of document rows; Ray Data wraps them with `map_batches`, and
the tests call them directly. A row already marked with a rejection reason passes through untouched.
"""

from __future__ import annotations

import re

import pandas as pd

_TRAILING_SPACE = re.compile(r"[ \t\f\v]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Unify line endings, drop trailing spaces, collapse runs of blank lines, trim the ends.

    Leading indentation is kept: much of the corpus is code.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip("\n").rstrip()


def clean_batch(batch: pd.DataFrame, min_chars: int = 1) -> pd.DataFrame:
    """Normalise whitespace of the rows still in play; mark those left (nearly) empty."""
    live = batch["reason"] == ""
    if live.any():
        cleaned = batch.loc[live, "text"].map(normalize_whitespace)
        batch.loc[live, "text"] = cleaned
        too_short = live & (batch["text"].str.strip().str.len() < min_chars)
        batch.loc[too_short, "reason"] = "empty"
        batch.loc[too_short, "detail"] = f"fewer than {min_chars} characters after cleaning"
    return batch
