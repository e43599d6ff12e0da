"""Why a Bitrix24 request gave no usable answer, as a tree of exceptions.

Modelled on aiohttp's client exceptions and h11's split of blame: a `PortalError` says the portal
(or its OAuth server, or what stands in front of them) misbehaved or refused; `RequestNotSent`
says we chose not to ask; `TokenFileError` is a fault on this machine. Code that must decide
"retry?", "slow down?", "credentials?" asks `isinstance` against these classes; nowhere else
keeps lists of reason strings.

Every error carries `reason`, short and machine-readable, which becomes `B24_ERROR` and a metric
label, and `detail`, for humans and logs, which never holds a secret.

What each refusal asks of us (the REST docs' _includes/system-errors.md and
settings/oauth/error-codes.md); a queued request asks `retry_later`, which each class declares:
- retry later: RateLimited, PortalUnavailable (and the timeouts and broken connections);
- refresh: TokenExpired (a new access token may well be let in; the client refreshes once);
- an admin must act: the other AuthRejected (a webhook code or token the portal does not know,
  a missing scope, an application's payment, a method only an application may call) and
  PortalMisconfigured (REST off for the whole portal). Until then every request fails alike,
  so nothing queued is given up over it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar


class BitrixError(Exception):
    """A Bitrix24 request that gave no usable answer."""

    # Retry later? True when the failure says nothing about the request itself (the portal or the
    # way to it is down or busy, it does not let us in right now, we did not ask): a queued request
    # (a finish, a recording) is kept and tried again, since an admin fixes credentials, scopes,
    # payment, plan, URL or token file without touching the queue. False: this request is refused.
    retry_later: ClassVar[bool] = False

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class PortalError(BitrixError):
    """The portal, its OAuth server, or a proxy in front of them did not answer usefully."""


class PortalTimeout(PortalError):
    """No answer within the deadline (reason "timeout", "oauth_timeout")."""

    retry_later = True


class PortalUnreachable(PortalError):
    """No connection, or it broke: refused, reset, DNS, TLS (reason "connect", "oauth_connect")."""

    retry_later = True


class BadResponse(PortalError):
    """An answer that is not the portal's: not HTTP, not JSON, not the method's shape, too large."""

    retry_later = True


class PortalRefused(PortalError):
    """The portal answered with an error: its own code (QUERY_LIMIT_EXCEEDED, ...), or `http_NNN`
    for an error status without one, or `portal_error` for an error body without a code."""


class RateLimited(PortalRefused):
    """Too many requests (QUERY_LIMIT_EXCEEDED, OVERLOAD_LIMIT, HTTP 429): every request of ours holds back."""

    retry_later = True


class OperatingTimeExceeded(RateLimited):
    """OPERATION_TIME_LIMIT: this one method used up its execution time in the portal's ten-minute
    window (limits.md in bitrix24/b24restdocs); only that method holds back, until the portal's
    `operating_reset_at`. Other methods go on."""


class AuthRejected(PortalRefused):
    """The webhook, token or application is not (or no longer) let in, or lacks the scope."""

    retry_later = True


class TokenExpired(AuthRejected):
    """The access token expired or was revoked; a fresh one may well be let in."""


class TokensRevoked(AuthRejected):
    """The OAuth token server refused what the token file holds (its refresh token, or the
    application itself): asking again with the same file cannot help, so the token server is not
    asked again until the file changes or the config is reloaded (settings/oauth/error-codes.md)."""

    REASON: ClassVar[str] = "tokens_revoked"

    def __init__(self, detail: str) -> None:
        super().__init__(self.REASON, detail)


class RefreshTokenRejected(TokensRevoked):
    """invalid_grant and the like for a refresh token: expired (180 days unused), spent, or the
    application removed or reinstalled."""

    REASON = "refresh_token_rejected"


class OAuthClientRejected(TokensRevoked):
    """invalid_client and the like: a wrong client_id/client_secret, or the application is no
    longer installed."""

    REASON = "oauth_client_rejected"


class OAuthCodeRejected(AuthRejected):
    """An authorization code refused (`oauth login`): it works once and for 30 seconds."""

    def __init__(self, detail: str) -> None:
        super().__init__("oauth_code_rejected", detail)


class NotPermitted(AuthRejected):
    """Let in, but not to this method: a missing scope, a user without the right, a method that
    needs an application's context."""


class WrongAuthType(NotPermitted):
    """The method needs an application's context and was called through a webhook: Bitrix24's
    REST docs (api-reference/telephony/index.md) say so of telephony.externalcall.register and
    .finish. Only switching to an OAuth application (bitrix.oauth) fixes it."""

    ADVICE = ("the portal answered WRONG_AUTH_TYPE: Bitrix24 documents telephony.externalcall.register and"
              " .finish as working only in the context of an application, not through an inbound webhook."
              " Switch bitrix.webhook_url to a local application in bitrix.oauth and run `agi-bitrix oauth"
              " login`: docs/call-card.md, section \"OAuth applications\"")


class PaymentRequired(AuthRejected):
    """The application's trial or paid period is over (settings/oauth/error-codes.md,
    PAYMENT_REQUIRED): no tokens, and no REST calls, until an admin renews it."""


class PortalMisconfigured(PortalRefused):
    """The portal refuses REST as a whole, whatever is asked: ACCESS_DENIED (403, "REST API is
    available only on commercial plans"; the same code also answers a user without access to a
    method) or INVALID_REQUEST (400, "Https required": the portal URL says http://). Every request
    fails the same way until an admin changes the plan or the URL, so it opens the circuit breaker
    and /healthz names it; it is not one request's parameters."""

    retry_later = True

    ADVICE: ClassVar[Mapping[str, str]] = {
        "ACCESS_DENIED": "Bitrix24 offers the REST API only on commercial plans (or the webhook's user has no access):"
                         " check the portal's plan and the user behind the webhook or application",
        "INVALID_REQUEST": "the portal requires HTTPS for REST: write the portal URL with https://",
    }

    @property
    def advice(self) -> str:
        return self.ADVICE.get(self.reason, "")


class RequestRejected(PortalRefused):
    """This one request's parameters were refused (HTTP 400); the portal itself is fine."""


class BodyTooLarge(RequestRejected):
    """HTTP 413: the body was more than the portal (its nginx, by client_max_body_size) takes.
    The same body is refused every time; a smaller one may pass."""


class CallNotFound(RequestRejected):
    """The portal has no open call by this CALL_ID (any more): "Call is not found ..." with an empty
    error code (bitrix24-rest-notes.md), answered to finish and attachRecord. After an attempt whose
    answer was lost, it means that attempt finished the call."""


class PortalUnavailable(PortalRefused):
    """The portal's side is broken right now (HTTP 5xx, INTERNAL_SERVER_ERROR, PORTAL_DELETED)."""

    retry_later = True


class RequestNotSent(BitrixError):
    """We did not ask the portal: the circuit is open ("circuit_open"), no request slot within the
    deadline ("rate_limited"), the method's execution time is held back to stay inside the portal's
    operating-time budget ("operating_limit"), the server is stopping ("cancelled"), or the OAuth token server
    rejected the application's tokens earlier and is not asked again until they change
    ("refresh_token_rejected", "oauth_client_rejected")."""

    retry_later = True


class LocalFault(BitrixError):
    """This machine could not make the request at all: a portal URL the HTTP library cannot encode
    ("bad_url", "oauth_bad_url"), the HTTP session already closed ("session_closed"), or a bug on
    the lookup path ("internal"). Not the portal's fault, but calls cannot be routed by the CRM
    while it lasts, so it counts as the portal failing."""

    retry_later = True


class TokenFileError(BitrixError):
    """The OAuth token file on this machine cannot be read or holds no refresh token."""

    retry_later = True

    def __init__(self, detail: str) -> None:
        super().__init__("oauth_token_file", detail)


# The portal's own codes, by what they mean for us (bitrix24-rest-notes.md, the REST docs'
# error tables). A code not listed is a plain PortalRefused.
_REFUSALS: dict[str, type[PortalRefused]] = {
    **dict.fromkeys(("QUERY_LIMIT_EXCEEDED", "OVERLOAD_LIMIT"), RateLimited),
    "OPERATION_TIME_LIMIT": OperatingTimeExceeded,
    **dict.fromkeys(("expired_token", "invalid_token"), TokenExpired),
    # NO_AUTH_FOUND: a webhook code or access token the portal does not know. Not refreshed on:
    # only expired_token says a new token would do (settings/oauth/auto-renewal.md).
    **dict.fromkeys(("NO_AUTH_FOUND", "INVALID_CREDENTIALS"), AuthRejected),
    # invalid_scope: the token server's word for a scope missing from the application's card.
    **dict.fromkeys(("insufficient_scope", "invalid_scope", "user_access_error"), NotPermitted),
    "PAYMENT_REQUIRED": PaymentRequired,
    "WRONG_AUTH_TYPE": WrongAuthType,
    **dict.fromkeys(("ACCESS_DENIED", "INVALID_REQUEST"), PortalMisconfigured),
    **dict.fromkeys(("ERROR_CORE", "ERROR_ARGUMENT", "INVALID_ARGUMENT"), RequestRejected),
    **dict.fromkeys(("INTERNAL_SERVER_ERROR", "PORTAL_DELETED"), PortalUnavailable),
}
_SERVER_ERROR = re.compile(r"http_5[0-9][0-9]")
# The portal names a call it does not have in words only (its error code is empty or generic).
_CALL_NOT_FOUND = re.compile(r"call is not found", re.IGNORECASE)

# What a portal's error code must look like to be passed on as a reason (B24_ERROR, logs): an
# identifier, ASCII, at most 64 characters. Anything else (a sentence, a newline, Cyrillic,
# full-width digits) is replaced by a reason of ours.
PORTAL_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")

# The reasons a metric label may take: ours, the portal codes named above, the HTTP statuses a
# portal or its proxy commonly send. Any other code still reaches B24_ERROR and the log, but is
# counted as `http_4xx`-style buckets or `other`: a portal (or a proxy) inventing codes must not
# create a time series per code.
_OUR_REASONS = frozenset({
    "timeout", "connect", "bad_http", "bad_json", "bad_result", "too_large", "portal_error",
    "circuit_open", "rate_limited", "operating_limit", "cancelled", "internal", "bad_url", "session_closed",
    "oauth_timeout", "oauth_connect", "oauth_bad_answer", "oauth_bad_url", "oauth_token_file",
    "refresh_token_rejected", "oauth_client_rejected",
})
_KNOWN_STATUSES = frozenset({400, 401, 403, 404, 405, 429, 500, 502, 503, 504})
_HTTP_STATUS = re.compile(r"http_([1-9])([0-9][0-9])")
METRIC_REASONS = _OUR_REASONS | frozenset(_REFUSALS) | {f"http_{status}" for status in _KNOWN_STATUSES} | {
    f"http_{digit}xx" for digit in range(1, 10)} | {"other"}


def metric_reason(reason: str) -> str:
    """`reason` as a metric label, from the bounded set METRIC_REASONS."""
    if reason in METRIC_REASONS:
        return reason
    status = _HTTP_STATUS.fullmatch(reason)
    return f"http_{status[1]}xx" if status else "other"


def refusal_class(code: str) -> type[PortalRefused]:
    """What a portal's (or its token server's) error code means for us, by its code or `http_NNN`."""
    kind = _REFUSALS.get(code)
    if kind is not None:
        return kind
    if code == "http_429":
        return RateLimited
    if code == "http_413":
        return BodyTooLarge
    if _SERVER_ERROR.fullmatch(code):
        return PortalUnavailable
    return PortalRefused


def refusal(reason: str, detail: str) -> PortalRefused:
    """The error for a portal answer that refused, by its code (or `http_NNN`), or by its words
    where the portal gives no code of its own (a call it does not have)."""
    kind = refusal_class(reason)
    if kind in (PortalRefused, RequestRejected) and _CALL_NOT_FOUND.search(detail):
        return CallNotFound(reason, detail)
    return kind(reason, detail)
