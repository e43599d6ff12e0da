"""Why a Bitrix24 request gave no usable answer, as a tree of exceptions.

Modelled on aiohttp's client exceptions and h11's split of blame: a `PortalError` says the portal
(or its OAuth server, or what stands in front of them) misbehaved or refused; `RequestNotSent`
says we chose not to ask; `TokenFileError` is a fault on this machine. Code that must decide
"retry?", "slow down?", "credentials?" asks `isinstance` against these classes; nowhere else
keeps lists of reason strings.

Every error carries `reason`, short and machine-readable, which becomes `B24_ERROR` and a metric
label, and `detail`, for humans and logs, which never holds a secret.
"""

from __future__ import annotations

import re


class BitrixError(Exception):
    """A Bitrix24 request that gave no usable answer."""

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


class PortalUnreachable(PortalError):
    """No connection, or it broke: refused, reset, DNS, TLS (reason "connect", "oauth_connect")."""


class BadResponse(PortalError):
    """An answer that is not the portal's: not HTTP, not JSON, not the method's shape, too large."""


class PortalRefused(PortalError):
    """The portal answered with an error: its own code (QUERY_LIMIT_EXCEEDED, ...), or `http_NNN`
    for an error status without one, or `portal_error` for an error body without a code."""


class RateLimited(PortalRefused):
    """Too many requests or too much execution time: every request of ours holds back."""


class AuthRejected(PortalRefused):
    """The webhook, token or application is not (or no longer) let in, or lacks the scope."""


class TokenExpired(AuthRejected):
    """The access token expired or was revoked; a fresh one may well be let in."""


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


class RequestRejected(PortalRefused):
    """This one request's parameters were refused (HTTP 400); the portal itself is fine."""


class PortalUnavailable(PortalRefused):
    """The portal's side is broken right now (HTTP 5xx, INTERNAL_SERVER_ERROR, PORTAL_DELETED)."""


class RequestNotSent(BitrixError):
    """We did not ask the portal: the circuit is open ("circuit_open"), no request slot within the
    deadline ("rate_limited"), the server is stopping ("cancelled"), or the OAuth token server
    rejected the application's tokens earlier and is not asked again until they change
    ("refresh_token_rejected", "oauth_client_rejected")."""


class TokenFileError(BitrixError):
    """The OAuth token file on this machine cannot be read or holds no refresh token."""

    def __init__(self, detail: str) -> None:
        super().__init__("oauth_token_file", detail)


# The portal's own codes, by what they mean for us (bitrix24-rest-notes.md, the REST docs'
# error tables). A code not listed is a plain PortalRefused.
_REFUSALS: dict[str, type[PortalRefused]] = {
    **dict.fromkeys(("QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "OVERLOAD_LIMIT"), RateLimited),
    **dict.fromkeys(("expired_token", "invalid_token"), TokenExpired),
    **dict.fromkeys(("NO_AUTH_FOUND", "INVALID_CREDENTIALS"), AuthRejected),
    **dict.fromkeys(("insufficient_scope", "ACCESS_DENIED", "user_access_error"), NotPermitted),
    "WRONG_AUTH_TYPE": WrongAuthType,
    **dict.fromkeys(("ERROR_CORE", "ERROR_ARGUMENT", "INVALID_REQUEST"), RequestRejected),
    **dict.fromkeys(("INTERNAL_SERVER_ERROR", "PORTAL_DELETED"), PortalUnavailable),
}
_SERVER_ERROR = re.compile(r"http_5[0-9][0-9]")


def refusal(reason: str, detail: str) -> PortalRefused:
    """The error for a portal answer that refused, by its code (or `http_NNN`)."""
    kind = _REFUSALS.get(reason)
    if kind is None:
        if reason == "http_429":
            kind = RateLimited
        elif _SERVER_ERROR.fullmatch(reason):
            kind = PortalUnavailable
        else:
            kind = PortalRefused
    return kind(reason, detail)
