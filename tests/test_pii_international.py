"""PII detection beyond North America and beyond the Luhn check: issue 19, items 3 and 4.

Phone numbers in the common written forms of many countries are found by Google's libphonenumber
(the `phonenumbers` package); the North-American shapes caught before still are. Card numbers must be
a plausible card (an issuer's prefix and one of its lengths, then Luhn): ISBNs, DOIs, ISSNs and other
Luhn-valid digit runs are not cards. Plain functions, no Ray.
"""

from __future__ import annotations

import pytest

from raylm.config import ConfigError, PIIConfig, RaylmConfig, load_config
from raylm.data import pii

# Common written forms, one or more per country (the country code with spaces, dashes, dots, brackets).
INTERNATIONAL_PHONES = [
    "+49 30 1234567", "+49 (0)30 12345678", "+49-89-12345678", "+49 151 23456789",   # Germany
    "+44 20 7946 0958", "+44 (0)20 7946 0958", "+44 7911 123456",                      # United Kingdom
    "+33 1 23 45 67 89", "+33 6 12 34 56 78", "+33.1.23.45.67.89",                      # France
    "+91 98765 43210", "+91-98765-43210",                                               # India
    "+81 3-1234-5678", "+81 90-1234-5678",                                              # Japan
    "+61 2 9876 5432", "+61 412 345 678",                                               # Australia
    "+34 912 345 678", "+34 612 34 56 78",                                              # Spain
    "+39 06 1234 5678", "+39 347 123 4567",                                             # Italy
    "+55 11 91234-5678", "+55 (11) 3123-4567",                                          # Brazil
    "+86 10 1234 5678", "+86 138 0013 8000",                                            # China
    "+7 495 123-45-67",                                                                 # Russia
    "+31 20 123 4567", "+52 55 1234 5678", "+27 21 123 4567",                          # Netherlands, Mexico, South Africa
]

# Shapes the hand-written rule caught before libphonenumber; they must still be caught.
NORTH_AMERICAN_PHONES = [
    "(555) 123-4567", "555-123-4567", "555.123.4567", "555 123 4567", "(555)123-4567",
    "+1 555 123 4567", "+1-555-123-4567", "+1 (555) 123-4567", "(212) 555-0123", "+1 212 555 0123",
]

# Digit runs that look like phone numbers to a regex but are something else.
PHONE_LOOK_ALIKES = [
    "version 1.2.3 and v10.0.19045.2965", "released 2021-05-12, updated 12.05.2024 at 10:30:45",
    "ISBN 0-306-40615-2 and 978-0-306-40615-7", "ISSN 0317-8471", "doi:10.1000/182",
    "commit e83c5163316f89bfbde7d9ab23ca2e25604af290", "order ORD-2024-000123 and order #100234987",
    "invoice 2124567890 of 2023", "scores 12 34 56 78 90", "pages 1234-1256", "x = [1, 2, 3, 4, 5, 6, 7]",
    "1,234,567,890 dollars", "uuid 123e4567-e89b-12d3-a456-426614174000", "in 1990 1234 people came",
    "the ratio was 1.6023628033 overall", "scores 77 18 70 42 70 were logged", "clocked 00:02:30.591557",
    "see pages 310-1586",
]


@pytest.mark.parametrize("number", INTERNATIONAL_PHONES + NORTH_AMERICAN_PHONES)
def test_phone_numbers_in_common_forms_are_redacted_whole(number):
    redacted, counts = pii.redact(f"Call us at {number} today.")
    assert redacted == "Call us at <PHONE> today." and counts == {"phone": 1}, (number, redacted, counts)


@pytest.mark.parametrize("text", PHONE_LOOK_ALIKES)
def test_phone_look_alikes_are_left_alone(text):
    assert pii.redact(text, ["phone"]) == (text, {})


def test_number_rows_and_decimals_are_not_national_numbers_of_other_regions():
    for text, region in (("Scores 87 19 33 90 19 were logged.", "IN"), ("Released on 2013-09-04.", "DE"),
                         ("The ratio was 37.5931596239 overall.", "DE"), ("Invoice 2026-457-0207 is paid.", "DE")):
        assert pii.redact(text, ["phone"], phone_region=region) == (text, {}), (text, region)


def test_an_e164_number_is_a_phone_and_an_iban_is_not_a_card():
    assert pii.redact("Sent from +4915123454402 today.") == ("Sent from <PHONE> today.", {"phone": 1})
    assert pii.redact("IBAN DE43 6237 2845 1809 7725 23 now") == ("IBAN <IBAN> now", {"iban": 1})


def test_national_numbers_follow_the_configured_region():
    german, british = "Tel. 030 12345678 oder", "ring 020 7946 0958 now"
    assert pii.redact(german, ["phone"]) == (german, {})  # not a US number
    assert pii.redact(german, ["phone"], phone_region="DE") == ("Tel. <PHONE> oder", {"phone": 1})
    assert pii.redact(british, ["phone"], phone_region="GB") == ("ring <PHONE> now", {"phone": 1})
    batch = pii.pii_batch(_frame([german]), phone_region="DE")
    assert batch["text"][0] == "Tel. <PHONE> oder" and batch["stat_pii_phone"][0] == 1


def test_phone_region_is_checked_and_hash_neutral_at_its_default():
    assert PIIConfig().phone_region == "US"
    assert PIIConfig(phone_region="de").phone_region == "DE"
    with pytest.raises(ConfigError, match=r"data\.pii\.phone_region"):
        load_config(None, overrides=["data.pii.phone_region=XX"])
    assert "phone_region" not in RaylmConfig().section("data")["pii"]
    assert RaylmConfig(data={"pii": {"phone_region": "DE"}}).section("data")["pii"]["phone_region"] == "DE"


# ---------------------------------------------------------------------------------------------- cards

# One Luhn-valid test number per network (the networks' published test numbers).
CARDS = {
    "visa": "4111 1111 1111 1111", "visa13": "4222222222222", "mastercard": "5555-5555-5555-4444",
    "mastercard_2series": "2223 0031 2200 3222", "amex": "3782 822463 10005", "discover": "6011 1111 1111 1117",
    "diners": "3056 9309 0259 04", "jcb": "3530 1113 3330 0000", "unionpay": "6200 0000 0000 0005",
}
# Luhn-valid digit runs that are not cards.
CARD_LOOK_ALIKES = [
    "ISBN 978-0-306-40000-1", "9783161480027", "979-10-90630-00-0", "ISBN-13: 9780596520021",  # ISBN-13s passing Luhn
    "see ISBN 4111 1111 1111 1111 in the catalogue",        # introduced as an ISBN: not a card even if it could be
    "doi:10.1000/4111111111111111", "ISSN 4111111111111111",
    "order 1234567890123452",                                # Luhn-valid, but no network starts with 12
    "tracking 9400 1000 0000 0000 0000 00",                  # 22 digits
    "serial 8888 8888 8888 8888",                            # Luhn-valid, no network starts with 88
    "scores 53 72 23 49 87 72 47 41 were logged",            # UnionPay prefix and Luhn, but not printed as a card
]


@pytest.mark.parametrize("network", sorted(CARDS))
def test_each_card_network_is_redacted(network):
    assert pii.redact(f"paid with {CARDS[network]} yesterday") == ("paid with <CREDIT_CARD> yesterday",
                                                                    {"credit_card": 1}), network


@pytest.mark.parametrize("text", CARD_LOOK_ALIKES)
def test_luhn_valid_non_cards_are_left_alone(text):
    redacted, counts = pii.redact(text, ["credit_card"])
    assert (redacted, counts) == (text, {}), text


def test_card_network_needs_prefix_and_length():
    assert pii.card_network("4111111111111111") == "visa"
    assert pii.card_network("411111111111111") is None          # a Visa prefix at 15 digits
    assert pii.card_network("378282246310005") == "amex"
    assert pii.card_network("3782822463100050") is None         # Amex is 15 digits
    assert pii.card_network("9780306406157") is None            # ISBN-13


def _frame(texts):
    from raylm.data.sources import document
    import pandas as pd

    return pd.DataFrame([document("src", f"doc{i}", t) for i, t in enumerate(texts)])


@pytest.mark.parametrize("separator", [" ", "\n", ", ", " / "])
def test_international_numbers_one_after_another_are_each_redacted(separator):
    """A number written with its country code is not the tail of the number before it (found trying a
    contact line where numbers follow each other with only a space between them)."""
    text = "Tel +49 30 1234567" + separator + "+44 20 7946 0958" + separator + "+33 1 23 45 67 89."
    redacted, counts = pii.redact(text)
    assert counts == {"phone": 3}, redacted
    assert "49" not in redacted and "7946" not in redacted and "45 67" not in redacted
