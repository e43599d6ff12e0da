"""Phone numbers as the portal and the dialplan need them: international digits, or nothing.

Caller IDs and CRM fields are free text. Only characters that people actually type into a
phone number are accepted (digits, spaces, `+ - . ( )`); anything else — letters, `&`, `/`,
`@`, quotes, newlines — means "not a number" rather than "a number with junk", so a value like
`120&Local/666@evil` can never become something to dial. The digits are then read by
phonenumbers (Google's libphonenumber metadata), which knows each country's trunk prefix
(Russia's 8) and lengths, instead of a hand-written rule for every country.
"""

from __future__ import annotations

import functools
import re

import phonenumbers

# Both whole-text patterns (fullmatch): with `$`, a trailing newline would pass.
_TYPED_NUMBER = re.compile(r"\+?[0-9 ()\-.]+")
_DIGITS = re.compile(r"[0-9]+")
_NOT_DIGITS = re.compile(r"[^0-9]")
# E.164 allows at most 15 digits; anything longer is not a phone number. Below 3 digits it is
# not one either ("0" is what some trunks send for a withheld number; the portal reads it as
# an empty PHONE_NUMBER and answers 400).
_MAX_DIGITS = 15
_MIN_DIGITS = 3
# However a number is typed, 32 characters hold it; longer text (an extension can be 79
# characters, an AGI argument more) is not one, and no regex or cache ever sees it.
MAX_NUMBER_CHARS = 32


# Callers repeat (that is what the answer cache is for too), and parsing is the costliest step
# of a cached call; the function is pure, so remember recent results.
@functools.lru_cache(maxsize=16384)
def normalize_number(raw: str, default_country: str) -> str | None:
    """`+7 916 123-45-67`, `89161234567`, `9161234567` (RU) -> `79161234567`; junk -> None.

    Digit strings that libphonenumber cannot read as a possible number (short service numbers,
    internal extensions) come back as their bare digits, so they are still looked up as typed.
    """
    text = raw.strip()
    if not text or len(text) > MAX_NUMBER_CHARS or not _TYPED_NUMBER.fullmatch(text):
        return None
    digits = _NOT_DIGITS.sub("", text)
    if len(digits) < _MIN_DIGITS or len(digits) > _MAX_DIGITS:
        return None
    try:
        parsed = phonenumbers.parse(text, default_country)
    except phonenumbers.NumberParseException:
        return digits
    if not phonenumbers.is_possible_number(parsed):
        return digits
    return f"{parsed.country_code}{parsed.national_number}"


@functools.lru_cache(maxsize=4096)
def dialable_number(raw: str, default_country: str) -> str | None:
    """A number the PBX may dial on a CRM user's or an admin's word: a valid subscriber number
    (libphonenumber's is_valid_number), in international digits; anything else -> None.

    normalize_number keeps short codes as typed, so that a caller ID like "112" is still looked
    up; a dial target must not: "112", "911" or "01" as an owner's mobile would send clients'
    calls to an emergency or service number.
    """
    number = normalize_number(raw, default_country)
    if number is None:
        return None
    try:
        parsed = phonenumbers.parse("+" + number)
    except phonenumbers.NumberParseException:
        return None
    return number if phonenumbers.is_valid_number(parsed) else None


def normalize_extension(raw: str) -> str | None:
    """An inner number is dialled as it is: plain digits only, anything else is missing."""
    text = raw.strip()
    if _DIGITS.fullmatch(text) and len(text) <= _MAX_DIGITS:
        return text
    return None
