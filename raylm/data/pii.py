"""Redaction of private data and secrets with typed placeholders, one batch at a time.

Most detectors are a regular expression followed by a check that removes look-alikes: a credit card
number must carry a card network's issuer prefix at one of that network's lengths and pass the Luhn
checksum (an ISBN-13 starts 978/979, which no network issues; numbers introduced as ISBN, ISSN or DOI
are skipped whatever their digits), IBANs pass the ISO 13616 mod-97 check, IPv6 addresses Python's
`ipaddress` parser. Phone numbers are found by Google's libphonenumber (the `phonenumbers` package),
see `phone_spans`. Secrets run first (a JWT or a key block must not be half-eaten by the phone rule),
then e-mails, IP addresses, IBANs, cards, SSNs and phone numbers.

An e-mail inside a URL (`https://host/users/jane@example.org/`) is redacted on purpose: the address
is personal data wherever it sits; the rest of the URL is kept. `password=...` style assignments
keep the key and lose the value (`password=<SECRET>`).

The batch function adds `stat_pii_<type>` counts per row; the stage sums them. Raw matched values
are never returned, logged or written anywhere but into the replaced text.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Callable, Iterator

import pandas as pd
from raylm.data.frames import python_strings
import phonenumbers

PLACEHOLDERS = {
    "secret": "<SECRET>",
    "email": "<EMAIL>",
    "ip": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "ssn": "<SSN>",
    "iban": "<IBAN>",
    "phone": "<PHONE>",
}
ORDER = tuple(PLACEHOLDERS)
# IBANs before cards: a German IBAN's digits (`DE43 6237 2845 1809 7725 23`) can pass for a card.
DETECTION_ORDER = ("secret", "email", "ip", "iban", "credit_card", "ssn", "phone")

_SECRET_PATTERNS = [
    re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),
    re.compile(r"\bhttps://hooks\.slack\.com/services/[A-Za-z0-9/]+"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
]
# `password = "hunter22"`, `api_key: abcd1234`, `PASSWORD=s3cret`: the key stays, the value goes.
_ASSIGNMENT = re.compile(
    r"""(?ix)\b((?:[a-z0-9_]*_)?(?:password|passwd|pwd|secret|api_?key|access_?key|secret_?key|auth_?token|token|private_?key))\b"""
    r"""(\s*[:=]\s*)(?:(["'])([^"'\n]{4,})\3|(?![(\[{]|none\b|null\b|true\b|false\b|self\b)([^\s"',;()\[\]{}<>]{4,})(?=[\s"',;)\]}]|$))""")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]*\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![\w:])")
_CARD = re.compile(r"(?<![\w/.+-])\d(?:[ -]?\d){12,18}(?![\w-])")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
# A number right after one of these words is a book, serial or paper identifier, never a card or a phone.
_IDENTIFIER_INTRO = re.compile(r"(?i)\b(?:ISBN(?:-?1[03])?|E?-?ISSN|DOI)\b[\s:#.\-]*(?:(?:https?://)?(?:dx\.)?doi\.org/)?$")
# Seven or more digits close together (a phone number has at least that many, its country code included):
# the only parts of a text the phone matcher reads, with PHONE_WINDOW_PAD characters either side.
_DIGIT_RUN = re.compile(r"\d(?:[\s().\-/]{0,3}\d){6,}")
PHONE_WINDOW_PAD = 16

# Card networks: (name, issuer prefix ranges as (low, high) of equal digit counts, lengths), from the
# networks' published IIN ranges (ISO/IEC 7812 issuer identification numbers).
CARD_NETWORKS: tuple[tuple[str, tuple[tuple[str, str], ...], tuple[int, ...]], ...] = (
    ("visa", (("4", "4"),), (13, 16, 19)),
    ("mastercard", (("51", "55"), ("2221", "2720")), (16,)),
    ("amex", (("34", "34"), ("37", "37")), (15,)),
    ("discover", (("6011", "6011"), ("644", "649"), ("65", "65"), ("622126", "622925")), (16, 17, 18, 19)),
    ("diners", (("300", "305"), ("3095", "3095"), ("36", "36"), ("38", "39")), (14, 15, 16, 17, 18, 19)),
    ("jcb", (("3528", "3589"),), (16, 17, 18, 19)),
    ("unionpay", (("62", "62"),), (16, 17, 18, 19)),
    ("maestro", (("5018", "5018"), ("5020", "5020"), ("5038", "5038"), ("5893", "5893"), ("6304", "6304"),
                 ("6759", "6759"), ("6761", "6763")), (13, 14, 15, 16, 17, 18, 19)),
    ("mir", (("2200", "2204"),), (16, 17, 18, 19)),
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def _ipv6_valid(candidate: str) -> bool:
    if sum(1 for part in candidate.split(":") if part) < 2:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def card_network(digits: str) -> str | None:
    """The card network whose issuer prefix and length `digits` has (Luhn not checked), or None."""
    for name, prefixes, lengths in CARD_NETWORKS:
        if len(digits) in lengths and any(low <= digits[:len(low)] <= high for low, high in prefixes):
            return name
    return None


def _introduced_as_identifier(text: str, start: int) -> bool:
    return bool(_IDENTIFIER_INTRO.search(text, max(0, start - 32), start))


def _redact(pattern: re.Pattern[str], placeholder: str, check: Callable[[str], bool] | None = None,
            context_check: Callable[[str, int], bool] | None = None):
    """Replace each match that passes `check(matched)` and, when given, `context_check(text, start)`."""
    def apply(text: str) -> tuple[str, int]:
        count = 0

        def replace(match: re.Match[str]) -> str:
            nonlocal count
            if check is not None and not check(match.group(0)):
                return match.group(0)
            if context_check is not None and not context_check(text, match.start()):
                return match.group(0)
            count += 1
            return placeholder
        return pattern.sub(replace, text), count
    return apply


def _redact_secrets(text: str) -> tuple[str, int]:
    total = 0
    for pattern in _SECRET_PATTERNS:
        text, count = pattern.subn(PLACEHOLDERS["secret"], text)
        total += count
    text, count = _ASSIGNMENT.subn(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{PLACEHOLDERS['secret']}"
                                   f"{m.group(3) or ''}", text)
    return text, total + count


def _card_grouping(candidate: str) -> bool:
    """Printed as cards are: no separators, groups of 4 (the last may be shorter), or 4-6-5 / 4-6-4 (Amex,
    Diners). `53 72 23 49 87 72 47 41` is a row of numbers."""
    lengths = [len(group) for group in re.split(r"[ -]", candidate)]
    return (len(lengths) == 1 or lengths in ([4, 6, 5], [4, 6, 4])
            or (all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4))


def _card_check(candidate: str) -> bool:
    if not _card_grouping(candidate):
        return False
    digits = re.sub(r"\D", "", candidate)
    if len(digits) == 13 and digits.startswith(("978", "979")):
        return False  # the ISBN-13 form (no network issues 97, so card_network also says no)
    return card_network(digits) is not None and luhn_valid(digits)


# ----------------------------------------------------------------------------------------------
# Phone numbers

CANDIDATE_LENIENCY = phonenumbers.Leniency.POSSIBLE
PHONE_LENIENCY = phonenumbers.Leniency.STRICT_GROUPING
"""How phone numbers are found. libphonenumber's PhoneNumberMatcher lists the candidates at Leniency.POSSIBLE
(a plausible length for the country); a candidate is a phone number when it is written in the full
North-American 3-3-4 grouping (`(555) 123-4567`: films' and examples' fictional numbers are not valid
numbers, and the rule before libphonenumber caught them), or else when the matcher finds it again at
Leniency.STRICT_GROUPING: a valid number (assigned ranges of its country) whose digit groups as written
are whole groups of the country's format. VALID alone is not enough: `77 18 70 42 70` (a row of scores)
is a valid US number, and `2013-09-04` or `965-1333` valid German ones."""
_NOT_BEFORE = frozenset("_-./\\#$\u20ac\u00a3%+@")  # glued to what precedes: ORD-2024-000123, v1.212.555.0123, #100234987
_NOT_AFTER = frozenset("_-/%@")


def _stands_alone(text: str, start: int, end: int) -> bool:
    """Not glued to the token before or after (a digit run inside an order number, a path or a time is
    not a phone number), and not the tail of a longer run of numbers (`12 34 56 78 90 ...`)."""
    before = text[start - 1] if start else " "
    if before.isalnum() or before in _NOT_BEFORE:
        return False
    if start >= 2 and before in " -:" and text[start - 2].isdigit() and text[start] != "+":
        return False  # (a number written with its country code starts anew, even right after another)
    after = text[end] if end < len(text) else " "
    if after.isalnum() or after in _NOT_AFTER:
        return False
    return not (after in ".,:" and end + 1 < len(text) and text[end + 1].isdigit())


def _north_american_grouping(raw: str) -> bool:
    groups = re.findall(r"\d+", raw)
    if len(groups) == 4 and groups[0] == "1":
        groups = groups[1:]
    return [len(g) for g in groups] == [3, 3, 4]


def _another_kind_of_number(raw: str, number: phonenumbers.PhoneNumber) -> bool:
    """A decimal (`1.6023628033`), a row of two-digit numbers with neither `+` nor a trunk `0` in front
    (`87 19 33 90 19`: India's formats allow it), or a North-American number short of its 10 digits
    (`310-1586`, a page range)."""
    groups = re.findall(r"\d+", raw)
    if re.fullmatch(r"\d+[.,]\d+", raw):
        return True
    if not raw.startswith(("+", "0")) and all(len(group) <= 2 for group in groups):
        return True
    return number.country_code == 1 and len(str(number.national_number)) != 10


def _digit_windows(text: str) -> Iterator[tuple[int, int]]:
    """Stretches of `text` around its runs of 7+ digits (padded, overlaps merged); a phone number lies
    whole inside one. The matcher parses every digit group it meets (`x = 1234`, `16-Jan-2004`), so on
    code and tables reading only these stretches is what keeps it affordable."""
    window: tuple[int, int] | None = None
    for run in _DIGIT_RUN.finditer(text):
        start, end = max(0, run.start() - PHONE_WINDOW_PAD), min(len(text), run.end() + PHONE_WINDOW_PAD)
        if window and start <= window[1]:
            window = (window[0], end)
            continue
        if window:
            yield window
        window = (start, end)
    if window:
        yield window


def phone_spans(text: str, region: str = "US") -> Iterator[tuple[int, int]]:
    """(start, end) of each phone number in `text` (see PHONE_LENIENCY); `region` (ISO 3166 alpha-2) reads
    the numbers written without a country code. A bare run of digits with neither `+` nor a separator is
    taken for an id (order and account numbers), not a phone number. Only the stretches of text around
    runs of 7+ digits are searched (`_digit_windows`); every check of what surrounds a number reads the
    whole text."""
    for offset, window_end in _digit_windows(text):
        window = text[offset:window_end]
        for match in phonenumbers.PhoneNumberMatcher(window, region, leniency=CANDIDATE_LENIENCY):
            raw, start = match.raw_string, offset + match.start
            if raw.isdigit() or not _stands_alone(text, start, start + len(raw)) or _introduced_as_identifier(text, start):
                continue
            if match.number.country_code == 1 and _north_american_grouping(raw):
                yield start, start + len(raw)
                continue
            for strict in phonenumbers.PhoneNumberMatcher(raw, region, leniency=PHONE_LENIENCY):
                if (_stands_alone(text, start + strict.start, start + strict.end)  # a part of the candidate: check again
                        and not _another_kind_of_number(strict.raw_string, strict.number)):
                    yield start + strict.start, start + strict.end


def redact_phones(text: str, region: str = "US") -> tuple[str, int]:
    spans = list(phone_spans(text, region))
    for start, end in reversed(spans):
        text = text[:start] + PLACEHOLDERS["phone"] + text[end:]
    return text, len(spans)


def _ip_redactor(text: str) -> tuple[str, int]:
    text, v4 = _redact(_IPV4, PLACEHOLDERS["ip"])(text)
    text, v6 = _redact(_IPV6, PLACEHOLDERS["ip"], _ipv6_valid)(text)
    return text, v4 + v6


REDACTORS: dict[str, Callable[[str], tuple[str, int]]] = {
    "secret": _redact_secrets,
    "email": _redact(_EMAIL, PLACEHOLDERS["email"]),
    "ip": _ip_redactor,
    "credit_card": _redact(_CARD, PLACEHOLDERS["credit_card"], _card_check,
                           lambda text, start: not _introduced_as_identifier(text, start)),
    "ssn": _redact(_SSN, PLACEHOLDERS["ssn"]),
    "iban": _redact(_IBAN, PLACEHOLDERS["iban"], iban_valid),
    "phone": redact_phones,
}


def redact(text: str, types: list[str] | tuple[str, ...] = ORDER, phone_region: str = "US") -> tuple[str, dict[str, int]]:
    """The text with every detected value replaced by its placeholder, and counts per type."""
    counts: dict[str, int] = {}
    for kind in DETECTION_ORDER:
        if kind in types:
            redactor = functools.partial(redact_phones, region=phone_region) if kind == "phone" else REDACTORS[kind]
            text, count = redactor(text)
            if count:
                counts[kind] = count
    return text, counts


def stat_columns() -> list[str]:
    return [f"stat_pii_{kind}" for kind in ORDER]


def pii_batch(batch: pd.DataFrame, types: list[str] | tuple[str, ...] = ORDER, enabled: bool = True,
              phone_region: str = "US") -> pd.DataFrame:
    """Redact every row that has text (rejected rows too: rejects must not leak what was found)."""
    batch = python_strings(batch)
    for column in stat_columns():
        batch[column] = 0
    if not enabled:
        return batch
    has_text = batch.index[batch["text"].str.len() > 0]
    texts = []
    for index in has_text:
        text, counts = redact(batch.at[index, "text"], types, phone_region)
        texts.append(text)
        for kind, count in counts.items():
            batch.at[index, f"stat_pii_{kind}"] = count
    if len(has_text):
        batch.loc[has_text, "text"] = texts
    return batch
