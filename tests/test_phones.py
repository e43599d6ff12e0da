import pytest

from agi_bitrix.phones import normalize_extension, normalize_number


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
