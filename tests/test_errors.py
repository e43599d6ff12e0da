"""The portal's answers sorted into the exception tree: what code decides on is the class."""

import pytest

from agi_bitrix.bitrix import errors
from agi_bitrix.bitrix.errors import (
    AuthRejected,
    BadResponse,
    BitrixError,
    CallNotFound,
    LocalFault,
    NotPermitted,
    OperatingTimeExceeded,
    PaymentRequired,
    PortalError,
    PortalMisconfigured,
    PortalRefused,
    PortalTimeout,
    PortalUnavailable,
    PortalUnreachable,
    RateLimited,
    RequestNotSent,
    RequestRejected,
    TokenExpired,
    TokenFileError,
    WrongAuthType,
    refusal,
)
from agi_bitrix.callcard.finish import finish_outcome


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


@pytest.mark.parametrize("error, retry_later", [
    (PortalTimeout("timeout", ""), True),
    (PortalUnreachable("connect", ""), True),
    (BadResponse("bad_json", ""), True),
    (refusal("QUERY_LIMIT_EXCEEDED", ""), True),
    (refusal("OPERATION_TIME_LIMIT", ""), True),
    (refusal("NO_AUTH_FOUND", ""), True),  # an admin fixes the credentials; the queue waits
    (refusal("WRONG_AUTH_TYPE", ""), True),
    (refusal("PAYMENT_REQUIRED", ""), True),
    (refusal("ACCESS_DENIED", ""), True),
    (refusal("http_503", ""), True),
    (RequestNotSent("circuit_open", ""), True),
    (LocalFault("bad_url", ""), True),
    (TokenFileError("cannot read"), True),
    (refusal("ERROR_CORE", ""), False),  # this request's parameters: retrying cannot help
    (refusal("SOME_NEW_CODE", ""), False),
    (refusal("portal_error", "HTTP 200, error '': Call is not found"), False),
])
def test_retry_later_is_a_property_of_the_class(error, retry_later):
    assert error.retry_later is retry_later


def test_what_finishes_and_recordings_retry_later_is_decided_by_these_branches_of_the_tree():
    # Finishes and recordings both ask error.retry_later; this pins which branches of the tree say yes.
    retried = (errors.PortalTimeout, errors.PortalUnreachable, errors.BadResponse, errors.RateLimited,
               errors.AuthRejected, errors.PortalUnavailable, errors.PortalMisconfigured, errors.RequestNotSent,
               errors.TokenFileError, errors.LocalFault)
    classes = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, BitrixError)]
    assert {kind for kind in classes if kind.retry_later} == {kind for kind in classes if issubclass(kind, retried)}


@pytest.mark.parametrize("reason, detail, kind", [
    # The portal names the call it does not have in words, with an empty code (bitrix24-rest-notes.md).
    ("portal_error", "HTTP 200, error '': Call is not found in the statistic table.", CallNotFound),
    ("ERROR_CORE", "HTTP 400, error 'ERROR_CORE': call is not found", CallNotFound),
    ("QUERY_LIMIT_EXCEEDED", "HTTP 503: Call is not found", RateLimited),  # the code decides first
    ("portal_error", "HTTP 200, error '': something else", PortalRefused),
])
def test_a_call_the_portal_does_not_have_is_a_class(reason, detail, kind):
    assert type(refusal(reason, detail)) is kind


def test_a_finish_refused_as_call_not_found_after_a_lost_answer_was_delivered():
    not_found = refusal("portal_error", "HTTP 200, error '': Call is not found")
    assert finish_outcome(not_found, attempt=2).kind == "delivered"
    assert finish_outcome(not_found, attempt=1).kind == "failed"  # never finished: nothing went before
    assert finish_outcome(refusal("ERROR_CORE", "bad USER_ID"), attempt=2).kind == "failed"
    assert finish_outcome(PortalTimeout("timeout", "no answer"), attempt=5).kind == "retry"
