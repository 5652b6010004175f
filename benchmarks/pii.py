"""PII redaction: recall per type of planted values, look-alikes left alone, and throughput.

The corpus is generated (seeded): documents of filler prose, each with planted private values and
look-alike negatives in sentences of their own. Planted, by type (what `raylm/data/pii.py` redacts):
e-mail addresses; phone numbers of 15 countries in their international forms (spaces, dashes, dots,
`(0)` trunk prefix) and North-American national forms, plus national forms of 8 countries read
with `data.pii.phone_region` set to that country; card numbers of 8 networks (issuer prefix, length,
Luhn check digit); IBANs of 6 countries (mod-97 check digits); IPv4 and IPv6 addresses; US SSNs; and
secrets (AWS access keys, GitHub and Slack tokens, JWTs, private key blocks, `password = "..."`).
Phone numbers are drawn from libphonenumber's example numbers with random last digits, kept when
the library says they are valid (real people's numbers are valid numbers). The look-alikes: versions,
dates and times, ISBN-13 (some passing Luhn) and ISBN-10, ISSNs, DOIs, commit hashes, UUIDs, order,
invoice and tracking numbers, Luhn-valid numbers of no card network, tables of numbers, decimals.

A planted value counts as found when its sentence comes back with the value replaced by the type's
placeholder; a look-alike counts as a false positive when its sentence comes back changed. Throughput:
documents per CPU-second of `pii.redact` over the corpus, best of `--repeats`, with the share of time
each detector takes (every document here holds digits, so this is the phone matcher's worst case: on the
C4 sample and on Python source, 8 documents in 10 or more have no run of 7 digits and skip it). `--compare-with REV` runs the same corpus through `raylm/data/pii.py` of a git
revision too (e.g. the hand-written phone regex before libphonenumber), side by side.

    python benchmarks/pii.py [--docs 1000] [--repeats 3] [--compare-with REV]

Ends with one line `pii: recall=<min over types> false_positives=<count> ...`.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import ipaddress
import json
import random
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import phonenumbers

from _repo import ROOT  # noqa: E402  (puts the repository root on sys.path)

from raylm.data import pii  # noqa: E402

PHONE_COUNTRIES = ("US", "GB", "DE", "FR", "IN", "JP", "AU", "ES", "IT", "BR", "CN", "RU", "MX", "NL", "ZA")
TRUNK_ZERO = ("GB", "DE", "FR", "AU", "NL", "ZA")  # written `+44 (0)20 ...`
NATIONAL_COUNTRIES = ("GB", "DE", "FR", "IN", "JP", "AU", "IT", "BR")  # national forms, read with phone_region
CARD_NETWORKS = {  # network: (prefixes to draw from, lengths, grouping of a 16-digit-style print)
    "visa": (["4"], [16, 13]), "mastercard": (["51", "53", "55", "2221", "2720"], [16]), "amex": (["34", "37"], [15]),
    "discover": (["6011", "644", "65"], [16]), "diners": (["300", "305", "36", "38"], [14]),
    "jcb": (["3528", "3589"], [16]), "unionpay": (["62"], [16, 19]), "mir": (["2200", "2204"], [16]),
}
IBAN_FORMATS = {"DE": "8n10n", "GB": "4a14n", "FR": "10n11c2n", "ES": "20n", "NL": "4a10n", "IT": "1a10n12c"}
WORDS = ("the river valley committee library morning report garden station market window letter village "
         "council season harbour museum teacher journey kitchen forest meeting evening bridge country road "
         "quiet bright early simple careful public local ancient modern small large green open").split()
LEADS = ("You can reach me at", "Contact:", "Please write to", "The number on file is", "Details:", "Sent from",
         "Reference:", "My details are")


@dataclass
class Document:
    text: str
    region: str = "US"
    planted: list[tuple[str, str, str]] = field(default_factory=list)  # (type, sentence, expected redacted sentence)
    negatives: list[tuple[str, str]] = field(default_factory=list)  # (kind, sentence)


# ---------------------------------------------------------------------------------------------- values


def luhn_complete(body: str) -> str:
    """`body` with the check digit that makes it pass Luhn."""
    for check in "0123456789":
        if pii.luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


def card_number(rng: random.Random, network: str) -> str:
    prefixes, lengths = CARD_NETWORKS[network]
    prefix, length = rng.choice(prefixes), rng.choice(lengths)
    digits = luhn_complete(prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1)))
    style = rng.choice(("space", "dash", "plain"))
    if style == "plain":
        return digits
    sep = " " if style == "space" else "-"
    groups = [digits[:4], digits[4:10], digits[10:]] if length == 15 else \
        [digits[i:i + 4] for i in range(0, length, 4)]
    return sep.join(groups)


def iban(rng: random.Random, country: str) -> str:
    bban = ""
    for count, kind in _iban_parts(IBAN_FORMATS[country]):
        alphabet = {"n": string.digits, "a": string.ascii_uppercase, "c": string.ascii_uppercase + string.digits}[kind]
        bban += "".join(rng.choice(alphabet) for _ in range(count))
    check = 98 - int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
    compact = f"{country}{check:02d}{bban}"
    assert pii.iban_valid(compact)
    return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4)) if rng.random() < 0.6 else compact


def _iban_parts(spec: str) -> list[tuple[int, str]]:
    parts, number = [], ""
    for char in spec:
        if char.isdigit():
            number += char
        else:
            parts.append((int(number), char))
            number = ""
    return parts


def phone_number(rng: random.Random, region: str) -> phonenumbers.PhoneNumber:
    """A valid number of `region`: one of libphonenumber's example numbers with its last 4 digits drawn."""
    kinds = (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE)
    for _ in range(1000):
        example = phonenumbers.example_number_for_type(region, rng.choice(kinds))
        national = str(example.national_number)
        candidate = phonenumbers.parse(f"+{example.country_code}{national[:-4]}{rng.randrange(10_000):04d}")
        if phonenumbers.is_valid_number(candidate):
            return candidate
    raise RuntimeError(f"no valid number drawn for {region}")


def international_phone(rng: random.Random, region: str) -> str:
    number = phone_number(rng, region)
    text = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    code, _, rest = text.partition(" ")
    style = rng.choice(("spaces", "dashes", "dots", "trunk", "e164"))
    if style == "dashes":
        return f"{code}-{rest.replace(' ', '-')}"
    if style == "dots":
        return f"{code}.{rest.replace(' ', '.').replace('-', '.')}"
    if style == "trunk" and region in TRUNK_ZERO:
        return f"{code} (0){rest}"
    if style == "e164":
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return text


def north_american_phone(rng: random.Random) -> str:
    area, exchange, line = rng.choice(("212", "415", "617", "312", "555", "303")), rng.randrange(200, 1000), rng.randrange(10_000)
    return rng.choice(("({a}) {e}-{l:04d}", "{a}-{e}-{l:04d}", "{a}.{e}.{l:04d}", "+1 {a} {e} {l:04d}",
                       "+1-{a}-{e}-{l:04d}", "+1 ({a}) {e}-{l:04d}", "1-{a}-{e}-{l:04d}")).format(a=area, e=exchange, l=line)


def national_phone(rng: random.Random, region: str) -> str:
    return phonenumbers.format_number(phone_number(rng, region), phonenumbers.PhoneNumberFormat.NATIONAL)


def token(rng: random.Random, alphabet: str, length: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def jwt(rng: random.Random) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    signature = base64.urlsafe_b64encode(rng.randbytes(32)).decode().rstrip("=")
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': str(rng.randrange(10**9)), 'iat': 1700000000})}.{signature}"


def private_key(rng: random.Random) -> str:
    body = base64.b64encode(rng.randbytes(rng.choice((96, 192)))).decode()
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    kind = rng.choice(("RSA ", "EC ", "OPENSSH ", ""))
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{lines}\n-----END {kind}PRIVATE KEY-----"


def ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10_000):04d}"


def ipv6(rng: random.Random) -> str:
    address = ipaddress.IPv6Address(rng.getrandbits(128) if rng.random() < 0.5 else
                                    (0x20010DB8 << 96) | rng.getrandbits(32))
    return address.compressed if rng.random() < 0.7 else address.exploded


def email(rng: random.Random) -> str:
    user = rng.choice(WORDS) + rng.choice((".", "_", "", "+news.")) + rng.choice(WORDS) + str(rng.randrange(100))
    domain = rng.choice(("example.org", "mail.example.co.uk", "uni-example.de", "Example.COM", "post.example.fr"))
    return f"{user}@{domain}"


def isbn13(rng: random.Random, luhn_too: bool) -> str:
    while True:
        body = rng.choice(("978", "979")) + token(rng, string.digits, 9)
        total = sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(body))
        number = body + str((10 - total % 10) % 10)
        if pii.luhn_valid(number) == luhn_too:
            break
    return rng.choice((number, f"{number[:3]}-{number[3]}-{number[4:7]}-{number[7:12]}-{number[12]}"))


def isbn10(rng: random.Random) -> str:
    body = token(rng, string.digits, 9)
    check = sum((10 - i) * int(c) for i, c in enumerate(body)) % 11
    check_char = "0" if check == 0 else ("X" if check == 1 else str(11 - check))
    return f"{body[0]}-{body[1:4]}-{body[4:9]}-{check_char}"


def non_card_luhn(rng: random.Random) -> str:
    """16 Luhn-valid digits that no card network issues (prefixes 1, 8, 9, 00)."""
    prefix = rng.choice(("1", "8", "9", "00"))
    return luhn_complete(prefix + token(rng, string.digits, 15 - len(prefix)))


# ---------------------------------------------------------------------------------------------- sentences

# type -> (placeholder kind, maker(rng) -> (lead, value, trail)); the expected sentence has the value replaced.
def _simple(maker, lead_choices=LEADS, trail=" today."):
    return lambda rng: (rng.choice(lead_choices), maker(rng), trail)


PLANTED: dict[str, tuple[str, object]] = {
    "email": ("email", _simple(email)),
    **{f"phone_{c}": ("phone", _simple(lambda rng, c=c: international_phone(rng, c))) for c in PHONE_COUNTRIES},
    "phone_US_national": ("phone", _simple(north_american_phone)),
    **{f"card_{n}": ("credit_card", _simple(lambda rng, n=n: card_number(rng, n), ("Paid with card", "Card number:")))
       for n in CARD_NETWORKS},
    **{f"iban_{c}": ("iban", _simple(lambda rng, c=c: iban(rng, c), ("Transfer to IBAN", "Account:"))) for c in IBAN_FORMATS},
    "ipv4": ("ip", _simple(lambda rng: str(ipaddress.IPv4Address(rng.getrandbits(32) | 0x01000000)),
                           ("The server at", "Logged in from"))),
    "ipv6": ("ip", _simple(ipv6, ("The server at", "Logged in from"))),
    "ssn": ("ssn", _simple(ssn, ("SSN", "Social security number"))),
    "aws_key": ("secret", _simple(lambda rng: "AKIA" + token(rng, string.ascii_uppercase + string.digits, 16),
                                  ("aws key", "The key is"))),
    "github_token": ("secret", _simple(lambda rng: "ghp_" + token(rng, string.ascii_letters + string.digits, 36),
                                       ("token", "Use"))),
    "slack_token": ("secret", _simple(lambda rng: f"xoxb-{rng.randrange(10**11, 10**12)}-{token(rng, string.ascii_letters, 24)}",
                                      ("slack", "Use"))),
    "jwt": ("secret", _simple(jwt, ("Authorization: Bearer",))),
    "private_key": ("secret", lambda rng: ("Here is the key:\n", private_key(rng), "\nend.")),
    "password": ("secret", lambda rng: (rng.choice(("password = \"", "db_password: \"", "API_KEY=\"")),
                                         token(rng, string.ascii_letters + string.digits + "!#%", rng.randrange(8, 20)), "\"")),
}
NATIONAL: dict[str, tuple[str, object]] = {
    f"phone_{c}_national": ("phone", _simple(lambda rng, c=c: national_phone(rng, c))) for c in NATIONAL_COUNTRIES}

NEGATIVES = {
    "version": lambda rng: f"Upgrade to version {rng.randrange(10)}.{rng.randrange(30)}.{rng.randrange(100)} now.",
    "windows_build": lambda rng: f"Tested on Windows 10.0.{rng.randrange(10000, 30000)}.{rng.randrange(1000, 9999)} only.",
    "date": lambda rng: rng.choice(("Released on {y}-{m:02d}-{d:02d}.", "Due {d:02d}.{m:02d}.{y} at noon.",
                                    "Signed {m:02d}/{d:02d}/{y} in ink.", "At {y}-{m:02d}-{d:02d}T10:{d:02d}:00Z it began."))
    .format(y=rng.randrange(1950, 2030), m=rng.randrange(1, 13), d=rng.randrange(1, 29)),
    "time": lambda rng: f"Clocked {rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(10**6):06d} exactly.",
    "isbn13": lambda rng: f"See ISBN {isbn13(rng, luhn_too=False)} for details.",
    "isbn13_luhn_valid": lambda rng: f"Catalogue number {isbn13(rng, luhn_too=True)} in print.",
    "isbn10": lambda rng: f"The first edition, ISBN {isbn10(rng)}, sold out.",
    "issn": lambda rng: f"Journal ISSN {rng.randrange(1000, 9999)}-{rng.randrange(1000, 9999)} is listed.",
    "doi": lambda rng: f"Cited as doi:10.{rng.randrange(1000, 99999)}/{rng.randrange(10**6, 10**16)} in the text.",
    "commit": lambda rng: f"Fixed in commit {token(rng, '0123456789abcdef', rng.choice((7, 12, 40)))} upstream.",
    "uuid": lambda rng: f"Request id {__import__('uuid').UUID(int=rng.getrandbits(128))} failed.",
    "order_number": lambda rng: rng.choice((f"Order ORD-{rng.randrange(2015, 2030)}-{rng.randrange(10**6):06d} shipped.",
                                            f"Your order #{rng.randrange(10**8, 10**10)} shipped.",
                                            f"Order number {rng.randrange(2 * 10**9, 10**10)} shipped.")),
    "invoice": lambda rng: f"Invoice {rng.randrange(2015, 2030)}-{rng.randrange(1000):03d}-{rng.randrange(10000):04d} is paid.",
    "tracking": lambda rng: f"Tracking 1Z{token(rng, string.ascii_uppercase + string.digits, 16)} is in transit.",
    "luhn_non_card": lambda rng: f"Serial {non_card_luhn(rng)} passes a checksum.",
    "number_table": lambda rng: "Scores " + " ".join(str(rng.randrange(10, 100)) for _ in range(rng.randrange(5, 9))) + " were logged.",
    "decimal": lambda rng: f"The ratio was {rng.random() * 100:.10f} overall.",
    "page_range": lambda rng: f"See pages {rng.randrange(100, 1000)}-{rng.randrange(1000, 2000)} of the report.",
}


def filler(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randrange(8, 20))]
    return " ".join(words).capitalize() + "."


def generate(n_docs: int, seed: int) -> list[Document]:
    """Documents that plant the types round-robin (every type appears even in a small corpus)."""
    rng = random.Random(seed)
    planted_types, negative_kinds = list(PLANTED), list(NEGATIVES)
    national_types = list(NATIONAL)
    docs = []
    next_planted = 0
    for i in range(n_docs):
        national = i % 5 == 4  # every fifth document is in a national phone format, read with its region
        if national:
            kind = national_types[(i // 5) % len(national_types)]
            chosen = [(kind, NATIONAL[kind])]
            region = kind.split("_")[1]
        else:
            chosen = [(t, PLANTED[t]) for t in planted_types[next_planted:next_planted + 2]]
            next_planted = (next_planted + 2) % len(planted_types)
            chosen += [(t, PLANTED[t]) for t in planted_types[:2 - len(chosen)]]
            next_planted = next_planted if len(chosen) == 2 else 2 - len(chosen)
            region = "US"
        doc = Document("", region)
        sentences = [filler(rng)]
        for name, (_, maker) in chosen:
            lead, value, trail = maker(rng)
            placeholder = pii.PLACEHOLDERS[(PLANTED | NATIONAL)[name][0]]
            joiner = "" if lead.endswith(("\n", "\"")) else " "
            doc.planted.append((name, f"{lead}{joiner}{value}{trail}", f"{lead}{joiner}{placeholder}{trail}"))
            sentences += [doc.planted[-1][1], filler(rng)]
        for k in range(2):
            kind = negative_kinds[(2 * i + k) % len(negative_kinds)]
            doc.negatives.append((kind, NEGATIVES[kind](rng)))
            sentences += [doc.negatives[-1][1], filler(rng)]
        doc.text = " ".join(sentences)
        docs.append(doc)
    return docs


# ---------------------------------------------------------------------------------------------- scoring


def load_revision(revision: str):
    """`raylm/data/pii.py` as it was at a git revision, imported as its own module."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:raylm/data/pii.py"], capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "pii_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("pii_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def redactor(module):
    """text, region -> redacted text; a revision without `phone_region` reads every number as US."""
    takes_region = "phone_region" in module.redact.__code__.co_varnames
    if takes_region:
        return lambda text, region: module.redact(text, module.ORDER, region)[0]
    return lambda text, region: module.redact(text)[0]


def score(docs: list[Document], redact) -> tuple[dict[str, list[int]], dict[str, list[int]], int]:
    """Per planted type [found, planted]; per negative kind [redacted, planted]; filler sentences changed."""
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    false: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    filler_changed = 0
    for doc in docs:
        out = redact(doc.text, doc.region)
        for name, _, expected in doc.planted:
            found[name][0] += expected in out
            found[name][1] += 1
        for kind, sentence in doc.negatives:
            false[kind][0] += sentence not in out
            false[kind][1] += 1
        filler_changed += out.count("<") - doc.text.count("<") - len(doc.planted) > 0
    return dict(found), dict(false), filler_changed


def throughput(docs: list[Document], module, repeats: int) -> tuple[float, dict[str, float]]:
    """Documents per CPU-second of the whole redaction (best of `repeats`; CPU time, as other processes
    share the machine) and each detector's share of the time."""
    redact = redactor(module)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for doc in docs:
            redact(doc.text, doc.region)
        best = min(best, time.process_time() - start)
    per_type: Counter[str] = Counter()
    for kind in module.ORDER:
        start = time.process_time()
        for doc in docs:
            if kind == "phone" and hasattr(module, "redact_phones"):
                module.redact_phones(doc.text, doc.region)
            else:
                module.REDACTORS[kind](doc.text)
        per_type[kind] = time.process_time() - start
    total = sum(per_type.values())
    return len(docs) / best, {k: v / total for k, v in per_type.items()}


def table(found: dict[str, list[int]], columns: list[tuple[str, dict[str, list[int]]]]) -> None:
    print(f"  {'type':26} {'kind':12} {'planted':>7}  " + "  ".join(f"{name:>10}" for name, _ in columns))
    kinds = PLANTED | NATIONAL
    for name in (name for name in kinds if name in found):
        cells = "  ".join(f"{scores[name][0] / scores[name][1]:>10.3f}" for _, scores in columns)
        print(f"  {name:26} {kinds[name][0]:12} {found[name][1]:>7}  {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=1000, help="documents to generate (>= 500 for the figure)")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=3, help="throughput: best of this many passes")
    parser.add_argument("--compare-with", metavar="REV", help="also run raylm/data/pii.py of this git revision")
    args = parser.parse_args()

    docs = generate(args.docs, args.seed)
    megabytes = sum(len(d.text.encode()) for d in docs) / 1e6
    found, false, filler_changed = score(docs, redactor(pii))
    columns = [("recall", found)]
    old = None
    if args.compare_with:
        old = load_revision(args.compare_with)
        old_found, old_false, _ = score(docs, redactor(old))
        columns.append((f"@{args.compare_with[:8]}", old_found))
    planted = sum(n for _, n in found.values())
    print(f"{len(docs)} documents ({megabytes:.2f} MB), {planted} planted values of {len(found)} types, "
          f"{sum(n for _, n in false.values())} look-alikes of {len(false)} kinds")
    print("\nRecall per planted type (the value replaced by its type's placeholder):")
    table(found, columns)
    print("\nLook-alikes redacted (false positives):")
    for kind, (bad, n) in false.items():
        extra = f"  @{args.compare_with[:8]}: {old_false[kind][0]}" if old else ""
        print(f"  {kind:26} {bad:>4} / {n:<4}{extra}")

    rate, shares = throughput(docs, pii, args.repeats)
    print(f"\nThroughput (CPU time): {rate:,.0f} docs/s ({rate * megabytes / len(docs):.2f} MB/s), time share per detector: "
          + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    old_rate = None
    if old:
        old_rate, old_shares = throughput(docs, old, args.repeats)
        print(f"  @{args.compare_with[:8]}: {old_rate:,.0f} docs/s, time share per detector: "
              + ", ".join(f"{k} {v:.0%}" for k, v in old_shares.items()))

    recall = min(hit / n for hit, n in found.values())
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, (hit, n) in found.items():
        kinds[(PLANTED | NATIONAL)[name][0]][0] += hit
        kinds[(PLANTED | NATIONAL)[name][0]][1] += n
    false_positives = sum(bad for bad, _ in false.values()) + filler_changed
    summary = (f"pii: recall={recall:.4f} false_positives={false_positives} docs={len(docs)} types={len(found)} "
               + " ".join(f"recall_{k}={hit / n:.4f}" for k, (hit, n) in kinds.items())
               + f" docs_per_s={rate:.0f} phone_time_share={shares['phone']:.3f}")
    if old_rate:
        summary += f" baseline_docs_per_s={old_rate:.0f}"
    print(summary)
    sys.exit(0)


if __name__ == "__main__":
    main()
