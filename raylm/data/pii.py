"""Redaction of private data and secrets with typed placeholders, one batch at a time.

Most detectors are a regular expression followed by a check that removes look-alikes: a credit card
number must carry a card network's issuer prefix at one of that network's lengths and pass the Luhn
checksum (an ISBN-13 starts 978/979, which no network issues; numbers introduced as ISBN, ISSN or DOI
are skipped whatever their digits), IBANs pass the ISO 13616 mod-97 check, IPv6 addresses Python's
`ipaddress` parser. Phone numbers are found by Google's libphonenumber (the `phonenumbers` package),
see `phone_spans`. Secrets run first (a JWT or a key block must not be half-eaten by the phone rule),
then e-mails, IP addresses, cards, SSNs, IBANs and phone numbers.

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
_CARD = re.compile(r"(?<![\w/.-])\d(?:[ -]?\d){12,18}(?![\w-])")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
# A number right after one of these words is a book, serial or paper identifier, never a card or a phone.
_IDENTIFIER_INTRO = re.compile(r"(?i)\b(?:ISBN(?:-?1[03])?|E?-?ISSN|DOI)\b[\s:#.\-]*(?:(?:https?://)?(?:dx\.)?doi\.org/)?$")
_DIGIT_RUN = re.compile(r"\d(?:[\s().\-/]{0,3}\d){6}")  # seven digits, maybe grouped: the least a phone number has

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


def _card_check(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    if len(digits) == 13 and digits.startswith(("978", "979")):
        return False  # the ISBN-13 form (no network issues 97, so card_network also says no)
    return card_network(digits) is not None and luhn_valid(digits)


# ----------------------------------------------------------------------------------------------
# Phone numbers

PHONE_LENIENCY = phonenumbers.Leniency.POSSIBLE
"""The matcher's leniency: POSSIBLE (a plausible length for the country) finds the candidates; each is
then kept when libphonenumber says the number is valid (assigned ranges: what Leniency.VALID checks),
or, in North America, when written in the full 3-3-4 grouping: `(555) 123-4567` is the fictional
number of films and examples, not a valid one, and the rule before libphonenumber caught it."""
_NOT_BEFORE = frozenset("_-./\\#$€£%+@")  # glued to what precedes: ORD-2024-000123, v1.212.555.0123, #100234987
_NOT_AFTER = frozenset("_-/%@")


def _stands_alone(text: str, start: int, end: int) -> bool:
    """Not glued to the token before or after (Leniency.VALID checks only for letters; a digit run
    inside an order number or a path is not a phone number), and not the tail of a longer run of
    numbers (`scores 12 34 56 78 90`)."""
    before = text[start - 1] if start else " "
    if before.isalnum() or before in _NOT_BEFORE:
        return False
    if start >= 2 and before in " -" and text[start - 2].isdigit():
        return False
    after = text[end] if end < len(text) else " "
    if after.isalnum() or after in _NOT_AFTER:
        return False
    return not (after in ".," and end + 1 < len(text) and text[end + 1].isdigit())


def _north_american_grouping(raw: str) -> bool:
    groups = re.findall(r"\d+", raw)
    if len(groups) == 4 and groups[0] == "1":
        groups = groups[1:]
    return [len(g) for g in groups] == [3, 3, 4]


def phone_spans(text: str, region: str = "US") -> Iterator[tuple[int, int]]:
    """(start, end) of each phone number in `text`; `region` (ISO 3166 alpha-2) reads numbers written
    without a country code. Found by libphonenumber's PhoneNumberMatcher (see PHONE_LENIENCY); a bare run
    of digits with neither `+` nor a separator is taken for an id (order and account numbers), not a phone.
    A text without seven digits in a row (separators allowed) is not searched at all."""
    if not _DIGIT_RUN.search(text):
        return
    for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=PHONE_LENIENCY):
        raw, number = match.raw_string, match.number
        if raw.isdigit() or not _stands_alone(text, match.start, match.end):
            continue
        if _introduced_as_identifier(text, match.start):
            continue
        if phonenumbers.is_valid_number(number) or (number.country_code == 1 and _north_american_grouping(raw)):
            yield match.start, match.end


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
    for kind in ORDER:
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
