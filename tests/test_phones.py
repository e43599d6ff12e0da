import pytest

from agi_bitrix.phones import dialable_number, normalize_extension, normalize_number


@pytest.mark.parametrize("raw", ["89161234567", "+7 916 123-45-67", "9161234567", "79161234567",
                                 "+79161234567", "8 (916) 123-45-67", " 8-916-123-45-67 ", "7.916.123.45.67"])
def test_russian_formats_become_international_digits(raw):
    assert normalize_number(raw, "RU") == "79161234567"


@pytest.mark.parametrize("raw", ["", " ", "anonymous", "unknown", "Restricted", "Anonymous", "<unknown>",
                                 "120&Local/666@evil", "7916\n1234567", "79161234567;x", "1-800-FLOWERS",
                                 "+", "()", "1234567890123456", "0", "00", "+7"])
def test_non_numbers_are_none(raw):
    assert normalize_number(raw, "RU") is None


def test_other_countries_and_short_numbers():
    assert normalize_number("+44 20 7946 0958", "RU") == "442079460958"
    assert normalize_number("87012345678", "KZ") == "77012345678"
    assert normalize_number("102", "RU") == "102"  # an inner number stays as typed


@pytest.mark.parametrize("raw, expected", [("101", "101"), (" 101 ", "101"), ("", None), ("10 1", None),
                                           ("120&Local/666@evil", None), ("101#", None), ("+101", None)])
def test_extensions_are_plain_digits(raw, expected):
    assert normalize_extension(raw) == expected


# Every named limit at its edge: 3..15 digits, 32 characters however the number is typed.
@pytest.mark.parametrize("raw, expected", [
    ("12", None), ("123", "123"),  # _MIN_DIGITS
    ("123456789012345", "123456789012345"), ("1234567890123456", None),  # _MAX_DIGITS (E.164)
    ("+7" + " " * 20 + "9161234567", "79161234567"),  # MAX_NUMBER_CHARS: 32 characters
    ("+7" + " " * 21 + "9161234567", None),  # 33: inner spaces count
    (" " * 40 + "79161234567" + " " * 40, "79161234567"),  # surrounding spaces are not the number
])
def test_number_limits_at_their_edges(raw, expected):
    assert normalize_number(raw, "RU") == expected


# Text around an otherwise good number makes it no number (the whole text must be typed digits).
@pytest.mark.parametrize("raw", ["x79161234567", "79161234567x", "79161234567\n1", "+7 916 123-45-67#"])
def test_junk_before_or_after_a_number_is_no_number(raw):
    assert normalize_number(raw, "RU") is None


def test_digits_libphonenumber_cannot_parse_are_looked_up_as_typed():
    # +999 is no country code: phonenumbers raises, and the digits are kept for the lookup.
    assert normalize_number("+999 1234", "RU") == "9991234"
    # A number it parses but that cannot exist in that country keeps its digits too.
    assert normalize_number("1234", "RU") == "1234"


# dialable_number: only valid subscriber numbers, as international digits.
@pytest.mark.parametrize("raw, expected", [
    ("+7 916 123-45-67", "79161234567"), ("89161234567", "79161234567"), ("8 800 555-35-35", "78005553535"),
    ("+44 20 7946 0958", "442079460958"),
    ("112", None), ("911", None), ("01", None),  # service and short numbers
    ("+999 1234", None),  # looked up as typed, but no country: never dialled
    ("123456789012345", None), ("79161234567x", None), ("", None),
])
def test_dialable_numbers_are_valid_subscriber_numbers_only(raw, expected):
    assert dialable_number(raw, "RU") == expected


@pytest.mark.parametrize("raw, expected", [
    ("123456789012345", "123456789012345"), ("1234567890123456", None),  # at most 15 digits
    ("101\n", "101"), ("101\n1", None), ("x101", None),
])
def test_extension_limits(raw, expected):
    assert normalize_extension(raw) == expected
