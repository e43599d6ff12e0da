"""The portal's answers sorted into the exception tree: what code decides on is the class."""

import pytest

from agi_bitrix.bitrix.errors import (
    AuthRejected,
    BitrixError,
    NotPermitted,
    OperatingTimeExceeded,
    PaymentRequired,
    PortalError,
    PortalMisconfigured,
    PortalRefused,
    PortalUnavailable,
    RateLimited,
    RequestNotSent,
    RequestRejected,
    TokenExpired,
    TokenFileError,
    WrongAuthType,
    refusal,
)


@pytest.mark.parametrize("reason, kind", [
    ("QUERY_LIMIT_EXCEEDED", RateLimited),
    ("OPERATION_TIME_LIMIT", OperatingTimeExceeded),
    ("OVERLOAD_LIMIT", RateLimited),
    ("http_429", RateLimited),
    ("expired_token", TokenExpired),
    ("invalid_token", TokenExpired),
    ("NO_AUTH_FOUND", AuthRejected),
    ("INVALID_CREDENTIALS", AuthRejected),
    ("insufficient_scope", NotPermitted),
    ("invalid_scope", NotPermitted),  # the token server's word for a scope missing from the app's card
    ("user_access_error", NotPermitted),
    ("PAYMENT_REQUIRED", PaymentRequired),
    ("WRONG_AUTH_TYPE", WrongAuthType),  # a NotPermitted with its own advice: switch to an application
    # REST refused for the whole portal (_includes/system-errors.md): no plan for it, or no HTTPS.
    ("ACCESS_DENIED", PortalMisconfigured),
    ("INVALID_REQUEST", PortalMisconfigured),
    ("ERROR_CORE", RequestRejected),
    ("ERROR_ARGUMENT", RequestRejected),
    ("INVALID_ARGUMENT", RequestRejected),
    ("INTERNAL_SERVER_ERROR", PortalUnavailable),
    ("PORTAL_DELETED", PortalUnavailable),
    ("http_502", PortalUnavailable),
    ("http_500", PortalUnavailable),
])
def test_a_code_is_sorted_by_what_it_means(reason, kind):
    error = refusal(reason, "detail")
    assert type(error) is kind and error.reason == reason and error.detail == "detail"


def test_wrong_auth_type_is_still_not_permitted():
    assert issubclass(WrongAuthType, NotPermitted)


@pytest.mark.parametrize("reason", ["ERROR_METHOD_NOT_FOUND", "portal_error", "http_404", "http_400", "http_5000"])
def test_a_code_without_a_meaning_for_us_is_a_plain_refusal(reason):
    assert type(refusal(reason, "")) is PortalRefused


def test_what_is_not_the_portals_fault_is_no_portal_error():
    # A token file on this machine, or a request we chose not to send, says nothing about the portal.
    assert not isinstance(TokenFileError("cannot read"), PortalError)
    assert not isinstance(RequestNotSent("rate_limited", ""), PortalError)
    assert TokenFileError("cannot read").reason == "oauth_token_file"
    # Yet every one of them carries a reason for B24_ERROR.
    assert all(isinstance(error, BitrixError) for error in (
        TokenFileError(""), RequestNotSent("circuit_open", ""), refusal("ERROR_CORE", "")))
    assert str(RequestNotSent("circuit_open", "not asked")) == "circuit_open: not asked"


def test_each_refusal_says_who_must_act():
    # Retry later, refresh, or an admin must act: the classes finish and the lookup decide on.
    assert issubclass(PaymentRequired, AuthRejected) and not issubclass(PaymentRequired, TokenExpired)
    assert issubclass(TokenExpired, AuthRejected)
    assert not issubclass(PortalMisconfigured, (RequestRejected, AuthRejected, RateLimited))
    assert "commercial plans" in refusal("ACCESS_DENIED", "").advice
    assert "https://" in refusal("INVALID_REQUEST", "").advice
