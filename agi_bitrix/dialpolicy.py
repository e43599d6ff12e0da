"""Click-to-call's settings and its dial policy: which numbers a click in Bitrix24 may make the PBX dial.

A click reaches the PBX from the portal; a forged or mistaken one must not dial a premium-rate
line, an emergency service or a number abroad (toll fraud is the attack, an expensive mistake the
accident). So the default admits only what libphonenumber (Google's metadata, the `phonenumbers`
package) calls a valid fixed-line or mobile number of the configured countries; an admin widens it
in YAML (`clicktocall.dial_policy`), and `agi-bitrix check` rejects a type or country it does not
know. Emergency and short numbers are never dialled, whatever the YAML says.

`dial_destination` is a pure function of the number as the CRM holds it and the policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import phonenumbers
from phonenumbers import shortnumberinfo

from agi_bitrix.checking import quoted
from agi_bitrix.phones import normalize_number
from agi_bitrix.schema import flag, integer, items, number, text

# libphonenumber's PhoneNumberType names an admin may list; UNKNOWN (no type) is never admitted.
NUMBER_TYPES = ("FIXED_LINE", "MOBILE", "FIXED_LINE_OR_MOBILE", "TOLL_FREE", "PREMIUM_RATE", "SHARED_COST",
                "VOIP", "PERSONAL_NUMBER", "PAGER", "UAN", "VOICEMAIL")
DEFAULT_NUMBER_TYPES = ("FIXED_LINE", "MOBILE", "FIXED_LINE_OR_MOBILE")
_TYPE_NAMES = {getattr(phonenumbers.PhoneNumberType, name): name for name in NUMBER_TYPES}

# Bitrix24's STATUS_CODE for a refused destination (api-reference/telephony/
# telephony-external-call-finish.md in bitrix24/b24restdocs): 404 "invalid number", 484 "direction
# unavailable", 403 "forbidden".
INVALID_NUMBER = "404"
DIRECTION_UNAVAILABLE = "484"
FORBIDDEN = "403"

# A channel to ring the agent on: a technology and resource with {extension} in it. No comma, `&`,
# `|` or space: Originate would read them as further targets or arguments.
_CHANNEL_TEMPLATE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*/[A-Za-z0-9_@./:+{}-]{1,120}$")
_CONTEXT = re.compile(r"^[A-Za-z0-9_-]{1,79}$")


def channel_template(value: str, field: str = "extension") -> str:
    """A channel to Originate with one `{field}` in it (callback.py's settings check theirs too)."""
    example = "PJSIP/{extension} or Local/{extension}@from-internal" if field == "extension" else \
        f"Local/{{{field}}}@agi-bitrix-callback-agents"
    if not _CHANNEL_TEMPLATE.fullmatch(value) or f"{{{field}}}" not in value:
        raise ValueError(f"{quoted(value)} must be a channel like {example}, with {{{field}}} in it")
    rest = value.replace(f"{{{field}}}", "")
    if rest.count("{") or rest.count("}"):
        raise ValueError(f"{quoted(value)}: {{{field}}} is the only field a channel may hold")
    return value


def context_name(value: str) -> str:
    if not _CONTEXT.fullmatch(value):
        raise ValueError(f"{quoted(value)} is not a dialplan context name (letters, digits, _ and -)")
    return value


def _region_code(value: Any) -> str:
    country = str(value).strip().upper()
    if country not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"{quoted(value)} is not a region code like RU, KZ, BY")
    return country


def _number_type(value: Any) -> str:
    name = str(value).strip().upper()
    if name not in NUMBER_TYPES:
        raise ValueError(f"{quoted(value)} is not one of: {', '.join(NUMBER_TYPES)}")
    return name


@dataclass(frozen=True)
class ClickToCallSettings:
    """The `clicktocall:` section; click-to-call is on when the section is there."""

    enabled: bool = True
    # The agent's phone, rung first: {extension} is the user's UF_PHONE_INNER.
    channel: str = text("channel", "PJSIP/{extension}", check=channel_template, restart=True)
    # Where the agent's channel goes once answered, with the client's number as the extension.
    context: str = text("context", "agi-bitrix-click-to-call", check=context_name, restart=True)
    # Seconds the agent's phone rings before the click ends as "agent did not answer".
    ring: float = number("ring", 30.0, 0, 300, restart=True)
    # A global rate of clicks this server acts on (a token bucket); one click per user at a time.
    rate_per_second: float = number("rate.per_second", 2.0, 0, 1000, unit="clicks per second", restart=True)
    rate_burst: int = integer("rate.burst", 10, 1, 10_000, restart=True)
    # The dial policy: the countries (default: phones.default_country) and libphonenumber's types.
    countries: tuple[str, ...] = items("dial_policy.countries", (), check=_region_code, restart=True)
    number_types: tuple[str, ...] = items("dial_policy.number_types", DEFAULT_NUMBER_TYPES, check=_number_type,
                                          restart=True)
    # Show the CRM object's name on the agent's phone (a lookup, within bitrix.deadline).
    show_name: bool = flag("show_name", True, restart=True)


@dataclass(frozen=True)
class DialPolicy:
    countries: frozenset[str]
    number_types: frozenset[str]
    default_country: str  # how a number without a country code is read


def dial_policy(settings: ClickToCallSettings, default_country: str) -> DialPolicy:
    return DialPolicy(countries=frozenset(settings.countries or (default_country,)),
                      number_types=frozenset(settings.number_types), default_country=default_country)


def describe(policy: DialPolicy) -> str:
    """What the policy lets a click dial, for `agi-bitrix check`."""
    kinds = ", ".join(name for name in NUMBER_TYPES if name in policy.number_types)
    return f"dials valid {kinds} numbers of {', '.join(sorted(policy.countries))}; never emergency numbers"


@dataclass(frozen=True)
class Destination:
    number: str  # E.164 digits, no "+": what the PBX is given as the extension to dial


@dataclass(frozen=True)
class Refusal:
    reason: str  # a token for logs and metrics: not_a_number, emergency, invalid, country, number_type
    status: str  # STATUS_CODE for telephony.externalcall.finish
    detail: str  # for the log and FAILED_REASON


def dial_destination(raw: str, policy: DialPolicy) -> Destination | Refusal:
    """The number to dial for `raw` (as the CRM holds it), or why the policy refuses it."""
    digits = normalize_number(raw, policy.default_country)
    if digits is None:
        return Refusal("not_a_number", INVALID_NUMBER, "not a phone number")
    if any(shortnumberinfo.connects_to_emergency_number(digits, country)
           for country in policy.countries | {policy.default_country}):
        return Refusal("emergency", FORBIDDEN, "an emergency number is never dialled")
    try:
        parsed = phonenumbers.parse("+" + digits)
    except phonenumbers.NumberParseException:
        return Refusal("invalid", INVALID_NUMBER, "not a valid phone number")
    if not phonenumbers.is_valid_number(parsed):
        return Refusal("invalid", INVALID_NUMBER, "not a valid phone number (a short or service number?)")
    country = phonenumbers.region_code_for_number(parsed) or "?"
    if country not in policy.countries:
        return Refusal("country", DIRECTION_UNAVAILABLE, f"a number of {country}, not of "
                       f"{', '.join(sorted(policy.countries))} (clicktocall.dial_policy.countries)")
    kind = _TYPE_NAMES.get(phonenumbers.number_type(parsed), "UNKNOWN")
    if kind not in policy.number_types:
        return Refusal("number_type", FORBIDDEN, f"a {kind} number, not one of "
                       f"{', '.join(sorted(policy.number_types))} (clicktocall.dial_policy.number_types)")
    return Destination(digits)
