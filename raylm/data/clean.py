"""Text cleaning, one batch at a time: Unicode, HTML, boilerplate lines, Gutenberg wrappers, symbols, whitespace.

Plain functions over pandas batches of document rows; Ray Data wraps them with `map_batches`, and
the tests call them directly. A row already marked with a rejection reason passes through untouched.
Each step can be switched off in `data.clean`, and each reports what it did: for every step the
batch gains `stat_clean_<step>_docs` (documents it changed) and `stat_clean_<step>_bytes` (bytes it
removed), which the stage sums into its metrics. Cleaning that leaves a document (nearly) empty
rejects it as `empty` with the step that emptied it.

HTML goes through a real parser (selectolax, the lexbor engine): scripts, styles and navigation
elements are dropped, entities decoded, block elements become line breaks.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable

import pandas as pd

from raylm.config import CleanConfig
from raylm.data.frames import python_strings

STEPS = ("unicode", "html", "gutenberg", "boilerplate", "terminal_punctuation", "symbols", "whitespace")

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


# ----------------------------------------------------------------------------------------------
# HTML

_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_HTML_START = re.compile(r"^\s*(?:<!doctype html|<html[\s>])", re.IGNORECASE)
_BLOCK_TAG = re.compile(r"<(?=/?(?:p|div|br|li|ul|ol|tr|td|th|table|h[1-6]|section|article|header|footer|"
                        r"blockquote|pre|dd|dt|hr|title)\b)", re.IGNORECASE)
_DROPPED_ELEMENTS = ["script", "style", "noscript", "nav", "iframe", "svg", "form", "button", "template"]


def looks_like_html(text: str) -> bool:
    """A full HTML page, or a text that opens with a tag and where markup tags are at least 5 and a
    tenth of the characters (source code that merely contains markup in strings does not open with one)."""
    if _HTML_START.match(text):
        return True
    if not text.lstrip().startswith("<"):
        return False
    tags = _TAG.findall(text[:200_000])
    return len(tags) >= 5 and sum(map(len, tags)) >= 0.1 * min(len(text), 200_000)


def html_to_text(html: str) -> str:
    # deferred: pulls in selectolax, slow to import; only this path needs it
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(_BLOCK_TAG.sub("\n<", html))
    for element in tree.css(",".join(_DROPPED_ELEMENTS)):
        element.decompose()
    root = tree.body or tree.root
    if root is None:
        return ""
    return root.text(deep=True, separator="", strip=False)


# ----------------------------------------------------------------------------------------------
# Project Gutenberg

_GUTENBERG_START = re.compile(
    r"^.*?(?:\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)[^\n]*|"
    r"\*END\*THE SMALL PRINT![^\n]*)\n", re.IGNORECASE | re.DOTALL)
_GUTENBERG_END = re.compile(
    r"\n[^\n]*(?:\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)|"
    r"End of (?:the )?Project Gutenberg(?:'s|’s)? (?:E-?(?:book|text)|[^\n]*)).*$", re.IGNORECASE | re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """Cut the Project Gutenberg header (up to the START marker) and footer (from the END marker)."""
    if "gutenberg" not in text[:20_000].lower() and "gutenberg" not in text[-40_000:].lower():
        return text
    text = _GUTENBERG_START.sub("", text, count=1)
    return _GUTENBERG_END.sub("\n", text, count=1)


# ----------------------------------------------------------------------------------------------
# Boilerplate lines

_BOILERPLATE = re.compile(
    r"\b(?:cookies?\b.*\b(?:use|accept|consent|policy|settings|enable)|(?:use|accept|consent|enable|allow)\b.*\bcookies?"
    r"|privacy policy|terms (?:of|and) (?:use|service|conditions)|all rights reserved|lorem ipsum"
    r"|javascript (?:is )?(?:disabled|required)|enable javascript|subscribe to (?:our|the) newsletter"
    r"|sign up for (?:our|the) newsletter|skip to (?:main )?content|click here to|powered by (?:wordpress|blogger)"
    r"|share (?:this|on) (?:facebook|twitter))\b", re.IGNORECASE)
_NAV_SEPARATORS = re.compile(r"\s*(?:\||»|›|•|·|/|>)\s*")
_TERMINAL = ('.', '!', '?', '"', "'", '”', '’', '…', ':', ';', ')')
# Small words that menus write in lower case: `About us`, `Terms of use`, `Sign in`, `Food & Drink`.
_MENU_JOINERS = frozenset({"&", "and", "of", "the", "to", "for", "in", "on", "up", "out", "us", "our", "a", "an", "with",
                           "my", "your", "me", "at", "by"})
# Marks of a line of code: a call `f(`, an assignment or arrow, `::`, a brace or `;` ending the line,
# a line comment or prompt at its start, an import or include.
_CODE_LINE = re.compile(r"\w\(|\s(?:=|==|!=|:=|\+=|-=|\|=|->|=>|<<|>>)\s|::|[{};]\s*$|^\s*[{}]|"
                        r"^\s*(?://|/\*|\*/|>>>|\$ |#!|#include\b|import [\w.]+|from [\w.]+ import\b)")


def _is_menu_word(word: str) -> bool:
    """A word a site menu is made of: capitalised (`Home`, `Über`) or all capitals (`FAQ`, `HOME`),
    letters only (an inner `-` or `'` allowed), 2 to 20 letters; or one of the small joining words."""
    if word in _MENU_JOINERS:
        return True
    letters = word.replace("-", "").replace("'", "").replace("’", "")
    if not (2 <= len(letters) <= 20 and letters.isalpha()):
        return False
    return word[0].isupper() and (word[1:].islower() or word.isupper())


def looks_like_code(line: str) -> bool:
    return bool(_CODE_LINE.search(line))


def is_navigation_line(line: str) -> bool:
    """A line of 3+ menu items between separators: `Home | About us | Contact`, `Home › News › Sport`.

    Each item is 1 to 3 menu words (see `_is_menu_word`), the first capitalised. Anything else between
    the separators keeps the line: digits, symbols, lower-case words, mixed case. So code (`a | b | c`,
    `cat f | grep x`), base64 (a PEM body's `/` and `+`), paths and URLs, numbers, poetry quoted with
    slashes (`Roses are red / Violets are blue`) all stay, and so does a Markdown table row (it starts
    or ends with `|`).
    """
    stripped = line.strip()
    if stripped.startswith("|") or stripped.endswith("|") or stripped.endswith(_TERMINAL[:3]):
        return False
    parts = [p for p in _NAV_SEPARATORS.split(stripped) if p]
    if len(parts) < 3 or not _NAV_SEPARATORS.search(stripped):
        return False
    for part in parts:
        item = part.split()
        if not 1 <= len(item) <= 3 or item[0] in _MENU_JOINERS or not all(map(_is_menu_word, item)):
            return False
    return True


def is_boilerplate_line(line: str, in_code: bool = False) -> bool:
    """A cookie/policy/newsletter notice or a navigation line. A line of code, or a single token
    (no space inside: base64, a hash, a URL, a path), never is; in a document of code (`in_code`) only
    navigation lines are: its comments and docstrings may well say `All rights reserved` or `cookies`."""
    stripped = line.strip()
    if not stripped or not any(c.isspace() for c in stripped) or looks_like_code(stripped):
        return False
    return (not in_code and bool(_BOILERPLATE.search(stripped))) or is_navigation_line(stripped)


CODE_DOCUMENT_SHARE = 0.1
"""A document is code when at least this share of its non-blank lines looks like code (Python's standard
library: 96% of files; the C4 sample: 2% of documents)."""


def is_code_document(lines: list[str]) -> bool:
    filled = [line for line in lines if line.strip()]
    return bool(filled) and sum(map(looks_like_code, filled)) >= CODE_DOCUMENT_SHARE * len(filled)


def drop_boilerplate_lines(text: str) -> str:
    lines = text.split("\n")
    in_code = is_code_document(lines)
    return "\n".join(line for line in lines if not is_boilerplate_line(line, in_code))


def drop_unterminated_lines(text: str) -> str:
    """C4's rule: keep only lines that end in terminal punctuation (blank lines stay as separators)."""
    return "\n".join(line for line in text.split("\n") if not line.strip() or line.rstrip().endswith(_TERMINAL))


# ----------------------------------------------------------------------------------------------
# Control characters, emoji and other non-text symbols

_NON_TEXT = re.compile(
    "["
    "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"                       # control characters (not tab, newlines)
    "\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb"  # invisible format
    "\ud800-\udfff"                                                  # lone surrogates
    "\ue000-\uf8ff\U000f0000-\U0010ffff"                           # private use
    "\ufe00-\ufe0f\U000e0000-\U000e01ef\u20e3\ufffd"             # variation selectors, tags, keycap, U+FFFD
    "\u2300-\u23ff\u2460-\u24ff\u25a0-\u27bf\u2b00-\u2bff"    # technical, enclosed, shapes, dingbats
    "\U0001f000-\U0001faff"                                          # emoji and pictographs
    "]+")
"""Control and invisible format characters, surrogates, private use, emoji, dingbats and pictographs.
Letters, punctuation, maths, arrows, box drawing and currency stay."""


def strip_symbols(text: str) -> str:
    return _NON_TEXT.sub("", text)


# ----------------------------------------------------------------------------------------------
# The batch function


def cleaning_steps(config: CleanConfig) -> list[tuple[str, Callable[[str], str]]]:
    steps: list[tuple[str, Callable[[str], str]]] = []
    if config.unicode != "none":
        form = config.unicode
        steps.append(("unicode", lambda t: unicodedata.normalize(form, t)))
    if config.html != "never":
        always = config.html == "always"
        steps.append(("html", lambda t: html_to_text(t) if always or looks_like_html(t) else t))
    if config.gutenberg:
        steps.append(("gutenberg", strip_gutenberg))
    if config.boilerplate:
        steps.append(("boilerplate", drop_boilerplate_lines))
    if config.terminal_punctuation:
        steps.append(("terminal_punctuation", drop_unterminated_lines))
    if config.symbols:
        steps.append(("symbols", strip_symbols))
    if config.whitespace:
        steps.append(("whitespace", normalize_whitespace))
    return steps


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def clean_text(text: str, steps: list[tuple[str, Callable[[str], str]]]) -> tuple[str, dict[str, int], str]:
    """Apply the steps; return the text, bytes removed per step (-1: changed without shrinking is
    reported as 0 bytes but still a change) and the step that emptied the text ('' if none)."""
    removed: dict[str, int] = {}
    emptied_by = ""
    for name, step in steps:
        before = text
        text = step(text)
        if text != before:
            removed[name] = max(_utf8_len(before) - _utf8_len(text), 0)
            if not emptied_by and before.strip() and not text.strip():
                emptied_by = name
    return text, removed, emptied_by


def stat_columns() -> list[str]:
    return [f"stat_clean_{step}_{kind}" for step in STEPS for kind in ("docs", "bytes")]


def clean_batch(batch: pd.DataFrame, min_chars: int = 1, config: CleanConfig | None = None) -> pd.DataFrame:
    """Clean the rows still in play; mark those left shorter than `min_chars` as `empty`."""
    batch = python_strings(batch)
    steps = cleaning_steps(config or CleanConfig())
    for column in stat_columns():
        batch[column] = 0
    live = batch.index[batch["reason"] == ""]
    texts, details, reasons = [], [], []
    for index in live:
        text, removed, emptied_by = clean_text(batch.at[index, "text"], steps)
        for name, count in removed.items():
            batch.at[index, f"stat_clean_{name}_docs"] = 1
            batch.at[index, f"stat_clean_{name}_bytes"] = count
        texts.append(text)
        if len(text.strip()) < min_chars:
            reasons.append("empty")
            details.append(f"fewer than {min_chars} characters after cleaning"
                           + (f" (emptied by {emptied_by})" if emptied_by else ""))
        else:
            reasons.append("")
            details.append("")
    if len(live):
        batch.loc[live, "text"] = texts
        batch.loc[live, "reason"] = reasons
        batch.loc[live, "detail"] = details
    return batch
