"""The portal client: one POST per method call, each in the request budget, every failure a BitrixError.

A caller is waiting while this runs, so each request carries one explicit deadline covering
connection, pool wait and body, and every way the portal (or what stands in front of it) can
fail maps to a short machine-readable reason the routing layer can act on and log. The webhook
code in the URL is a password: it never appears in an error, a detail or a chained traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlencode

import aiohttp

from agi_bitrix import __version__
from agi_bitrix.bitrix.errors import (
    PORTAL_CODE,
    BadResponse,
    BitrixError,
    LocalFault,
    PortalError,
    PortalTimeout,
    PortalUnreachable,
    RateLimited,
    RequestNotSent,
    TokenExpired,
    refusal,
)
from agi_bitrix.bitrix.models import CrmEntity, MalformedAnswer, parse_search_result
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.bitrix.settings import portal_base

log = logging.getLogger("agi_bitrix.portal")

SEARCH_CRM_ENTITIES = "telephony.externalCall.searchCrmEntities"

# A searchCrmEntities answer is at most 150 objects of a few hundred bytes; anything near this
# size is not a portal answer, and reading it whole would let a proxy exhaust our memory.
MAX_BODY_BYTES = 4 * 1024 * 1024

# Idle pooled connections are dropped before common front ends (nginx: 60-75 s) close them, so a
# request rarely lands on a socket the server is closing at that very moment.
KEEPALIVE_SECONDS = 10.0

# Stops at whitespace and quotes too, so it can also clean URLs quoted inside free text.
_WEBHOOK_CODE_IN_URL = re.compile(r"(/rest/[^/?#\s\"'<>]+/)[^/?#\s\"'<>]+")
_SECRET_QUERY_PARAM = re.compile(
    r"([?&](?:auth|access_token|refresh_token|client_secret)=)[^&#\s\"'<>]*", re.IGNORECASE
)
_URL_PASSWORD = re.compile(r"(//[^/@:\s]*:)[^/@\s]*@")
_DETAIL_EXCERPT = 160
_Error = TypeVar("_Error", bound=BitrixError)
_FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}
_JSON_HEADERS = {"Content-Type": "application/json"}


def redact(url: str) -> str:
    """Hide the secrets a portal URL can carry: the webhook code, auth tokens, a URL password.

    "https://x.bitrix24.ru/rest/1/abc123/" -> "https://x.bitrix24.ru/rest/1/***/"
    """
    url = _WEBHOOK_CODE_IN_URL.sub(r"\1***", url)
    url = _SECRET_QUERY_PARAM.sub(r"\1***", url)
    return _URL_PASSWORD.sub(r"\1***@", url)


def make_session(*, pool_size: int = 20) -> aiohttp.ClientSession:
    """The one HTTP session of the process: a bounded keep-alive pool. Call it inside the loop."""
    connector = aiohttp.TCPConnector(limit=pool_size, keepalive_timeout=KEEPALIVE_SECONDS)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": f"agi-bitrix/{__version__}"},
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class AccessTokens(Protocol):
    """What an OAuth application gives the client (agi_bitrix.bitrix.oauth.OAuthTokens)."""

    async def access_token(self) -> str: ...

    async def refresh(self, rejected: str) -> str: ...

    def secrets(self) -> tuple[str, ...]: ...

    def rest_base(self) -> str:
        """https://PORTAL/rest/: the client_endpoint the token server named, or the configured URL."""
        ...


class RequestSlot:
    """A place in the portal's request budget, taken and not yet spent (see PortalClient.take_slot)."""

    __slots__ = ()


_SLOT = RequestSlot()


class PortalClient:
    def __init__(self, webhook_url: str, session: aiohttp.ClientSession, *, timeout: float,
                 budget: RateLimiter, auth: AccessTokens | None = None) -> None:
        """`webhook_url` is the inbound webhook, https://PORTAL/rest/USER_ID/CODE/ (slash optional);
        with `auth` (an OAuth application) it is the portal's REST URL, https://PORTAL/rest/.
        `timeout` bounds each whole request in seconds. `budget` is our copy of the portal's
        request bucket: every request this client sends, whatever it is for, takes a slot in it."""
        try:
            base, code = portal_base(webhook_url, oauth=auth is not None)
        except ValueError as error:  # the same check as the config's: its message never quotes the URL
            raise ValueError(f"{'portal' if auth is not None else 'webhook'} URL: {error}") from None
        # Checked at run time too: the value comes from YAML or a test, not from a type checker.
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):  # type: ignore[redundant-expr]
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.auth = auth
        self.budget = budget
        self._base = base
        self._code = code
        self._session = session
        self._timeout_seconds = float(timeout)
        self._timeout = aiohttp.ClientTimeout(total=self._timeout_seconds)

    @property
    def redacted_url(self) -> str:
        return redact(self._base)

    async def take_slot(self, max_wait: float) -> RequestSlot:
        """Wait for a place in the request budget; RequestNotSent("rate_limited") at once when that
        would take longer than `max_wait` seconds, so a caller never waits in vain."""
        wait = self.budget.reserve(max_wait=max_wait)
        if wait is None:
            raise RequestNotSent("rate_limited", f"no request slot within {max_wait:g} s (client-side rate limit)")
        if wait:
            await asyncio.sleep(wait)
        return _SLOT

    async def call(self, method: str, params: Mapping[str, Any], *, json_body: bool = False,
                   slot: RequestSlot | None = None, max_wait: float = 0.0, timeout: float | None = None) -> Any:
        """POST `params` to METHOD.json and return the answer's `result`.

        The request spends `slot`, or takes one, waiting at most `max_wait` seconds for it.
        `timeout` replaces the client's per-request timeout for this call (a recording's upload).
        The body is a PHP-style form (booleans as 1/0, None as "", nested keys as KEY[SUB]) unless
        `json_body`: the portal reads both, and JSON costs a fraction of the form encoding on the
        lookup path, whose parameters are plain strings that mean the same in either."""
        if slot is None:
            await self.take_slot(max_wait)
        try:
            result = await self._call(method, params, json_body, timeout)
        except RateLimited as error:
            pause = self.budget.back_off()
            log.warning("portal says %s; no requests for %.0f s", error.reason, pause)
            raise
        self.budget.succeeded()
        return result

    async def _call(self, method: str, params: Mapping[str, Any], json_body: bool, timeout: float | None) -> Any:
        if self.auth is None:
            status, body = await self._post(method, params, json_body, timeout)
            return self._result(method, status, body)
        token = await self.auth.access_token()
        try:
            status, body = await self._post(method, {**params, "auth": token}, json_body, timeout)
            return self._result(method, status, body)
        except TokenExpired:
            pass
        # The token expired before we knew: one refresh (shared with concurrent callers), one retry,
        # which the portal counts as a request of its own.
        token = await self.auth.refresh(rejected=token)
        await self.take_slot(max_wait=0.0)
        status, body = await self._post(method, {**params, "auth": token}, json_body, timeout)
        return self._result(method, status, body)

    async def search_crm_entities_batch(self, phones: list[str],
                                        slot: RequestSlot | None = None) -> dict[str, list[CrmEntity] | PortalError]:
        """Several numbers in one `batch` request (at most 50): one HTTP round trip and one
        request of the portal's rate budget. A BitrixError is raised when the batch itself
        fails; a number the portal refused gets its own PortalError in the answer."""
        keys = {f"n{index}": phone for index, phone in enumerate(phones)}  # "n": PHP keeps string keys
        commands = {key: f"{SEARCH_CRM_ENTITIES}?PHONE_NUMBER={quote(phone, safe='')}" for key, phone in keys.items()}
        answer = await self.call("batch", {"halt": 0, "cmd": commands}, json_body=True, slot=slot)
        results = answer.get("result") if isinstance(answer, dict) else None
        errors = answer.get("result_error") if isinstance(answer, dict) else None
        results, errors = (value if value not in ([], None) else {} for value in (results, errors))
        if not isinstance(results, dict) or not isinstance(errors, dict):
            raise self._error(BadResponse, "bad_result", "batch", "the answer has no result/result_error objects")
        outcome: dict[str, list[CrmEntity] | PortalError] = {}
        for key, phone in keys.items():
            if key in errors:
                error = errors[key] if isinstance(errors[key], dict) else {}
                code = error.get("error")
                reason = code if isinstance(code, str) and PORTAL_CODE.fullmatch(code) else "portal_error"
                outcome[phone] = self._error(refusal, reason, SEARCH_CRM_ENTITIES,
                                             f"in a batch: {self._clean(str(error.get('error_description')))}")
            elif key in results:
                try:
                    outcome[phone] = parse_search_result(results[key])
                except MalformedAnswer as error:
                    outcome[phone] = self._error(BadResponse, "bad_result", SEARCH_CRM_ENTITIES,
                                                 f"in a batch: {error}")
            else:
                outcome[phone] = self._error(BadResponse, "bad_result", SEARCH_CRM_ENTITIES,
                                             "the batch answer skipped this number")
        return outcome

    async def search_crm_entities(self, phone: str, slot: RequestSlot | None = None) -> list[CrmEntity]:
        """The CRM objects carrying `phone`, best first. `phone` is sent exactly as given."""
        return self.parse_search(await self.search_crm_entities_raw(phone, slot))

    async def search_crm_entities_raw(self, phone: str, slot: RequestSlot | None = None) -> Any:
        """searchCrmEntities' `result` as the portal sent it (for `agi-bitrix route --record`)."""
        return await self.call(SEARCH_CRM_ENTITIES, {"PHONE_NUMBER": phone}, json_body=True, slot=slot)

    def parse_search(self, result: Any) -> list[CrmEntity]:
        try:
            return parse_search_result(result)
        except MalformedAnswer as error:
            raise self._error(BadResponse, "bad_result", SEARCH_CRM_ENTITIES, str(error)) from None

    async def _post(self, method: str, params: Mapping[str, Any], json_body: bool,
                    timeout: float | None = None) -> tuple[int, bytes]:
        seconds = self._timeout_seconds if timeout is None else timeout
        # Chained exceptions are dropped (`from None`): aiohttp's messages can quote the full URL.
        try:
            base = self._base if self.auth is None else self.auth.rest_base()
            async with self._session.post(
                f"{base}{method}.json",
                # Encoded here: aiohttp's generic form handling costs more than the request itself.
                data=json.dumps(params).encode() if json_body else urlencode(list(_form_fields(params))).encode(),
                headers=_JSON_HEADERS if json_body else _FORM_HEADERS,
                timeout=self._timeout if timeout is None else aiohttp.ClientTimeout(total=timeout),
                # A redirect would turn the POST into a GET and lose the parameters.
                allow_redirects=False,
            ) as response:
                return response.status, await self._read_body(method, response)
        except TimeoutError:
            # Before ClientConnectionError: aiohttp's ServerTimeoutError is both.
            raise self._error(PortalTimeout, "timeout", method, f"no answer within {seconds:g} s") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            detail = self._clean(f"{type(error).__name__}: {error}")
            raise self._error(PortalUnreachable, "connect", method, detail) from None
        except aiohttp.ClientResponseError as error:
            # Raised only when the answer is not parseable HTTP (statuses are not raised here).
            detail = self._clean(f"{type(error).__name__}: {error.message}")
            raise self._error(BadResponse, "bad_http", method, detail) from None
        except aiohttp.ClientError as error:
            raise self._error(PortalUnreachable, "connect", method, type(error).__name__) from None
        except ValueError as error:
            # yarl and the idna codec refuse a host they cannot encode ("portal..bitrix24.ru", a
            # label over 63 characters): the request was never built. UnicodeError is a ValueError.
            detail = self._clean(f"the request could not be built: {type(error).__name__}: {error}")
            raise self._error(LocalFault, "bad_url", method, detail) from None
        except RuntimeError:
            if not self._session.closed:
                raise
            raise self._error(LocalFault, "session_closed", method, "the HTTP session is closed") from None

    async def _read_body(self, method: str, response: aiohttp.ClientResponse) -> bytes:
        chunks = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise self._error(
                    BadResponse, "too_large", method, f"HTTP {response.status} body over {MAX_BODY_BYTES} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _result(self, method: str, status: int, body: bytes) -> Any:
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            # ValueError covers bad UTF-8 and oversized integers too; RecursionError deep nesting.
            detail = f"HTTP {status}, not JSON: {self._excerpt(body)}"
            if status == 200:
                raise self._error(BadResponse, "bad_json", method, detail) from None
            raise self._error(refusal, f"http_{status}", method, detail) from None

        if isinstance(answer, dict) and ("error" in answer or "error_description" in answer):
            code = answer.get("error")
            description = answer.get("error_description")
            if isinstance(code, str) and PORTAL_CODE.fullmatch(code):
                reason = code
            else:
                reason = f"http_{status}" if status != 200 else "portal_error"
            detail = f"HTTP {status}, error {self._clean(repr(code))}: {self._clean(str(description))}"
            raise self._error(refusal, reason, method, detail)
        if status != 200:
            detail = f"HTTP {status} without an error code: {self._excerpt(body)}"
            raise self._error(refusal, f"http_{status}", method, detail)
        if not isinstance(answer, dict) or "result" not in answer:
            raise self._error(BadResponse, "bad_result", method, f"HTTP 200 without a result: {self._excerpt(body)}")
        return answer["result"]

    def _error(self, kind: Callable[[str, str], _Error], reason: str, method: str, detail: str) -> _Error:
        # `detail` parts from outside went through _clean; this is a last guard for our own text.
        text = f"{method} at {self.redacted_url}: {detail}"
        return kind(reason, self._hide_secrets(text))

    def _hide_secrets(self, text: str) -> str:
        for secret in (self._code,) if self.auth is None else self.auth.secrets():
            text = text.replace(secret, "***")
        return text

    def _clean(self, text: str) -> str:
        """Text from a peer or a library, fit for one log line and with every secret hidden.

        Secrets are hidden in the whole text before it is cut, so a code straddling the cut
        cannot leak in part; the whole-text steps run at C speed even on a 4 MiB body.
        """
        text = " ".join(self._hide_secrets(redact(text)).split())
        cut = text[:_DETAIL_EXCERPT]
        return "".join(char if char.isprintable() else "?" for char in cut) + ("..." if cut != text else "")

    def _excerpt(self, body: bytes) -> str:
        if not body:
            return "empty body"
        return f"{len(body)} bytes: {self._clean(body.decode('utf-8', errors='replace'))}"


def _form_fields(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Form fields as PHP reads them: nested values as KEY[SUB], booleans as 1/0, None as ""."""
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from _form_fields(value, name)
        elif isinstance(value, (list, tuple)):
            yield from _form_fields({str(index): item for index, item in enumerate(value)}, name)
        elif isinstance(value, bool):
            yield name, "1" if value else "0"
        elif value is None:
            yield name, ""
        else:
            yield name, str(value)
