"""Document quality filters in the style of Gopher (Rae et al. 2021, appendix A), one batch at a time.

Each rule measures one property of a document and rejects it as `quality:<rule>` when the value
crosses its threshold in `data.quality` (a threshold of `null` turns the rule off); the detail names
the value and the threshold. Rules run in a fixed order and the first failing rule is the reason.
`QualityConfig.gopher()` holds the paper's thresholds for web text; the laptop default only bounds
the word count, because the default corpus is source code, which the web-text rules would reject.
Optional language identification uses `langid` when `data.quality.languages` is set.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import pandas as pd

from raylm.config import QualityConfig
from raylm.data.frames import python_strings

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "‣", "●", "◦", "–", "·")
SYMBOLS = ("#", "...", "…")
_WORD_CHARS = re.compile(r"[^\W_]")
_PUNCT_EDGES = re.compile(r"^[^\w]+|[^\w]+$")


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def top_ngram_share(tokens: list[str], n: int) -> float:
    """Characters in the most frequent n-gram (all its occurrences) over characters in all words."""
    grams = _ngrams(tokens, n)
    total = sum(len(t) for t in tokens)
    if not grams or not total:
        return 0.0
    gram, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(len(t) for t in gram) * count / total


def duplicate_ngram_share(tokens: list[str], n: int) -> float:
    """Characters covered by n-grams that occur more than once, over characters in all words."""
    grams = _ngrams(tokens, n)
    total = sum(len(t) for t in tokens)
    if not grams or not total:
        return 0.0
    counts = Counter(grams)
    covered = [False] * len(tokens)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return sum(len(t) for t, c in zip(tokens, covered) if c) / total


def duplicate_share(items: list[str]) -> tuple[float, float]:
    """Share of items that repeat an earlier item, and share of characters in such repeats."""
    items = [item for item in items if item.strip()]
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    repeats = repeat_chars = 0
    for item in items:
        if item in seen:
            repeats += 1
            repeat_chars += len(item)
        seen.add(item)
    return repeats / len(items), repeat_chars / max(sum(len(i) for i in items), 1)


@functools.cache
def _langid():
    try:
        # deferred: pulls in langid, slow to import; only this path needs it
        from langid.langid import LanguageIdentifier, model
    except ImportError as error:
        raise ImportError("data.quality.languages needs the `langid` package (pip install langid)") from error
    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def language_of(text: str) -> tuple[str, float]:
    language, score = _langid().classify(text[:20_000])
    return language, float(score)


def quality_failure(text: str, config: QualityConfig) -> tuple[str, str] | None:
    """`(rule, detail)` of the first rule the text fails, or None when it passes every rule."""
    tokens = text.split()
    n_words = len(tokens)

    def fail(rule: str, value: float, op: str, threshold: float) -> tuple[str, str]:
        return rule, f"{rule} = {value:.4g} {op} {threshold:g}"

    if config.min_words is not None and n_words < config.min_words:
        return fail("min_words", n_words, "<", config.min_words)
    if config.max_words is not None and n_words > config.max_words:
        return fail("max_words", n_words, ">", config.max_words)
    bare = [_PUNCT_EDGES.sub("", t) for t in tokens]
    lengths = [len(b) for b in bare if b]
    mean_length = sum(lengths) / len(lengths) if lengths else 0.0
    if config.min_mean_word_length is not None and mean_length < config.min_mean_word_length:
        return fail("mean_word_length", mean_length, "<", config.min_mean_word_length)
    if config.max_mean_word_length is not None and mean_length > config.max_mean_word_length:
        return fail("mean_word_length", mean_length, ">", config.max_mean_word_length)
    if config.max_symbol_word_ratio is not None:
        ratio = sum(text.count(s) for s in SYMBOLS) / max(n_words, 1)
        if ratio > config.max_symbol_word_ratio:
            return fail("symbol_word_ratio", ratio, ">", config.max_symbol_word_ratio)
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and config.max_bullet_lines is not None:
        share = sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines)
        if share > config.max_bullet_lines:
            return fail("bullet_lines", share, ">", config.max_bullet_lines)
    if lines and config.max_ellipsis_lines is not None:
        share = sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines)
        if share > config.max_ellipsis_lines:
            return fail("ellipsis_lines", share, ">", config.max_ellipsis_lines)
    if config.min_alpha_words is not None and n_words:
        share = sum(bool(_WORD_CHARS.search(t)) and any(c.isalpha() for c in t) for t in tokens) / n_words
        if share < config.min_alpha_words:
            return fail("alpha_words", share, "<", config.min_alpha_words)
    if config.max_duplicate_lines is not None or config.max_duplicate_line_chars is not None:
        by_count, by_chars = duplicate_share(lines)
        if config.max_duplicate_lines is not None and by_count > config.max_duplicate_lines:
            return fail("duplicate_lines", by_count, ">", config.max_duplicate_lines)
        if config.max_duplicate_line_chars is not None and by_chars > config.max_duplicate_line_chars:
            return fail("duplicate_line_chars", by_chars, ">", config.max_duplicate_line_chars)
    if config.max_duplicate_paragraphs is not None:
        by_count, _ = duplicate_share(re.split(r"\n\s*\n", text))
        if by_count > config.max_duplicate_paragraphs:
            return fail("duplicate_paragraphs", by_count, ">", config.max_duplicate_paragraphs)
    lowered = [t.lower() for t in bare if t]
    for n, limit in sorted(config.max_top_ngram.items()):
        share = top_ngram_share(lowered, n)
        if share > limit:
            return fail(f"top_{n}gram", share, ">", limit)
    for n, limit in sorted(config.max_duplicate_ngram.items()):
        share = duplicate_ngram_share(lowered, n)
        if share > limit:
            return fail(f"duplicate_{n}gram", share, ">", limit)
    if config.min_stop_words is not None:
        found = sum(1 for t in lowered if t in STOP_WORDS)
        if found < config.min_stop_words:
            return fail("stop_words", found, "<", config.min_stop_words)
    if config.languages:
        language, score = language_of(text)
        if language not in config.languages or score < config.min_language_score:
            return "language", f"language = {language} ({score:.2f}); expected {config.languages} >= {config.min_language_score:g}"
    return None


def quality_batch(batch: pd.DataFrame, config: QualityConfig) -> pd.DataFrame:
    """Mark live rows failing a rule as `quality:<rule>` with the measured value in `detail`."""
    batch = python_strings(batch)
    if not config.enabled:
        return batch
    for index in batch.index[batch["reason"] == ""]:
        failure = quality_failure(batch.at[index, "text"], config)
        if failure is not None:
            batch.at[index, "reason"] = f"quality:{failure[0]}"
            batch.at[index, "detail"] = failure[1]
    return batch
