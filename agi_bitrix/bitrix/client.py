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
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlencode

import aiohttp

from agi_bitrix import __version__
from agi_bitrix.bitrix.errors import (
    PORTAL_CODE,
    BadResponse,
    BitrixError,
    LocalFault,
    OperatingTimeExceeded,
    PortalError,
    PortalTimeout,
    PortalUnreachable,
    RateLimited,
    RequestNotSent,
    TokenExpired,
    refusal,
)
from agi_bitrix.bitrix.models import CrmEntity, MalformedAnswer, parse_search_result
from agi_bitrix.bitrix.operating import OperatingBudget
from agi_bitrix.bitrix.ratelimit import RequestBudget
from agi_bitrix.bitrix.settings import OPERATING_LIMIT, OPERATING_WINDOW, portal_base

log = logging.getLogger("agi_bitrix.portal")

SEARCH_CRM_ENTITIES = "telephony.externalCall.searchCrmEntities"
SEARCH_KEY = SEARCH_CRM_ENTITIES.lower()  # how the operating-time budget names it
BATCH = "batch"
# Requests no caller waits for (app.info: the install callback's check; scope: the user
# directory's): they take a slot only while half the burst stays free for lookups.
_CAN_WAIT = frozenset({"telephony.externalcall.finish", "user.get", "scope", "app.info"})

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


@dataclass(slots=True)
class AnswerTime:
    """The `time` object of an answer (api-reference/data-types.md), filled in by `call`."""

    block: Any = None

    @property
    def processing(self) -> float | None:
        """Seconds the portal worked on the request, if it said."""
        return _processing(self.block)


@dataclass(slots=True)
class SearchAnswer:
    """What one lookup request brought: per number its CRM objects or the portal's refusal, and
    the seconds the portal spent searching it (when the answer says: `time`, or a batch's
    `result_time`)."""

    outcome: dict[str, list[CrmEntity] | PortalError]
    seconds: dict[str, float] = field(default_factory=dict)


class PortalClient:
    def __init__(self, webhook_url: str, session: aiohttp.ClientSession, *, timeout: float,
                 budget: RequestBudget, auth: AccessTokens | None = None,
                 operating: OperatingBudget | None = None) -> None:
        """`webhook_url` is the inbound webhook, https://PORTAL/rest/USER_ID/CODE/ (slash optional);
        with `auth` (an OAuth application) it is the portal's REST URL, https://PORTAL/rest/.
        `timeout` bounds each whole request in seconds. `budget` is our copy of the portal's
        request bucket: every request this client sends, whatever it is for, takes a slot in it.
        `operating` paces each method's execution time in the portal (by default the cloud's)."""
        try:
            base, code = portal_base(webhook_url, oauth=auth is not None)
        except ValueError as error:  # the same check as the config's: its message never quotes the URL
            raise ValueError(f"{'portal' if auth is not None else 'webhook'} URL: {error}") from None
        # Checked at run time too: the value comes from YAML or a test, not from a type checker.
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):  # type: ignore[redundant-expr]
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.auth = auth
        self.budget = budget
        self.operating = operating or OperatingBudget(OPERATING_LIMIT, OPERATING_WINDOW)
        self._base = base
        self._code = code
        self._session = session
        self._timeout_seconds = float(timeout)
        self._timeout = aiohttp.ClientTimeout(total=self._timeout_seconds)

    @property
    def redacted_url(self) -> str:
        return redact(self._base)

    async def take_slot(self, max_wait: float, can_wait: bool = False) -> RequestSlot:
        """Wait for a place in the request budget; RequestNotSent("rate_limited") at once when that
        would take longer than `max_wait` seconds, so a caller never waits in vain. A request that
        `can_wait` (no caller needs it now) only takes a place that leaves half the burst free."""
        wait = await self.budget.take(max_wait, keep_free=self.budget.burst // 2 if can_wait else 0)
        if wait is None:
            raise RequestNotSent("rate_limited", f"no request slot within {max_wait:g} s (client-side rate limit)")
        if wait:
            await asyncio.sleep(wait)
        return _SLOT

    async def call(self, method: str, params: Mapping[str, Any], *, json_body: bool = False,
                   slot: RequestSlot | None = None, max_wait: float = 0.0, timeout: float | None = None,
                   timing: AnswerTime | None = None, large_body: bool = False) -> Any:
        """POST `params` to METHOD.json and return the answer's `result` (and its `time` in `timing`).

        The request spends `slot`, or takes one, waiting at most `max_wait` seconds for it (a
        finish or user.get only one that leaves half the burst to lookups). The method's operating
        time is checked first: RequestNotSent("operating_limit") while the portal blocks it, or,
        without a `slot` (a caller bringing one has sized its request to the method's room), while
        our pace has no room for it. `timeout` replaces the client's per-request timeout for this
        call (a recording's upload); a `large_body` (megabytes of base64) is encoded in a worker
        thread, where it cannot hold the calls being routed on the event loop.

        The body is a PHP-style form (booleans as 1/0, None as "", nested keys as KEY[SUB]) unless
        `json_body`: the portal reads both, and JSON costs a fraction of the form encoding on the
        lookup path, whose parameters are plain strings that mean the same in either."""
        self._check_operating(method, paced=slot is None)
        if slot is None:
            await self.take_slot(max_wait, can_wait=method.lower() in _CAN_WAIT)
        try:
            result = await self._call(method, params, json_body, timing, timeout, large_body)
        except OperatingTimeExceeded as error:
            held = self.operating.blocked(method.lower())
            log.warning("portal says %s for %s; not calling it for %.0f s", error.reason, method, held)
            raise
        except RateLimited as error:
            pause = await self.budget.refused()
            log.warning("portal says %s; no requests for %.0f s", error.reason, pause)
            raise
        self.budget.succeeded()
        return result

    def _check_operating(self, method: str, paced: bool) -> None:
        key = method.lower()
        held = self.operating.held_for(key)
        if held > 0:
            raise RequestNotSent("operating_limit", f"{method}: its operating time is used up at the portal;"
                                                    f" not calling it for {held:.0f} s more")
        if paced and self.operating.room(key) <= 0:
            raise RequestNotSent("operating_limit", f"{method}: its operating time is paced to stay within the"
                                                    " portal's budget; no room now")

    async def _call(self, method: str, params: Mapping[str, Any], json_body: bool,
                    timing: AnswerTime | None = None, timeout: float | None = None,
                    large_body: bool = False) -> Any:
        if self.auth is None:
            status, body = await self._post(method, params, json_body, timeout, large_body)
            return self._result(method, status, body, timing)
        token = await self.auth.access_token()
        try:
            status, body = await self._post(method, {**params, "auth": token}, json_body, timeout, large_body)
            return self._result(method, status, body, timing)
        except TokenExpired:
            pass
        # The token expired before we knew: one refresh (shared with concurrent callers), one retry,
        # which the portal counts as a request of its own.
        token = await self.auth.refresh(rejected=token)
        await self.take_slot(max_wait=0.0)
        status, body = await self._post(method, {**params, "auth": token}, json_body, timeout, large_body)
        return self._result(method, status, body, timing)

    async def search_numbers(self, phones: list[str], slot: RequestSlot | None = None) -> SearchAnswer:
        """Look up numbers in one request: one number with searchCrmEntities itself, several (at
        most 50) in one `batch`: one HTTP round trip and one request of the portal's rate budget.
        A BitrixError is raised when the request itself fails; a number the portal refused gets
        its own PortalError in the answer."""
        if len(phones) == 1:
            timing = AnswerTime()
            entities = self.parse_search(await self.search_crm_entities_raw(phones[0], slot, timing))
            seconds = timing.processing
            return SearchAnswer({phones[0]: entities}, {} if seconds is None else {phones[0]: seconds})
        keys = {f"n{index}": phone for index, phone in enumerate(phones)}  # "n": PHP keeps string keys
        commands = {key: f"{SEARCH_CRM_ENTITIES}?PHONE_NUMBER={quote(phone, safe='')}" for key, phone in keys.items()}
        answer = await self.call(BATCH, {"halt": 0, "cmd": commands}, json_body=True, slot=slot)
        results = answer.get("result") if isinstance(answer, dict) else None
        errors = answer.get("result_error") if isinstance(answer, dict) else None
        times = answer.get("result_time") if isinstance(answer, dict) else None
        results, errors = (value if value not in ([], None) else {} for value in (results, errors))
        if not isinstance(results, dict) or not isinstance(errors, dict):
            raise self._error(BadResponse, "bad_result", BATCH, "the answer has no result/result_error objects")
        searched = SearchAnswer({})
        outcome = searched.outcome
        for key, phone in keys.items():
            command_time = times.get(key) if isinstance(times, dict) else None
            if (seconds := _processing(command_time)) is not None:
                searched.seconds[phone] = seconds
            self.operating.reported(SEARCH_KEY, command_time)
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
        # Nested calls count as the method they call (limits.md); a blocked one holds only it.
        self.operating.spend(SEARCH_KEY, sum(searched.seconds.values()))
        if any(isinstance(error, OperatingTimeExceeded) for error in outcome.values()):
            held = self.operating.blocked(SEARCH_KEY)
            log.warning("portal says OPERATION_TIME_LIMIT for %s in a batch; not calling it for %.0f s",
                        SEARCH_CRM_ENTITIES, held)
        return searched

    async def search_crm_entities(self, phone: str, slot: RequestSlot | None = None) -> list[CrmEntity]:
        """The CRM objects carrying `phone`, best first. `phone` is sent exactly as given."""
        return self.parse_search(await self.search_crm_entities_raw(phone, slot))

    async def search_crm_entities_raw(self, phone: str, slot: RequestSlot | None = None,
                                      timing: AnswerTime | None = None) -> Any:
        """searchCrmEntities' `result` as the portal sent it (for `agi-bitrix route --record`)."""
        return await self.call(SEARCH_CRM_ENTITIES, {"PHONE_NUMBER": phone}, json_body=True, slot=slot,
                               timing=timing)

    def parse_search(self, result: Any) -> list[CrmEntity]:
        try:
            return parse_search_result(result)
        except MalformedAnswer as error:
            raise self._error(BadResponse, "bad_result", SEARCH_CRM_ENTITIES, str(error)) from None

    async def _post(self, method: str, params: Mapping[str, Any], json_body: bool,
                    timeout: float | None = None, large_body: bool = False) -> tuple[int, bytes]:
        seconds = self._timeout_seconds if timeout is None else timeout
        # Encoded here: aiohttp's generic form handling costs more than the request itself.
        data = await asyncio.to_thread(_encode, params, json_body) if large_body else _encode(params, json_body)
        # Chained exceptions are dropped (`from None`): aiohttp's messages can quote the full URL.
        try:
            base = self._base if self.auth is None else self.auth.rest_base()
            async with self._session.post(
                f"{base}{method}.json",
                data=data,
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

    def _result(self, method: str, status: int, body: bytes, timing: AnswerTime | None = None) -> Any:
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
        self._count_operating(method, answer.get("time"))
        if timing is not None:
            timing.block = answer.get("time")
        return answer["result"]

    def _count_operating(self, method: str, time_block: Any) -> None:
        """A method's execution time, as the answer reports it. An outer batch is not counted
        (limits.md): its nested calls are, by search_numbers."""
        if method == BATCH:
            return
        key = method.lower()
        self.operating.reported(key, time_block)
        seconds = _processing(time_block)
        if seconds is not None:
            self.operating.spend(key, seconds)

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


def _processing(time_block: Any) -> float | None:
    """The seconds of work a `time` object reports: `processing`, else `duration`."""
    if not isinstance(time_block, Mapping):
        return None
    for key in ("processing", "duration"):
        value = time_block.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            return float(value)
    return None


def _encode(params: Mapping[str, Any], json_body: bool) -> bytes:
    return json.dumps(params).encode() if json_body else urlencode(list(_form_fields(params))).encode()


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
