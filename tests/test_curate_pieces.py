"""Curation pieces without Ray: cleaners, quality rules, PII detectors, MinHash / LSH, decontamination."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raylm.config import CleanConfig, DedupConfig, QualityConfig, SourceConfig
from raylm.data import clean, dedup, decontam, exact_jaccard, pii, quality
from raylm.data.curate import screen_batch
from raylm.data import ngrams
from raylm.data.ngrams import jaccard, ngram_hashes, shingle_set, words
from raylm.data.sources import decode_file, document


def frame(texts: list[str], reasons: list[str] | None = None, source: str = "src") -> pd.DataFrame:
    batch = pd.DataFrame([document(source, f"doc{i}", t) for i, t in enumerate(texts)])
    if reasons:
        batch["reason"] = reasons
    return batch


# ---------------------------------------------------------------------------------------------- cleaning


def test_html_goes_through_the_parser_and_plain_text_does_not():
    page = ("<!DOCTYPE html><html><head><title>T</title><style>p{color:red}</style></head><body>"
            "<nav><a href='/'>Home</a></nav><p>Fish &amp; chips are <b>good</b>.</p><div>Second</div>"
            "<script>var tracking = 1;</script></body></html>")
    assert clean.looks_like_html(page)
    text = clean.html_to_text(page)
    assert "Fish & chips are good." in text and "Second" in text
    assert "tracking" not in text and "color" not in text and "Home" not in text
    assert not clean.looks_like_html("if a < b and c > d: print('<b>') # one tag in code")


def test_boilerplate_lines_are_dropped_and_prose_is_kept():
    text = ("We use cookies to improve your experience on our site.\nHome | About us | Contact | Blog\n"
            "The river flooded the valley in 1953, displacing hundreds of families.\n"
            "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\nRead our Privacy Policy\n"
            "Cookies are a traditional baked treat in many countries.")
    kept = clean.drop_boilerplate_lines(text).split("\n")
    assert kept == ["The river flooded the valley in 1953, displacing hundreds of families.",
                    "Cookies are a traditional baked treat in many countries."]


PEM_BLOCK = """-----BEGIN CERTIFICATE-----
Vx5YrW6uEgtG8+/Ii6c55S9FPYUScOUewB7xgqlBEjMSsL5kjA7gWARlL/+vlHmH
LtITSmVMr5WCWvQl1eRRmKoL1kJ4HpAbDAOsQpEVcGkOU85TbFrP9xHOlUTIYqLV
jY2OG6j/9sVh81NTdf6u5fX1oU+TMdoFora5kf1DG56xFZ4zy60P4d4kHxLxW5/r
J3PaM6P/Jx2bhN2Kq6iidHfJeGPKYLjdULrEu/sb3hJGT5XNrrw2GQWVGGrJLE0E
ab/cd/ef/gh==
-----END CERTIFICATE-----"""
CODE_BLOCK = """cat access.log | grep 404 | sort | uniq -c | sort -rn
ls / | head / tail
return left | right | mask
flags = READ | WRITE | EXEC
x / y / z
a > b > c
fn main() -> Result<(), Box<dyn Error>> {
    print("Please accept cookies to continue")
    raise RuntimeError("JavaScript is disabled")
}"""
TABLE_BLOCK = """| Name | Role | Team |
|------|------|------|
| Alice | Lead | Core |
| Bob | Dev | Data |
Q1 | Q2 | Q3 | Q4
12.5 | 13.1 | 9.8 | 11.0"""
POETRY_BLOCK = """Roses are red / Violets are blue / Sugar is sweet
Down / down / down
the rain / the rain / the rain
O Rose / thou art sick / The invisible worm"""
DENSE_BLOCK = """sha256/9f86d081884c7d659a2feaa0c55ad015/a3bf4f1b2b0b822cd15d6c15b0f00a08
/usr/local/lib/python3.11/site-packages
src/raylm/data/clean.py
https://example.com/docs/v2/api/index.html
https://example.com/help/use-cookies/privacy-policy
A/B/C testing
Read/Write/Execute
2024/05/12 > 2024/05/13 > 2024/05/14
de | ad | be | ef
>>> 1 > 0 > -1"""


@pytest.mark.parametrize("block", [PEM_BLOCK, CODE_BLOCK, TABLE_BLOCK, POETRY_BLOCK, DENSE_BLOCK],
                         ids=["pem_base64", "code", "tables", "poetry", "dense_tokens"])
def test_boilerplate_rules_never_remove_code_base64_tables_poetry_or_dense_tokens(block):
    assert clean.drop_boilerplate_lines(block) == block
    cleaned = clean.clean_batch(frame([block]))
    assert cleaned["text"][0] == block and cleaned["stat_clean_boilerplate_docs"][0] == 0


def test_comments_and_docstrings_of_a_code_document_keep_their_notices():
    source = ('# Copyright 2020 Example Corp. All rights reserved.\nimport http.cookiejar\n\n\n'
              'def load(jar):\n    """Accept cookies from the jar if the policy allows it."""\n    return jar.load()\n')
    assert clean.drop_boilerplate_lines(source) == source
    web = "We accept cookies to improve your visit.\nThe museum opens at nine."
    assert clean.drop_boilerplate_lines(web) == "The museum opens at nine."


@pytest.mark.parametrize("menu", ["Home | About us | Contact | Blog", "Home › Products › Running Shoes",
                                  "Home » News » Sport", "Home / News / Sport / Weather", "HOME | ABOUT | FAQ | SHOP",
                                  "News • Sport • Weather • Culture"])
def test_navigation_lines_of_short_menu_words_are_still_dropped(menu):
    assert clean.drop_boilerplate_lines(f"A sentence.\n{menu}\nAnother.") == "A sentence.\nAnother."


def test_terminal_punctuation_rule_of_c4():
    text = "A full sentence.\nmenu item\nAnother one!\n\n\"Quoted.\""
    assert clean.drop_unterminated_lines(text) == "A full sentence.\nAnother one!\n\n\"Quoted.\""


def test_gutenberg_header_and_footer_are_cut_and_other_text_is_untouched():
    book = ("The Project Gutenberg eBook of Moby Dick\nThis eBook is for the use of anyone\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK 2701 ***\nCall me Ishmael.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK 2701 ***\nSection 1. General Terms of Use")
    assert clean.strip_gutenberg(book).strip() == "Call me Ishmael."
    plain = "A story that mentions no archive at all.\nThe end."
    assert clean.strip_gutenberg(plain) == plain


def test_symbols_control_characters_and_emoji_go_letters_and_maths_stay():
    text = "caf\u00e9 \u4e2d\u6587 \u2211 \u2192 \u20ac 5\u00b0C \u00a9 ok\x07\u200b \U0001F600\u2764\ufe0f \ue000 \u2713 tab\there"
    assert clean.strip_symbols(text) == "caf\u00e9 \u4e2d\u6587 \u2211 \u2192 \u20ac 5\u00b0C \u00a9 ok    tab\there"


def test_unicode_normalisation_step_is_switchable_and_reported():
    decomposed = "cafe\u0301 " * 3
    batch = clean.clean_batch(frame([decomposed]), config=CleanConfig(unicode="NFC"))
    assert batch["text"][0] == ("caf\u00e9 " * 3).strip()
    assert batch["stat_clean_unicode_docs"][0] == 1 and batch["stat_clean_unicode_bytes"][0] == 3
    off = clean.clean_batch(frame([decomposed]), config=CleanConfig(unicode="none"))
    assert off["text"][0] == decomposed.strip() and off["stat_clean_unicode_docs"][0] == 0


def test_cleaning_that_empties_a_document_rejects_it_with_the_step():
    batch = clean.clean_batch(frame(["We use cookies to improve your experience.", "\U0001F600\U0001F600", "fine text",
                                     "x"], ["", "", "", "parse_error"]))
    assert batch["reason"].tolist() == ["empty", "empty", "", "parse_error"]
    assert "emptied by boilerplate" in batch["detail"][0] and "emptied by symbols" in batch["detail"][1]


def test_normalize_whitespace_keeps_indentation():
    assert clean.normalize_whitespace("def f():\r\n    return 1   \n\n\n\n\tx = 2\t\n\n") == "def f():\n    return 1\n\n\tx = 2"


# ---------------------------------------------------------------------------------------------- quality

PROSE = ("The committee met on Tuesday to discuss the budget for the coming year, and the members agreed "
         "that the library should have longer opening hours. They also voted to repair the roof of the town "
         "hall before winter, because the old tiles had started to leak during the storms of last spring. ")
PROSE_MORE = ("Meanwhile the school announced a new science program for older students, with weekly visits "
              "to the observatory on the hill and a small prize for the best essay about the night sky.")


@pytest.mark.parametrize("rule, bad_text, settings_", [
    ("min_words", "too short a text", {"min_words": 50}),
    ("max_words", PROSE * 3, {"max_words": 100}),
    ("mean_word_length", "a b c d e f g h i j " * 10, {"min_mean_word_length": 3}),
    ("mean_word_length", "supercalifragilistic " * 60, {"max_mean_word_length": 10}),
    ("symbol_word_ratio", "# heading # more # tags ... " * 20, {"max_symbol_word_ratio": 0.1}),
    ("bullet_lines", "\n".join(["- item one here", "* item two here", "\u2022 third"] * 10), {"max_bullet_lines": 0.9}),
    ("ellipsis_lines", "\n".join(["and then it went on..."] * 5 + ["A whole sentence."]), {"max_ellipsis_lines": 0.3}),
    ("alpha_words", "12 34 56 78 90 11 22 33 word " * 10, {"min_alpha_words": 0.8}),
    ("duplicate_lines", "\n".join(["same line here"] * 8 + ["other"]), {"max_duplicate_lines": 0.3}),
    ("duplicate_line_chars", "\n".join(["a much longer repeated line of text"] * 3 + ["x", "y", "z", "w"]),
     {"max_duplicate_line_chars": 0.2}),
    ("duplicate_paragraphs", "\n\n".join(["same paragraph"] * 5 + ["other"]), {"max_duplicate_paragraphs": 0.3}),
    ("top_2gram", "new york " * 40 + PROSE, {"max_top_ngram": {2: 0.2}}),
    ("duplicate_5gram", ("one two three four five six " * 30) + PROSE, {"max_duplicate_ngram": {5: 0.15}}),
    ("stop_words", "Quarterly revenue grew strongly across regions " * 10, {"min_stop_words": 2}),
])
def test_each_quality_rule_rejects_its_case_and_passes_prose(rule, bad_text, settings_):
    config = QualityConfig(**{"max_words": None, **settings_})
    failure = quality.quality_failure(bad_text, config)
    assert failure is not None and failure[0] == rule, failure
    assert quality.quality_failure(PROSE, config) is None


def test_gopher_thresholds_pass_real_prose_and_reject_lists():
    config = QualityConfig.gopher()
    assert quality.quality_failure(PROSE + PROSE_MORE, config) is None
    menu = "\n".join(f"- Item {i} | price {i}.99 #{i}" for i in range(80))
    assert quality.quality_failure(menu, config) is not None


def test_quality_batch_marks_reason_and_detail():
    batch = quality.quality_batch(frame([PROSE, "few words"], ["", ""]), QualityConfig(min_words=10))
    assert batch["reason"].tolist() == ["", "quality:min_words"]
    assert batch["detail"][1] == "min_words = 2 < 10"


# ---------------------------------------------------------------------------------------------- PII


@pytest.mark.parametrize("kind, positive, negative", [
    ("email", "write to jane.doe+news@mail.example.co.uk today", "use the @property decorator; x = a @ b.T"),
    ("phone", "call (555) 123-4567 or +44 20 7946 0958", "on 2021-05-12 pi was 3.14159, version 1.2.3"),
    ("ip", "server 192.168.10.1 and 2001:db8::8a2e:370:7334", "slice a[::2], time 12:30:45, 999.1.1.1"),
    ("credit_card", "card 4111 1111 1111 1111 expires", "order 4111 1111 1111 1112 (Luhn fails) 1234567890123"),
    ("ssn", "SSN 123-45-6789 on file", "ids 000-12-3456 and 666-12-3456 are never issued"),
    ("iban", "IBAN GB82 WEST 1234 5698 7654 32", "GB82WEST12345698765433 fails mod 97"),
    ("secret", "key AKIAIOSFODNN7EXAMPLE", "AKIA is a prefix, AKIAshort is not a key"),
    ("secret", "token ghp_" + "A1b2" * 9, "ghp_tooshort"),
    ("secret", "slack xoxb-1234567890-abcdefghij", "xox is not a token"),
    ("secret", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
     "-----BEGIN PUBLIC KEY----- is fine"),
    ("secret", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "eyJ alone"),
    ("secret", 'password = "hunter22" and API_KEY=abcd1234efgh', "password = getpass() or token = None"),
])
def test_pii_detectors_positive_and_negative(kind, positive, negative):
    redacted, counts = pii.redact(positive)
    assert counts.get(kind, 0) >= 1, (redacted, counts)
    assert pii.PLACEHOLDERS[kind] in redacted
    unchanged, counts = pii.redact(negative)
    assert unchanged == negative and not counts.get(kind)


def test_email_in_url_path_is_redacted_but_the_url_is_kept():
    redacted, counts = pii.redact("see https://example.org/users/jane@example.org/profile?x=1 now")
    assert redacted == "see https://example.org/users/<EMAIL>/profile?x=1 now" and counts == {"email": 1}


def test_password_assignment_keeps_the_key():
    assert pii.redact('password = "hunter22"')[0] == 'password = "<SECRET>"'
    assert pii.redact("db_password: s3cr3t!x")[0] == "db_password: <SECRET>"


def test_luhn_and_iban_checks():
    assert pii.luhn_valid("4111111111111111") and not pii.luhn_valid("4111111111111112")
    assert pii.iban_valid("DE89 3704 0044 0532 0130 00") and not pii.iban_valid("DE89 3704 0044 0532 0130 01")


def test_pii_batch_counts_per_type_and_redacts_rejected_rows_too():
    batch = pii.pii_batch(frame(["a@b.org and c@d.org", "no pii", "reject me at x@y.com"], ["", "", "quality:min_words"]))
    assert batch["stat_pii_email"].tolist() == [2, 0, 1]
    assert "x@y.com" not in " ".join(batch["text"])


# ---------------------------------------------------------------------------------------------- sources, screen


def test_empty_jsonl_file_and_empty_json_list_give_no_row():
    source = SourceConfig(path="python-stdlib")
    for name, raw in (("e.jsonl", b""), ("f.json", b"[]"), ("g.jsonl", b"\n\n"), ("h.json", b"")):
        assert list(decode_file({"path": f"/c/{name}", "bytes": raw}, source, "/c")) == [], name


def test_empty_files_are_counted_from_the_listing(tmp_path):
    from raylm.data.sources import empty_files

    (tmp_path / "a.jsonl").write_bytes(b"")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    assert empty_files(SourceConfig(path=str(tmp_path))) == {"count": 1, "files": ["a.jsonl"]}


def test_null_text_is_reported_as_null_and_json_errors_read_well():
    source = SourceConfig(path="python-stdlib")
    raw = b'{"text": null}\n{"body": 1}\n{"text": "unterminated\n'
    details = [r["detail"] for r in decode_file({"path": "/c/n.jsonl", "bytes": raw}, source, "/c")]
    assert details[0] == "n.jsonl:1: text field 'text' null"
    assert details[1] == "n.jsonl:2: text field 'text' missing"
    assert "at at" not in details[2] and "starting at column 10" in details[2], details[2]
    for name in ("deep.jsonl", "deep.json"):  # nesting deeper than the stack: a rejected row, not a crash
        rows = list(decode_file({"path": f"/c/{name}", "bytes": b"[" * 200000}, source, "/c"))
        assert [(r["reason"], r["detail"].split(": ")[1]) for r in rows] == [("parse_error", "JSON nested too deeply to read")]


def _lines(count: int) -> bytes:
    rng = random.Random(0)  # random words: the compressed file is many codec chunks long
    return b"".join(json.dumps({"text": f"document {i} " + " ".join(f"{rng.getrandbits(32):x}" for _ in range(20))})
                    .encode() + b"\n" for i in range(count))


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".bz2"])
def test_truncated_compressed_jsonl_keeps_the_rows_before_the_cut(suffix):
    import bz2
    import gzip

    import zstandard

    raw = _lines(20000)
    packed = {".gz": gzip.compress, ".bz2": bz2.compress,
              ".zst": lambda b: zstandard.ZstdCompressor(write_checksum=True).compress(b)}[suffix](raw)
    cut = packed[:len(packed) // 2]
    source = SourceConfig(path="python-stdlib")
    rows = list(decode_file({"path": f"/c/t.jsonl{suffix}", "bytes": cut}, source, "/c"))
    kept, broken = rows[:-1], rows[-1]
    assert len(kept) > 1000 and all(r["reason"] == "" for r in kept)
    assert [r["text"] for r in kept] == [json.loads(line)["text"] for line in raw.split(b"\n")[:len(kept)]]
    assert broken["reason"] == "parse_error"
    assert broken["detail"].startswith(f"t.jsonl{suffix}:{len(kept) + 1}: compressed stream")
    assert f"the {len(kept)} line(s) before it were read" in broken["detail"]
    # corrupt in the middle (not only cut short): the rows before the damage, then one parse_error row
    damaged = bytearray(packed)
    damaged[len(packed) // 2: len(packed) // 2 + 64] = b"\xff" * 64
    rows = list(decode_file({"path": f"/c/t.jsonl{suffix}", "bytes": bytes(damaged)}, source, "/c"))
    assert rows[-1]["reason"] == "parse_error" and "compressed stream corrupt" in rows[-1]["detail"]
    originals = [json.loads(line)["text"] for line in raw.split(b"\n")[:1000]]
    assert [r["text"] for r in rows[:1000]] == originals  # (lines garbled before the codec noticed may follow)


def test_concatenated_gzip_members_and_zstd_frames_are_all_read():
    import gzip

    import zstandard

    source = SourceConfig(path="python-stdlib")
    one, two = _lines(3), b'{"text": "the second member"}\n'
    for name, packed in (("m.jsonl.gz", gzip.compress(one) + gzip.compress(two)),
                         ("m.jsonl.zst", zstandard.ZstdCompressor().compress(one)
                          + zstandard.ZstdCompressor().compress(two))):
        rows = list(decode_file({"path": f"/c/{name}", "bytes": packed}, source, "/c"))
        assert [r["reason"] for r in rows] == [""] * 4 and rows[-1]["text"] == "the second member", name


def test_truncated_compressed_text_file_is_one_parse_error_row():
    import gzip

    source = SourceConfig(path="python-stdlib")
    packed = gzip.compress(("a paragraph of text. " * 5000).encode())
    rows = list(decode_file({"path": "/c/book.txt.gz", "bytes": packed[:len(packed) // 2]}, source, "/c"))
    assert [r["reason"] for r in rows] == ["parse_error"] and "truncated" in rows[0]["detail"]


def test_damaged_parquet_keeps_rows_before_the_damage_and_unopenable_is_one_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm.data.sources import decode_parquet_file

    texts = [f"row {i} " + "text " * 30 for i in range(4000)]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1000, compression="none")
    source = SourceConfig(path=str(tmp_path))
    data = path.read_bytes()
    meta = pq.read_metadata(path)
    third = meta.row_group(2).column(0)
    damaged = bytearray(data)  # overwrite row group 2's data pages; the footer stays intact
    start = third.data_page_offset
    damaged[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(damaged))
    rows = list(decode_parquet_file({"path": str(path)}, source, str(tmp_path), None))
    kept = [r for r in rows if r["reason"] == ""]
    assert [r["text"] for r in kept] == texts[:2000]
    assert [r["reason"] for r in rows[2000:]] == ["parse_error"]
    assert "row group 2 of 4, after row 2000" in rows[-1]["detail"] and "p.parquet" in rows[-1]["detail"]
    path.write_bytes(data[:len(data) // 2])  # the footer is gone: the file cannot be opened at all
    rows = list(decode_parquet_file({"path": str(path)}, source, str(tmp_path), None))
    assert [r["reason"] for r in rows] == ["parse_error"]
    assert rows[0]["detail"].startswith("p.parquet: cannot be opened as parquet")


def test_a_file_that_cannot_be_read_is_one_parse_error_row(tmp_path):
    from raylm.data.sources import read_and_decode_file

    source = SourceConfig(path=str(tmp_path))
    rows = list(read_and_decode_file({"path": str(tmp_path / "gone.jsonl")}, source, str(tmp_path), None))
    assert [r["reason"] for r in rows] == ["parse_error"] and "gone.jsonl: cannot be read" in rows[0]["detail"]


def test_compressed_files_decode_whether_or_not_already_decompressed():
    import gzip

    import zstandard

    source = SourceConfig(path="python-stdlib")
    line = b'{"text": "hello there"}\n'
    for name, raw in (("a.jsonl.gz", gzip.compress(line)), ("a.jsonl.gz", line),
                      ("b.jsonl.zst", zstandard.ZstdCompressor().compress(line)), ("b.jsonl.zst", line)):
        rows = list(decode_file({"path": f"/c/{name}", "bytes": raw}, source, "/c"))
        assert [(r["reason"], r["text"]) for r in rows] == [("", "hello there")], name


def test_screen_rejects_large_documents_without_their_text_and_samples_by_weight():
    big = "x" * 5000
    batch = frame([big, "small"])
    screened = screen_batch(batch, max_doc_bytes=1000, weights={"src": 1.0}, seed=0)
    assert screened["reason"].tolist() == ["too_large", ""] and screened["text"][0] == ""
    sampled = screen_batch(pd.DataFrame([document("web", f"d{i}", f"doc {i}") for i in range(400)]),
                           max_doc_bytes=10**6, weights={"web": 0.25}, seed=0)
    share = (sampled["reason"] == "").mean()
    assert 0.15 < share < 0.35 and set(sampled["reason"]) == {"", "sampled_out"}
    heavy = screen_batch(frame(["a"], source="web"), 10**6, {"web": 2.0}, 0)
    assert json.loads(heavy["meta"][0])["weight"] == 2.0


# ---------------------------------------------------------------------------------------------- dedup


def _words(rng: random.Random, n: int) -> list[str]:
    return [f"w{rng.randrange(20000)}" for _ in range(n)]


def test_ngram_hashes_offsets_and_short_documents():
    hashes, offsets = ngram_hashes(["a b c d e f", "x y", "", "A B C D E F g"], 5)
    assert offsets.tolist() == [0, 2, 3, 3, 6]
    assert hashes[0] == hashes[3] and hashes[1] == hashes[4]  # case-insensitive words
    _, none = ngram_hashes(["x y"], 5, short_docs=False)
    assert none.tolist() == [0, 0]


def test_word_hashes_split_like_the_regex_and_do_not_depend_on_batching():
    """The byte-level splitter must find exactly the words of `\\w+` on the lower-cased text (curly
    quotes, non-breaking spaces, lone surrogates, Kelvin sign, dotted I, CJK, Arabic digits...), and a
    word's hash must not depend on its text, batch or position."""
    rng = random.Random(5)
    alphabet = "aZ_9 '.-\t\n\x00\u00e9\u0130\u2019\u201c\u00a0\u4e2d\u0661\ud800\u212a\u00df"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(40))) for _ in range(400)]
    hashes, counts = ngrams.word_hashes(texts)
    assert counts.tolist() == [len(words(t)) for t in texts]
    one_by_one = [ngrams.word_hashes([w])[0] for t in texts for w in words(t)]
    assert np.array_equal(hashes, np.concatenate(one_by_one))
    long_words = ["abcdefgh", "abcdefghi", "abcdefgh_", "abcdefghijklmnopq", "abcdefghijklmnopr", "a", "a_", "_a"]
    assert len(set(ngrams.word_hashes([" ".join(long_words)])[0].tolist())) == len(long_words)


def bucket_pairs(group: pd.DataFrame, max_bucket: int, num_perm: int | None = None, threshold: float = 0.0,
                 verify: bool = False) -> pd.DataFrame:
    """The candidate pairs of one bucket (rows that share a band key), through the shard function."""
    return dedup.shard_pairs(group.assign(band_key=0), max_bucket, num_perm, threshold, verify)


def _estimate_errors(seed: int, trials: int, length: int, max_changes: int,
                     **signature_options) -> tuple[list[float], list[np.ndarray]]:
    """Signature estimate minus exact 5-gram Jaccard for random texts and near copies of them, and the
    signatures of each pair."""
    rng = random.Random(seed)
    errors, signatures = [], []
    for _ in range(trials):
        words = _words(rng, length)
        other = list(words)
        for _ in range(rng.randrange(max_changes)):
            other[rng.randrange(len(other))] = f"z{rng.randrange(10**6)}"
        a, b = " ".join(words), " ".join(other)
        sigs = dedup.signatures([a, b], **signature_options)
        errors.append(dedup.signature_similarity(sigs[0], sigs[1]) - jaccard(shingle_set(a, 5), shingle_set(b, 5)))
        signatures.append(sigs)
    return errors, signatures


def test_signatures_estimate_jaccard():
    errors, _ = _estimate_errors(seed=0, trials=60, length=300, max_changes=60, num_perm=256)
    assert float(np.sqrt(np.mean(np.square(errors)))) < 0.05
    assert abs(float(np.mean(errors))) < 0.02


def test_densified_signatures_stay_unbiased_on_sets_smaller_than_the_signature():
    """One-permutation hashing leaves most bins empty for short texts; densification must fill them
    all without biasing the estimate."""
    errors, signatures = _estimate_errors(seed=2, trials=150, length=40, max_changes=8)
    assert not any((sigs == 0xFFFFFFFF).any() for sigs in signatures)
    assert abs(float(np.mean(errors))) < 0.02
    single = dedup.signatures(["one"])[0]
    assert (single == single[0]).all()  # one shingle: every bin borrows the only filled one


def test_signatures_do_not_depend_on_batching():
    rng = random.Random(1)
    texts = [" ".join(_words(rng, n)) for n in (3, 0, 50, 20000, 200, 7, 1)]
    together = dedup.signatures(texts)
    alone = np.vstack([dedup.signatures([t]) for t in texts])
    assert np.array_equal(together, alone)
    assert (together[1] == 0xFFFFFFFF).all() and not (together[3] == 0xFFFFFFFF).any()


def test_lsh_parameters_come_from_datasketch():
    from datasketch.lsh import _optimal_param

    assert dedup.lsh_parameters(0.8, 128, 0.5) == _optimal_param(0.8, 128, 0.5, 0.5)


def test_bucket_pairs_are_sorted_and_capped():
    group = pd.DataFrame({"band_key": [1] * 4, "id": ["d", "b", "a", "c"]})
    pairs = bucket_pairs(group, max_bucket=200)
    assert list(zip(pairs["a"], pairs["b"])) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    capped = bucket_pairs(group, max_bucket=1)
    assert list(zip(capped["a"], capped["b"])) == [("a", "b"), ("a", "c"), ("a", "d")]


def test_shard_pairs_equal_the_pairs_of_each_bucket():
    rng = random.Random(6)
    rows = [(rng.randrange(6), f"d{rng.randrange(30):02d}") for _ in range(80)]
    group = pd.DataFrame({"band_key": [k for k, _ in rows], "id": [i for _, i in rows]}).sample(frac=1, random_state=1)
    expected = pd.concat([bucket_pairs(bucket, max_bucket=3) for _, bucket in group.groupby("band_key")])
    got = dedup.shard_pairs(group, max_bucket=3)
    assert list(zip(got["a"], got["b"])) == list(zip(expected["a"], expected["b"]))
    assert len(dedup.shard_pairs(group.iloc[:0], max_bucket=3)) == 0


def test_components_keep_the_smallest_id_whatever_the_edge_order():
    edges = [("e", "d"), ("b", "c"), ("d", "c"), ("x", "y")]
    for order in (edges, edges[::-1], [(b, a) for a, b in edges]):
        components = dedup.Components()
        for a, b in order:
            components.union(a, b)
        assert components.duplicates() == {"c": "b", "d": "b", "e": "b", "y": "x"}
        assert components.sizes() == [4, 2]


def test_exact_dedup_key_ignores_case_and_spacing():
    assert dedup.text_key("Hello   World\n") == dedup.text_key("hello world")
    assert dedup.text_key("hello world") != dedup.text_key("hello worlds")


def test_exact_dedup_keeps_smallest_id_whatever_the_order():
    batch = dedup.add_dedup_key(frame(["same", "Same ", "other", "same"], ["", "", "", "parse_error"]))
    results = []
    for shuffled in (batch, batch.iloc[::-1]):
        marked = pd.concat(dedup.mark_exact_duplicates(g.copy()) for _, g in shuffled.groupby("dedup_key"))
        results.append(dict(zip(marked["id"], marked["reason"])))
    assert results[0] == results[1]
    keeper = min(batch.loc[[0, 1], "id"])
    assert results[0][keeper] == "" and sorted(results[0].values()) == ["", "", "exact_dup", "parse_error"]


def test_bucket_pairs_verify_by_signature_similarity():
    sigs = dedup.signatures(["a b c d e f g h i j", "a b c d e f g h i j", "k l m n o p q r s t"])
    group = pd.DataFrame({"band_key": [7, 7, 7], "id": ["z", "y", "x"], "signature": [s.tobytes() for s in sigs]})
    verified = bucket_pairs(group, 200, num_perm=128, threshold=0.8, verify=True)
    assert list(zip(verified["a"], verified["b"])) == [("y", "z")] and verified["similarity"][0] == 1.0
    assert len(bucket_pairs(group, 200, num_perm=128, threshold=0.8, verify=False)) == 3


def test_exact_verification_drops_a_pair_just_under_the_threshold_whose_estimate_passes():
    """A pair with true Jaccard under 0.8 but signature estimate >= 0.8 is a candidate that signature
    verification keeps and exact verification must drop; pairs at or over 0.8 stay."""
    rng = random.Random(3)
    under = None
    for _ in range(400):
        base = _words(rng, 200)
        copy = list(base)
        for _ in range(rng.choice((5, 6))):
            copy[rng.randrange(len(copy))] = f"z{rng.randrange(10**9)}"
        a, b = " ".join(base), " ".join(copy)
        true = jaccard(shingle_set(a, 5), shingle_set(b, 5))
        sigs = dedup.signatures([a, b])
        if true < 0.8 <= dedup.signature_similarity(sigs[0], sigs[1]):
            under = (a, b, true)
            break
    assert under is not None, "no pair under the threshold with an estimate over it"
    a, b, true = under
    rows = exact_jaccard.pair_shingle_rows(frame([a, b, "unrelated words here"]).assign(id=["p", "q", "r"]),
                                           [{"p": [0], "q": [0]}], 5).to_pandas()
    assert sorted(rows["id"]) == ["p", "q"]
    assert exact_jaccard.shard_jaccard(rows, threshold=0.8).num_rows == 0
    kept = exact_jaccard.shard_jaccard(rows, threshold=true).to_pandas()
    assert list(zip(kept["a"], kept["b"])) == [("p", "q")] and kept["similarity"][0] == pytest.approx(true)
    assert exact_jaccard.shard_jaccard(rows.iloc[:1], threshold=0.0).num_rows == 0  # one side gone: no pair
    two_pairs = exact_jaccard.pair_shingle_rows(frame([a, b, a]).assign(id=["p", "q", "r"]),
                                                [{"p": [0, 1], "q": [0], "r": [1]}], 5).to_pandas()
    both = exact_jaccard.shard_jaccard(two_pairs.iloc[::-1], threshold=0.8).to_pandas()
    assert list(zip(both["a"], both["b"], both["similarity"])) == [("p", "r", 1.0)]  # (p, q) is under 0.8
    none = exact_jaccard.pair_shingle_rows(frame(["unrelated words here"]), [{"p": [0]}], 5)
    assert none.num_rows == 0 and none.schema == exact_jaccard.SHINGLE_ROWS  # typed, so shuffles can concatenate


def test_exact_jaccard_matches_python_sets():
    rng = random.Random(4)
    for _ in range(20):
        x, y = _words(rng, rng.randrange(0, 60)), _words(rng, rng.randrange(0, 60))
        y = x[: rng.randrange(len(x) + 1)] + y
        left, right = exact_jaccard.shingle_sets([" ".join(x), " ".join(y)], 3)
        expected = jaccard(shingle_set(" ".join(x), 3), shingle_set(" ".join(y), 3))
        assert exact_jaccard.exact_jaccard(left, right) == pytest.approx(expected)


def test_verify_mode_accepts_old_booleans_and_names_the_key():
    assert dedup.verify_mode(True) == "signature" and dedup.verify_mode(False) == "none"
    assert DedupConfig(verify=True).verify == "signature" and DedupConfig().verify == "exact"
    with pytest.raises(ValueError, match="dedup.verify"):
        dedup.verify_mode("exakt")


# ---------------------------------------------------------------------------------------------- decontamination


def test_decontam_matches_long_ngrams_only(tmp_path):
    bench = tmp_path / "gsm8k"
    bench.mkdir()
    question = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?")
    with open(bench / "test.jsonl", "w") as handle:
        handle.write(json.dumps({"question": question, "answer": "72 #### 72"}) + "\n")
        handle.write(json.dumps({"question": "Short one?", "answer": "1 #### 1"}) + "\n")
    index = decontam.build_benchmark_ngrams(str(tmp_path), 13)
    assert index.tasks == ["gsm8k"]
    leaked = "Homework help: " + question.upper() + " Thanks!"
    near_miss = "Natalia sold clips to 48 of her friends in April and went home."
    batch = decontam.decontam_batch(frame([leaked, near_miss, PROSE]), [index], "drop")
    assert batch["reason"].tolist() == ["contaminated", "", ""]
    assert "gsm8k/0" in batch["detail"][0]
    flagged = decontam.decontam_batch(frame([leaked]), [index], "flag")
    assert flagged["reason"][0] == "" and json.loads(flagged["meta"][0])["contaminated_with"] == ["gsm8k/0"]
    rows = decontam.contaminated_item_rows(batch)
    path = tmp_path / "contamination.json"
    path.write_text(json.dumps(decontam.write_index(rows["item_id"].tolist(), index.tasks, 13, 1)))
    assert decontam.load_contamination_index(str(path)) == {"gsm8k": {"gsm8k/0"}}


# ---------------------------------------------------------------------------------------------- accounting


def run_pieces(batch: pd.DataFrame) -> pd.DataFrame:
    """The per-batch chain of the stage without Ray (exact dedup by pandas groupby)."""
    batch = screen_batch(batch, 1000, {"p": 1.0}, 0)
    batch = clean.clean_batch(batch, 1, CleanConfig(terminal_punctuation=True))
    batch = pii.pii_batch(batch)
    batch = quality.quality_batch(batch, QualityConfig.gopher())
    batch = dedup.add_dedup_key(batch)
    return pd.concat([dedup.mark_exact_duplicates(g.copy()) for _, g in batch.groupby("dedup_key")])


hostile_lines = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=60).map(lambda t: json.dumps({"text": t}).encode()),
    st.text(max_size=20).map(lambda t: json.dumps({"other": t}).encode()),
    st.sampled_from([b'{"text": 3}', b"[1,2]", b"null", b'{"text": "<p>We use cookies</p>"}', b"\xff\xfe",
                     b'{"text": "' + b"A" * 1200 + b'"}']),
)


@settings(max_examples=60, deadline=None)
@given(files=st.lists(st.lists(hostile_lines, max_size=8), min_size=1, max_size=4))
def test_every_hostile_input_row_is_kept_or_rejected_with_a_reason(files):
    source = SourceConfig(path="python-stdlib", name="p")
    rows = []
    for number, lines in enumerate(files):
        raw = b"\n".join(lines)
        produced = list(decode_file({"path": f"/c/f{number}.jsonl", "bytes": raw}, source, "/c"))
        non_blank = sum(1 for line in raw.split(b"\n") if line.strip())
        assert len(produced) == non_blank
        rows.extend(produced)
    if not rows:  # only empty files: no row to mark
        return
    marked = run_pieces(pd.DataFrame(rows))
    assert len(marked) == len(rows)
    assert set(marked["id"]) == {r["id"] for r in rows} or len({r["id"] for r in rows}) < len(rows)
    rejected = marked[marked["reason"] != ""]
    assert (rejected["reason"].str.len() > 0).all()
    assert (marked.loc[marked["reason"] == "parse_error", "detail"].str.contains(r"f\d+\.jsonl")).all()


ARROW_BATCH_PROBE = """
import json, pathlib, resource, sysconfig
import pandas as pd, pyarrow as pa
from raylm.config import CleanConfig, QualityConfig
from raylm.data import clean, pii, quality
from raylm.data.sources import document
files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:400]  # real text of many lengths
rows = [document("probe", str(path), path.read_text(errors="replace")) for path in files]
batch = pa.Table.from_pylist(rows).to_pandas(types_mapper=pd.ArrowDtype)  # what Ray Data 2.60 hands a pandas UDF
plain = pd.DataFrame(rows)
expected = quality.quality_batch(pii.pii_batch(clean.clean_batch(plain.copy(), 1, CleanConfig())), QualityConfig())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = quality.quality_batch(pii.pii_batch(clean.clean_batch(batch, 1, CleanConfig())), QualityConfig())
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
same = out[["text", "reason", "detail"]].astype(object).equals(expected[["text", "reason", "detail"]].astype(object))
print(json.dumps({"growth": growth, "column": int(plain["n_bytes"].sum()), "same": bool(same)}))
"""


def test_per_row_steps_on_arrow_backed_batches_keep_memory_to_the_batch():
    """Ray Data 2.60 gives pandas UDFs Arrow-backed string columns; reading them a cell at a time made Arrow
    copy the column per row (the scale benchmark's 8 MB file: 6.6 GB peak, 20 s in pii_batch). The steps
    now take Python strings first: Arrow's peak allocation stays near the batch's size, and the result is
    the one a batch of Python strings gives."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ARROW_BATCH_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["same"]
    assert figures["growth"] < 10 * figures["column"], figures
