"""An in-process Bitrix24 portal, faithful where this project depends on the portal's behaviour.

It serves inbound-webhook URLs (/rest/USER_ID/CODE/METHOD[.json]) over real HTTP so the real
client, timeouts and connection handling are exercised, and it answers the way the REST
documentation and the portal's code say the portal does: numbers as JSON numbers, string user
ids, `{"result", "time"}` on success, `{"error", "error_description"}` with the portal's HTTP
statuses on failure, method names in any case, parameters from the query string, a form or a
JSON body (the wire format is in portal_wire, the methods and their data in portal_model).
Here: the webhook's credentials, the portal's request limit, its operating-time limit per method,
the time a search and the network take, `batch` (its commands one after another), recording
requests, and the whole-portal refusals (a free plan, HTTPS required, register/finish only for
applications, a body over nginx's limit).

Tests and the demo steer it in-process: `set_client` edits the CRM, `fail` injects faults (a
slow or hung portal, a proxy's HTML page, garbage, a dropped connection; see portal_faults) and
`requests` records what the portal was asked. The demo only starts it with the sample CRM.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from agi_bitrix.testing.portal_events import PortalEvents
from agi_bitrix.testing.portal_faults import DOCUMENTED_ERRORS, FaultInjector, nginx_page
from agi_bitrix.testing.portal_lines import LINE_METHODS
from agi_bitrix.testing.portal_model import FINISH_METHOD, REGISTER_METHOD, SEARCH_METHOD, PortalModel, normalise_phone
from agi_bitrix.testing.portal_wire import (
    ErrorAnswer,
    canonical_method,
    error_response,
    json_response,
    php_params,
    read_params,
    time_block,
)

BATCH_METHOD = "batch"
MAX_BATCH_COMMANDS = 50

# The portal's defaults for ordinary plans: drain 2 requests/s, refuse at 50 waiting.
PORTAL_RATE_LIMIT = (2.0, 50)
# How the OAuth front (portal_oauth) tells the portal that a request came with an application's
# token: the real portal sees that in the `auth` it checks itself.
AUTH_TYPE_HEADER = "X-Emulator-Auth-Type"
APPLICATION = "application"
# api-reference/telephony/index.md, "Limitations and Checks": only in an application's context.
APPLICATION_ONLY_METHODS = frozenset({REGISTER_METHOD, FINISH_METHOD})
# The largest request body the emulated portal's nginx takes (client_max_body_size); Bitrix24
# documents none, so it is a parameter.
DEFAULT_MAX_BODY = 64 * 1024 * 1024
# The cloud's operating-time limit (limits.md's example): seconds per method in ten minutes.
PORTAL_OPERATING_LIMIT = (480.0, 600.0)
OPERATING_BASKETS = 10


@dataclass(frozen=True)
class RecordedRequest:
    method: str  # lower-case, without ".json"
    params: dict[str, Any]
    at: float  # time.monotonic() on arrival
    http_method: str


class _LeakyBucket:
    """The portal's request limiter: each request adds one, the bucket drains at `rate` per second."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate limit needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._level = 0.0
        self._updated = time.monotonic()

    def admit(self) -> bool:
        now = time.monotonic()
        self._level = max(0.0, self._level - (now - self._updated) * self.rate)
        self._updated = now
        if self._level + 1 > self.burst:
            return False
        self._level += 1
        return True


class _OperatingLedger:
    """The portal's operating-time limit, as limits.md in bitrix24/b24restdocs describes it: per
    method, execution time in ten baskets, each opened by the first call of its "minute" and
    dropped one window after; a call is refused (429 OPERATION_TIME_LIMIT) while the sum is over
    the limit, the call that passes it still runs. `window` may be shrunk with `limit` in
    proportion so a test sees the limit in seconds."""

    def __init__(self, limit: float | None, window: float) -> None:
        self.limit = limit
        self.window = window
        self._baskets: dict[str, list[list[float]]] = {}  # method -> [[opened_at, seconds], ...]

    def _live(self, method: str, now: float) -> list[list[float]]:
        baskets = [basket for basket in self._baskets.get(method, []) if basket[0] + self.window > now]
        self._baskets[method] = baskets
        return baskets

    def check(self, method: str) -> None:
        if self.limit is not None and sum(seconds for _, seconds in self._live(method, time.time())) > self.limit:
            raise ErrorAnswer(429, "OPERATION_TIME_LIMIT", f"Method {method} is blocked due to operation time limit.")

    def add(self, method: str, started: float, seconds: float) -> None:
        """A call that started at `started` (a basket counts from its first call's start) ran `seconds`."""
        baskets = self._live(method, time.time())
        if not baskets or started >= baskets[-1][0] + self.window / OPERATING_BASKETS:
            baskets.append([started, 0.0])
        baskets[-1][1] += seconds

    def report(self, method: str) -> tuple[float, float]:
        """`operating` and `operating_reset_at` for the method's answer."""
        now = time.time()
        baskets = self._live(method, now)
        return sum(seconds for _, seconds in baskets), (baskets[0][0] if baskets else now) + self.window


class PortalEmulator(PortalModel):
    """The portal model served over HTTP as an inbound webhook, with fault injection."""

    def __init__(
        self,
        crm: Mapping[str, list[dict]] | None = None,
        *,
        users: Mapping[str, dict] | None = None,
        user_id: str = "1",
        code: str = "emulator-secret",
        rate_limit: tuple[float, int] | None = None,
        application_only: bool = False,
        max_body: int = DEFAULT_MAX_BODY,
        operating_limit: tuple[float, float] | None = None,
        search_time: float = 0.0,
        round_trip: float = 0.0,
    ) -> None:
        """`crm` and `users` as for `PortalModel`; `user_id` and `code` make the webhook URL;
        `rate_limit` (requests/s, burst) refuses requests over it like the portal, None: no limit.
        `application_only`: register and finish through the webhook answer WRONG_AUTH_TYPE, as the
        REST docs say they do (off by default: many portals take them through a webhook today).
        `max_body`: bytes of request body the portal's nginx takes; more gets its 413 page.
        `operating_limit` (seconds, window) blocks a method that ran longer, None: never;
        `search_time`: seconds each searchCrmEntities takes (one after another in a batch);
        `round_trip`: seconds the network adds to every request, half each way."""
        super().__init__(crm, users=users)
        self.user_id = user_id
        self.code = code
        self.application_only = application_only
        self.max_body = max_body
        # Whole-portal modes (_includes/system-errors.md): a free plan answers every REST request
        # 403 ACCESS_DENIED, a portal that requires HTTPS answers plain HTTP 400 INVALID_REQUEST
        # (this emulator only speaks HTTP, so then every request).
        self.commercial_plan = True
        self.https_required = False
        self.requests: list[RecordedRequest] = []
        self.refusals: Counter[str] = Counter()  # error codes answered, batch commands' included
        self.search_time = search_time
        self.round_trip = round_trip
        self._search_times: dict[str, float] = {}
        limit, window = operating_limit or (None, PORTAL_OPERATING_LIMIT[1])
        self._operating = _OperatingLedger(limit, window)
        self._faults = FaultInjector()
        self._bucket = _LeakyBucket(*rate_limit) if rate_limit else None
        self._runner: web.AppRunner | None = None
        self.webhook_url = ""
        self.events = PortalEvents()  # event.bind, event.get, the offline queue (portal_events)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(client_max_size=self.max_body + 1)
        app.router.add_route("*", "/rest/{user_id}/{code}/{method}", self._handle)
        # Hung requests are released on stop, so a short shutdown grace is enough.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.webhook_url = f"http://{bound_host}:{bound_port}/rest/{self.user_id}/{self.code}/"
        return self.webhook_url

    async def stop(self) -> None:
        self._faults.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PortalEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- steering ---------------------------------------------------------------------------

    def fail(self, kind: str, **where_and_how: Any) -> None:
        """Inject a fault: which requests it hits (`phone`, `method`, `times`), the kinds and their
        options are in `FaultInjector.add`. Faults apply in the order they were added."""
        self._faults.add(kind, **where_and_how)

    def set_search_time(self, phone: str, seconds: float) -> None:
        """Searching `phone` takes `seconds` (a number with thousands of duplicates in the CRM)."""
        self._search_times[normalise_phone(phone)] = seconds

    def reset_faults(self) -> None:
        self._faults.reset()

    def requests_for(self, method: str) -> list[RecordedRequest]:
        wanted = canonical_method(method)
        return [request for request in self.requests if request.method == wanted]

    # -- HTTP -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.round_trip:
            await asyncio.sleep(self.round_trip / 2)  # the request on its way
        response = await self._respond(request)
        if self.round_trip:
            await asyncio.sleep(self.round_trip / 2)  # the answer on its way back
        return response

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        started = time.time()
        method = canonical_method(request.match_info["method"])
        if (request.content_length or 0) > self.max_body:
            return nginx_page(413)
        try:
            params = await read_params(request)
        except ErrorAnswer as error:
            return error_response(error)
        self.requests.append(RecordedRequest(method, params, time.monotonic(), request.method))

        fault = self._faults.take(method, params)
        if fault is not None:
            response = await self._faults.respond(fault, request)
            if response is not None:
                return response
        try:
            body = await self._answer(request, method, params)
        except ErrorAnswer as error:
            self.refusals[error.code] += 1
            return error_response(error)
        finished = time.time()
        if method == BATCH_METHOD:  # the outer batch is not counted (limits.md)
            body["time"] = time_block(started, finished, processing=body.pop("processing"))
        else:
            body["time"] = time_block(started, finished, processing=body.pop("processing"),
                                      operating=self._operating.report(method))
        return json_response(200, body)

    async def _answer(self, request: web.Request, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if self.https_required and request.scheme != "https":
            raise _documented("INVALID_REQUEST")
        if request.match_info["user_id"] != self.user_id or request.match_info["code"] != self.code:
            raise ErrorAnswer(401, "INVALID_CREDENTIALS", "Invalid request credentials")
        if not self.commercial_plan:
            raise _documented("ACCESS_DENIED")
        # The external lines follow their pages (portal_lines): a webhook is refused whatever
        # `application_only` says, which keeps the register/finish leniency of many portals.
        if (((self.application_only and (method in APPLICATION_ONLY_METHODS or method in self.events.methods))
             or method in LINE_METHODS)
                and request.headers.get(AUTH_TYPE_HEADER) != APPLICATION):
            raise _documented("WRONG_AUTH_TYPE")
        if self._bucket is not None and not self._bucket.admit():
            raise ErrorAnswer(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        if method == BATCH_METHOD:
            started = time.time()
            return {**await self._batch(params), "processing": time.time() - started}
        answer, processing = self._run(method, params, time.time())
        if processing:
            await asyncio.sleep(processing)
        return {**answer, "processing": processing}

    def call_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        event_method = self.events.methods.get(method)
        return event_method(params) if event_method is not None else super().call_method(method, params)

    def _run(self, method: str, params: dict[str, Any], started: float) -> tuple[dict[str, Any], float]:
        """One method call as the portal runs it, from `started`: refused while the method is over
        its operating time, else answered, and the seconds it takes counted (the caller waits
        them: one sleep for a whole batch keeps the emulator's own delays out of the figures)."""
        self._operating.check(method)
        answer = self.call_method(method, params)
        taken = 0.0
        if method == SEARCH_METHOD:
            taken = self._search_times.get(normalise_phone(params.get("PHONE_NUMBER")), self.search_time)
        self._operating.add(method, started, taken)
        return answer, taken

    async def _batch(self, params: dict[str, Any]) -> dict[str, Any]:
        """Up to 50 calls in one request, as the portal runs them: each command is
        "method?query"; answers and errors come back under the command's key. An `error`
        fault aimed at one number fails only that command, as the portal would."""
        commands = params.get("cmd")
        if not isinstance(commands, dict) or not commands:
            raise ErrorAnswer(400, "INVALID_REQUEST", "Batch cmd is empty")
        if len(commands) > MAX_BATCH_COMMANDS:
            raise ErrorAnswer(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
        results: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        times: dict[str, Any] = {}
        started = clock = time.time()
        for key, command in commands.items():  # one after another, as the portal runs them
            name, _, query = str(command).partition("?")
            method = canonical_method(name)
            command_params = php_params(parse_qsl(query, keep_blank_values=True))
            fault = self._faults.take(method, command_params)
            try:
                if fault is not None and fault.kind == "error":
                    raise fault.error_answer()
                answer, processing = self._run(method, command_params, clock)
                results[key] = answer["result"]
                times[key] = time_block(clock, clock + processing, processing=processing)
                clock += processing
            except ErrorAnswer as error:
                self.refusals[error.code] += 1
                errors[key] = {"error": error.code, "error_description": error.description}
        if clock > started:
            await asyncio.sleep(clock - started)
        # PHP sends an empty array, not an empty object, for "no errors".
        return {"result": {"result": results, "result_error": errors or [], "result_total": [],
                           "result_next": [], "result_time": times or []}}


def _documented(code: str) -> ErrorAnswer:
    status, description = DOCUMENTED_ERRORS[code]
    return ErrorAnswer(status, code, description)
