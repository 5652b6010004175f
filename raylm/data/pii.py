"""Redaction of private data and secrets with typed placeholders, one batch at a time.

Each detector is a regular expression, some followed by a check that removes look-alikes: credit
card numbers must pass the Luhn checksum, IBANs the ISO 13616 mod-97 check, IPv6 addresses Python's
`ipaddress` parser. Secrets run first (a JWT or a key block must not be half-eaten by the phone
rule), then e-mails, IP addresses, cards, SSNs, IBANs and phone numbers.

An e-mail inside a URL (`https://host/users/jane@example.org/`) is redacted on purpose: the address
is personal data wherever it sits; the rest of the URL is kept. `password=...` style assignments
keep the key and lose the value (`password=<SECRET>`).

The batch function adds `stat_pii_<type>` counts per row; the stage sums them. Raw matched values
are never returned, logged or written anywhere but into the replaced text.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable

import pandas as pd

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
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_PHONE = re.compile(
    r"(?<![\w+.-])(?<!\d[ -])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?![\w-]|[.\s]\d)")


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


def _redact(pattern: re.Pattern[str], placeholder: str, check: Callable[[str], bool] | None = None):
    def apply(text: str) -> tuple[str, int]:
        count = 0

        def replace(match: re.Match[str]) -> str:
            nonlocal count
            if check is not None and not check(match.group(0)):
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
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _ip_redactor(text: str) -> tuple[str, int]:
    text, v4 = _redact(_IPV4, PLACEHOLDERS["ip"])(text)
    text, v6 = _redact(_IPV6, PLACEHOLDERS["ip"], _ipv6_valid)(text)
    return text, v4 + v6


REDACTORS: dict[str, Callable[[str], tuple[str, int]]] = {
    "secret": _redact_secrets,
    "email": _redact(_EMAIL, PLACEHOLDERS["email"]),
    "ip": _ip_redactor,
    "credit_card": _redact(_CARD, PLACEHOLDERS["credit_card"], _card_check),
    "ssn": _redact(_SSN, PLACEHOLDERS["ssn"]),
    "iban": _redact(_IBAN, PLACEHOLDERS["iban"], iban_valid),
    "phone": _redact(_PHONE, PLACEHOLDERS["phone"]),
}


def redact(text: str, types: list[str] | tuple[str, ...] = ORDER) -> tuple[str, dict[str, int]]:
    """The text with every detected value replaced by its placeholder, and counts per type."""
    counts: dict[str, int] = {}
    for kind in ORDER:
        if kind in types:
            text, count = REDACTORS[kind](text)
            if count:
                counts[kind] = count
    return text, counts


def stat_columns() -> list[str]:
    return [f"stat_pii_{kind}" for kind in ORDER]


def pii_batch(batch: pd.DataFrame, types: list[str] | tuple[str, ...] = ORDER, enabled: bool = True) -> pd.DataFrame:
    """Redact every row that has text (rejected rows too: rejects must not leak what was found)."""
    for column in stat_columns():
        batch[column] = 0
    if not enabled:
        return batch
    has_text = batch.index[batch["text"].str.len() > 0]
    texts = []
    for index in has_text:
        text, counts = redact(batch.at[index, "text"], types)
        texts.append(text)
        for kind, count in counts.items():
            batch.at[index, f"stat_pii_{kind}"] = count
    if len(has_text):
        batch.loc[has_text, "text"] = texts
    return batch
